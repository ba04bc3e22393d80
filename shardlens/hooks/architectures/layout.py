"""Layouts: where the canonical quantities live inside one family of Hugging Face models.

Paths are dotted module paths: model-level ones from the causal-LM root, block-level ones
from a decoder block. Sharding uses the same layout to cut a model into stages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

NormKind = Literal["layernorm", "rmsnorm"]
ProjectionKind = Literal["linear", "conv1d"]  # nn.Linear (weight [out, in]) or GPT-2's Conv1D ([in, out])


@dataclass(frozen=True)
class BlockLayout:
    """The modules of one decoder block, relative to the block."""

    ln1: str
    attn: str
    o_proj: str  # attention output projection: its input is hook_z flattened
    ln2: str
    mlp: str
    mlp_in: str  # its output is mlp.hook_pre (the gate projection of a gated MLP)
    mlp_out: str  # its input is mlp.hook_post
    mlp_in_linear: Optional[str] = None  # gated MLPs: the up projection, mlp.hook_pre_linear
    norm: NormKind = "layernorm"
    o_proj_kind: ProjectionKind = "linear"
    parallel: bool = False  # attention and MLP both read resid_pre (no resid_mid)


@dataclass(frozen=True)
class ModelLayout:
    """Where embeddings, blocks, final norm and unembedding live in a causal LM."""

    embed: str
    blocks: str  # an nn.ModuleList of decoder blocks
    final_norm: str
    unembed: str
    block: BlockLayout
    pos_embed: Optional[str] = None  # absolute-position models
    embed_dropout: Optional[str] = None  # dropout after the embeddings
    rotary: Optional[str] = None  # rotary-embedding models: the module computing cos/sin
    cache_kwarg: str = "cache"  # the keyword a decoder block takes its key/value cache by
