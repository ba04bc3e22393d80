"""gpt-oss: mixture-of-experts with a biased router whose weights are a softmax over the
top-k logits, RMSNorm with the weight applied in float32, alternating sliding-window and
global layers, and attention sinks.

A sink is one learned logit per head that takes part in the softmax but has no value: its
hook points are those of every other family; hook_attn_scores holds the real keys' scores
and hook_pattern their probabilities, so a row sums to one minus the sink's share.
"""

from dataclasses import replace

from shardlens.hooks.architectures.architecture import Architecture
from shardlens.hooks.architectures.llama import LLAMA_BLOCK, llama_architecture
from shardlens.hooks.architectures.moe import moe_block


def gpt_oss_architecture(config) -> Architecture:
    return llama_architecture(config, moe_block(config, router="mlp.router", base=replace(LLAMA_BLOCK, norm="rmsnorm_f32")))
