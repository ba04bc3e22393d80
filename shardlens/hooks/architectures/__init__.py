"""Architecture adapters: a registry of layouts keyed by the Hugging Face `model_type`.

A model whose type is not registered still gets `module:<dotted.path>` hook points on every
submodule (the generic fallback); register a layout to give it the canonical names.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

from shardlens.hooks.architectures.gpt2 import gpt2_layout
from shardlens.hooks.architectures.gpt_neox import gpt_neox_layout
from shardlens.hooks.architectures.layout import BlockLayout, ModelLayout
from shardlens.hooks.architectures.llama import llama_layout

LayoutFn = Callable[[Any], ModelLayout]

LAYOUTS: dict[str, LayoutFn] = {
    "gpt2": gpt2_layout,
    "llama": llama_layout,
    "mistral": llama_layout,
    "qwen2": llama_layout,
    "qwen3": llama_layout,
    "gpt_neox": gpt_neox_layout,
}


def register_layout(model_type: str, layout: LayoutFn) -> None:
    """Give models of `model_type` the canonical hook names, laid out by `layout(config)`."""
    LAYOUTS[model_type] = layout


def layout_for(config: Any) -> Optional[ModelLayout]:
    """The layout for a transformers config, or None when its model_type is not registered."""
    layout = LAYOUTS.get(getattr(config, "model_type", None))
    return layout(config) if layout is not None else None


__all__ = ["BlockLayout", "LAYOUTS", "ModelLayout", "layout_for", "register_layout"]
