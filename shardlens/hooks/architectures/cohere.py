"""Cohere (Command R): a parallel block whose MLP reads the attention's norm (no ln2),
LayerNorm without bias computed in float32, interleaved rotary and optional q/k norms inside
attention, and logits multiplied by `logit_scale` (hook_logits is after it)."""

from shardlens.hooks.architectures.architecture import BlockArchitecture, Architecture
from shardlens.hooks.architectures.llama import LLAMA_BLOCK, llama_architecture


def cohere_architecture(config) -> Architecture:
    block = BlockArchitecture(
        ln1="input_layernorm", attn="self_attn", o_proj="self_attn.o_proj", mlp="mlp", mlp_in="mlp.gate_proj",
        mlp_in_linear="mlp.up_proj", mlp_out="mlp.down_proj", norm="layernorm_f32", parallel=True, qkv=LLAMA_BLOCK.qkv,
    )
    return llama_architecture(config, block, logit_multiplier=config.logit_scale)
