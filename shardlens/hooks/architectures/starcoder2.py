"""Starcoder2: Llama's sequential block with LayerNorm, a plain (ungated) MLP, biases, and a
sliding window in every layer when the config has one."""

from dataclasses import replace

from shardlens.hooks.architectures.architecture import Architecture
from shardlens.hooks.architectures.llama import LLAMA_BLOCK, llama_architecture


def starcoder2_architecture(config) -> Architecture:
    block = replace(LLAMA_BLOCK, norm="layernorm", mlp_in="mlp.c_fc", mlp_in_linear=None, mlp_out="mlp.c_proj")
    return llama_architecture(config, block)
