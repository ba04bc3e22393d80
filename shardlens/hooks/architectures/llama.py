"""Llama and its family (Mistral, Qwen2, Qwen3): rotary, RMSNorm, gated MLP, grouped-query
attention (Qwen3 adds per-head q/k norms inside attention; Mistral and Qwen2 sliding windows)."""

from shardlens.hooks.architectures.architecture import BlockArchitecture, Architecture, attention_kinds

LLAMA_BLOCK = BlockArchitecture(
    ln1="input_layernorm", attn="self_attn", o_proj="self_attn.o_proj", ln2="post_attention_layernorm", mlp="mlp",
    mlp_in="mlp.gate_proj", mlp_in_linear="mlp.up_proj", mlp_out="mlp.down_proj", norm="rmsnorm",
    qkv=(("self_attn.q_proj", "q"), ("self_attn.k_proj", "k"), ("self_attn.v_proj", "v")),
)


def llama_architecture(config, block: BlockArchitecture = LLAMA_BLOCK, **fields) -> Architecture:
    """A Llama-shaped model; other families pass their own block and model-level fields."""
    return Architecture(
        embed="model.embed_tokens", blocks="model.layers", final_norm="model.norm", unembed="lm_head",
        rotary="model.rotary_emb", block=block, attention_kinds=attention_kinds(config), **fields,
    )
