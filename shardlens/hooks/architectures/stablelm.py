"""StableLM: Llama's gated MLP with LayerNorm, partial rotary and optional per-head q/k
LayerNorms inside attention; with `use_parallel_residual` the MLP reads the attention's norm."""

from dataclasses import replace

from shardlens.hooks.architectures.layout import ModelLayout
from shardlens.hooks.architectures.llama import LLAMA_BLOCK, llama_layout


def stablelm_layout(config) -> ModelLayout:
    parallel = bool(getattr(config, "use_parallel_residual", False))
    block = replace(LLAMA_BLOCK, norm="layernorm", parallel=parallel, ln2=None if parallel else LLAMA_BLOCK.ln2)
    return llama_layout(config, block)
