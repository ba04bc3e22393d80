"""Architecture adapters: a registry of layouts keyed by the Hugging Face `model_type`.

A model whose type is not registered still gets `module:<dotted.path>` hook points on every
submodule (the generic fallback); register a layout to give it the canonical names.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

from shardlens.hooks.architectures.cohere import cohere_layout
from shardlens.hooks.architectures.deepseek import deepseek_v3_layout
from shardlens.hooks.architectures.exaone import exaone4_layout
from shardlens.hooks.architectures.falcon import falcon_layout
from shardlens.hooks.architectures.gemma import gemma2_layout, gemma3_layout, gemma3_multimodal_layout, gemma_layout
from shardlens.hooks.architectures.gpt2 import gpt2_layout
from shardlens.hooks.architectures.gpt_neox import gpt_neox_layout
from shardlens.hooks.architectures.gpt_oss import gpt_oss_layout
from shardlens.hooks.architectures.gptj import gptj_layout
from shardlens.hooks.architectures.granite import granite_layout
from shardlens.hooks.architectures.layout import BlockLayout, ModelLayout, MoELayout, attention_kinds
from shardlens.hooks.architectures.llama import llama_layout
from shardlens.hooks.architectures.moe import mixtral_layout, qwen_moe_layout
from shardlens.hooks.architectures.olmo import olmo2_layout, olmo3_layout, olmo_layout, olmoe_layout
from shardlens.hooks.architectures.phi import phi3_layout, phi_layout
from shardlens.hooks.architectures.stablelm import stablelm_layout
from shardlens.hooks.architectures.starcoder2 import starcoder2_layout

LayoutFn = Callable[[Any], ModelLayout]

# model_type -> layout; one line per family (tests/hooks/test_coverage.py lists what is covered)
LAYOUTS: dict[str, LayoutFn] = {
    "gpt2": gpt2_layout,
    "gpt_neox": gpt_neox_layout,
    "gptj": gptj_layout,
    "falcon": falcon_layout,
    "llama": llama_layout,
    "mistral": llama_layout,
    "qwen2": llama_layout,
    "qwen3": llama_layout,
    "smollm3": llama_layout,
    "seed_oss": llama_layout,
    "internlm3": llama_layout,
    "ernie4_5": llama_layout,
    "cwm": llama_layout,
    "gemma": gemma_layout,
    "gemma2": gemma2_layout,
    "gemma3_text": gemma3_layout,
    "gemma3": gemma3_multimodal_layout,
    "phi": phi_layout,
    "phi3": phi3_layout,
    "olmo": olmo_layout,
    "olmo2": olmo2_layout,
    "olmo3": olmo3_layout,
    "exaone4": exaone4_layout,
    "granite": granite_layout,
    "cohere": cohere_layout,
    "stablelm": stablelm_layout,
    "starcoder2": starcoder2_layout,
    "mixtral": mixtral_layout,
    "qwen2_moe": qwen_moe_layout,
    "qwen3_moe": qwen_moe_layout,
    "olmoe": olmoe_layout,
    "deepseek_v3": deepseek_v3_layout,
    "gpt_oss": gpt_oss_layout,
}


def register_layout(model_type: str, layout: LayoutFn) -> None:
    """Give models of `model_type` the canonical hook names, laid out by `layout(config)`.

    A plan made in this process names the function by import path, and stage workers in
    other processes import it from there: define it in a module they can import."""
    LAYOUTS[model_type] = layout


def decoder_model_types() -> list[str]:
    """Every model_type the installed transformers has a causal LM for that is decoder-only:
    its causal-LM table, less the types that also have a masked-LM model (encoders used as
    decoders) or a sequence-to-sequence one (text or speech: the decoders of encoder-decoders).
    Sorted."""
    from transformers.models.auto import modeling_auto as auto

    causal = auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    others = set(auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES) | set(auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES)
    others |= set(auto.MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES)
    return sorted(t for t in causal if t not in others)


def layout_for(config: Any) -> Optional[ModelLayout]:
    """The layout for a transformers config, or None when its model_type is not registered."""
    layout = LAYOUTS.get(getattr(config, "model_type", None))
    return layout(config) if layout is not None else None


def layout_path(model_type: str) -> Optional[str]:
    """The import path ("module:function") of the layout registered for `model_type`, so
    that another process (a stage worker) can use the same one; None when none is."""
    layout = LAYOUTS.get(model_type)
    return None if layout is None else f"{layout.__module__}:{layout.__qualname__}"


def layout_at(path: str, config: Any) -> ModelLayout:
    """The layout the function at import path `path` ("module:function") gives `config`.

    Raises:
        LookupError: naming the path, when it cannot be imported.
    """
    import importlib

    module, _, name = path.partition(":")
    try:
        function = importlib.import_module(module)
        for part in name.split("."):
            function = getattr(function, part)
    except (ImportError, AttributeError) as error:
        raise LookupError(f"layout {path!r} cannot be imported in this process ({type(error).__name__}: {error})") from None
    return function(config)


__all__ = [
    "BlockLayout", "LAYOUTS", "ModelLayout", "MoELayout", "attention_kinds", "decoder_model_types", "layout_at", "layout_for",
    "layout_path", "register_layout",
]
