"""OLMo, OLMo-2, OLMo-3 and OLMoE.

OLMo (1) is Llama-shaped with a LayerNorm that has no weight or bias, computed in float32.
OLMo-2 normalises the outputs of attention and MLP instead of their inputs (ln1_post,
ln2_post; no ln1 or ln2), applies q/k norms over all heads inside attention, and its RMSNorm
multiplies by the weight in float32. OLMo-3 adds alternating sliding-window layers with a
rotary embedding per attention kind. OLMoE is Llama-shaped with q/k norms and a
mixture-of-experts MLP.
"""

from dataclasses import replace

from shardlens.hooks.architectures.architecture import Architecture
from shardlens.hooks.architectures.llama import LLAMA_BLOCK, llama_architecture
from shardlens.hooks.architectures.moe import moe_block

OLMO2_BLOCK = replace(
    LLAMA_BLOCK, ln1=None, ln2=None, ln1_post="post_attention_layernorm", ln2_post="post_feedforward_layernorm", norm="rmsnorm_f32",
)


def olmo_architecture(config) -> Architecture:
    return llama_architecture(config, replace(LLAMA_BLOCK, norm="layernorm_f32"))


def olmo2_architecture(config) -> Architecture:
    return llama_architecture(config, OLMO2_BLOCK)


def olmo3_architecture(config) -> Architecture:
    return llama_architecture(config, OLMO2_BLOCK, rotary_by_layer_type=True)


def olmoe_architecture(config) -> Architecture:
    return llama_architecture(config, moe_block(config, router="mlp.gate"))
