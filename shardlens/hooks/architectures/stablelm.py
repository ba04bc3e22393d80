"""StableLM: Llama's gated MLP with LayerNorm, partial rotary and optional per-head q/k
LayerNorms inside attention; with `use_parallel_residual` the MLP reads the attention's norm."""

from dataclasses import replace

from shardlens.hooks.architectures.architecture import Architecture
from shardlens.hooks.architectures.llama import LLAMA_BLOCK, llama_architecture


def stablelm_architecture(config) -> Architecture:
    parallel = bool(getattr(config, "use_parallel_residual", False))
    block = replace(LLAMA_BLOCK, norm="layernorm", parallel=parallel, ln2=None if parallel else LLAMA_BLOCK.ln2)
    return llama_architecture(config, block)
