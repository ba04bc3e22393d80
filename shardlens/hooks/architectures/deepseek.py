"""DeepSeek-V3: multi-head latent attention and mixture-of-experts.

Attention points are the query, key and value heads that multi-head latent attention
finally attends with: hook_q and hook_k [batch, pos, head, qk_nope_head_dim +
qk_rope_head_dim] (the rotary part after rotary), hook_v [batch, pos, head, v_head_dim]; the
compressed latents (q_a_proj, kv_a_proj_with_mqa and their norms) are reachable as
`module:` points. Per-head attention inputs (hook_attn_in, hook_q_input, ...) are not
offered: the heads share those latents. The first `first_k_dense_replace` layers have a dense MLP; the others route
over `n_routed_experts` with sigmoid scores and group-limited top-k, plus shared experts.
"""

from dataclasses import replace

from shardlens.hooks.architectures.architecture import Architecture
from shardlens.hooks.architectures.llama import LLAMA_BLOCK, llama_architecture
from shardlens.hooks.architectures.moe import moe_block


def deepseek_v3_architecture(config) -> Architecture:
    latent = replace(LLAMA_BLOCK, qkv=())
    moe = moe_block(config, router="mlp.gate", shared_expert="mlp.shared_experts", base=latent)
    blocks = tuple(latent if layer < config.first_k_dense_replace else moe for layer in range(config.num_hidden_layers))
    # latent attention expands keys and values to every head
    return llama_architecture(config, moe, layer_blocks=blocks, n_kv_heads=config.num_attention_heads)
