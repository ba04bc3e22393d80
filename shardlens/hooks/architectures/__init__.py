"""Architecture adapters: a registry of architectures keyed by the Hugging Face `model_type`.

A model whose type is not registered still gets `module:<dotted.path>` hook points on every
submodule (the generic fallback); register an architecture to give it the canonical names.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

from shardlens.hooks.architectures.cohere import cohere_architecture
from shardlens.hooks.architectures.deepseek import deepseek_v3_architecture
from shardlens.hooks.architectures.exaone import exaone4_architecture
from shardlens.hooks.architectures.falcon import falcon_architecture
from shardlens.hooks.architectures.gemma import gemma2_architecture, gemma3_architecture, gemma3_multimodal_architecture, gemma_architecture
from shardlens.hooks.architectures.gpt2 import gpt2_architecture
from shardlens.hooks.architectures.gpt_neox import gpt_neox_architecture
from shardlens.hooks.architectures.gpt_oss import gpt_oss_architecture
from shardlens.hooks.architectures.gptj import gptj_architecture
from shardlens.hooks.architectures.granite import granite_architecture
from shardlens.hooks.architectures.architecture import BlockArchitecture, Architecture, MoEArchitecture, attention_kinds
from shardlens.hooks.architectures.llama import llama_architecture
from shardlens.hooks.architectures.moe import mixtral_architecture, qwen_moe_architecture
from shardlens.hooks.architectures.olmo import olmo2_architecture, olmo3_architecture, olmo_architecture, olmoe_architecture
from shardlens.hooks.architectures.phi import phi3_architecture, phi_architecture
from shardlens.hooks.architectures.stablelm import stablelm_architecture
from shardlens.hooks.architectures.starcoder2 import starcoder2_architecture

ArchitectureFn = Callable[[Any], Architecture]

# model_type -> architecture; one line per family (tests/hooks/test_coverage.py lists what is covered)
ARCHITECTURES: dict[str, ArchitectureFn] = {
    "gpt2": gpt2_architecture,
    "gpt_neox": gpt_neox_architecture,
    "gptj": gptj_architecture,
    "falcon": falcon_architecture,
    "llama": llama_architecture,
    "mistral": llama_architecture,
    "qwen2": llama_architecture,
    "qwen3": llama_architecture,
    "smollm3": llama_architecture,
    "seed_oss": llama_architecture,
    "internlm3": llama_architecture,
    "ernie4_5": llama_architecture,
    "cwm": llama_architecture,
    "gemma": gemma_architecture,
    "gemma2": gemma2_architecture,
    "gemma3_text": gemma3_architecture,
    "gemma3": gemma3_multimodal_architecture,
    "phi": phi_architecture,
    "phi3": phi3_architecture,
    "olmo": olmo_architecture,
    "olmo2": olmo2_architecture,
    "olmo3": olmo3_architecture,
    "exaone4": exaone4_architecture,
    "granite": granite_architecture,
    "cohere": cohere_architecture,
    "stablelm": stablelm_architecture,
    "starcoder2": starcoder2_architecture,
    "mixtral": mixtral_architecture,
    "qwen2_moe": qwen_moe_architecture,
    "qwen3_moe": qwen_moe_architecture,
    "olmoe": olmoe_architecture,
    "deepseek_v3": deepseek_v3_architecture,
    "gpt_oss": gpt_oss_architecture,
}


def register_architecture(model_type: str, architecture: ArchitectureFn) -> None:
    """Give models of `model_type` the canonical hook names, laid out by `architecture(config)`.

    A plan made in this process names the function by import path, and stage workers in
    other processes import it from there: define it in a module they can import."""
    ARCHITECTURES[model_type] = architecture


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


def architecture_for(config: Any) -> Optional[Architecture]:
    """The architecture for a transformers config, or None when its model_type is not registered."""
    architecture = ARCHITECTURES.get(getattr(config, "model_type", None))
    return architecture(config) if architecture is not None else None


def architecture_path(model_type: str) -> Optional[str]:
    """The import path ("module:function") of the architecture registered for `model_type`, so
    that another process (a stage worker) can use the same one; None when none is."""
    architecture = ARCHITECTURES.get(model_type)
    return None if architecture is None else f"{architecture.__module__}:{architecture.__qualname__}"


def architecture_at(path: str, config: Any) -> Architecture:
    """The architecture the function at import path `path` ("module:function") gives `config`.

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
        raise LookupError(f"architecture {path!r} cannot be imported in this process ({type(error).__name__}: {error})") from None
    return function(config)


__all__ = [
    "BlockArchitecture", "ARCHITECTURES", "Architecture", "MoEArchitecture", "attention_kinds", "decoder_model_types", "architecture_at", "architecture_for",
    "architecture_path", "register_architecture",
]
