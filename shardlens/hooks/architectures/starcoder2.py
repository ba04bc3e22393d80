"""Starcoder2: Llama's sequential block with LayerNorm, a plain (ungated) MLP, biases, and a
sliding window in every layer when the config has one."""

from dataclasses import replace

from shardlens.hooks.architectures.layout import ModelLayout
from shardlens.hooks.architectures.llama import LLAMA_BLOCK, llama_layout


def starcoder2_layout(config) -> ModelLayout:
    block = replace(LLAMA_BLOCK, norm="layernorm", mlp_in="mlp.c_fc", mlp_in_linear=None, mlp_out="mlp.c_proj")
    return llama_layout(config, block)
