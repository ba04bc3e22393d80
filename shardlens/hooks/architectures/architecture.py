"""Architectures: where the canonical quantities live inside one family of Hugging Face models.

Paths are dotted module paths: model-level ones from the causal-LM root, block-level ones
from a decoder block. Sharding uses the same architecture to cut a model into stages. An architecture is
data: what a family does differently from Llama (an extra norm, a fused projection, a
multiplier in its forward) is a field here, and the taps and stages read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Callable
from typing import Any, Literal, Optional

# How a norm computes (see taps.NormTap): LayerNorm in the input dtype; Llama's RMSNorm
# (statistics in float32, cast back before the weight); RMSNorm with the weight applied in
# float32 (OLMo-2, gpt-oss); Gemma's RMSNorm (float32, scaled by 1 + weight); LayerNorm in
# float32 (Cohere's, without bias; OLMo's, without weight or bias).
NormKind = Literal["layernorm", "rmsnorm", "rmsnorm_f32", "gemma_rmsnorm", "layernorm_f32"]
ProjectionKind = Literal["linear", "conv1d"]  # nn.Linear (weight [out, in]) or GPT-2's Conv1D ([in, out])
AttentionKind = Literal["full_attention", "sliding_attention"]


@dataclass(frozen=True)
class MoEArchitecture:
    """A mixture-of-experts MLP, relative to the block.

    transformers' MoE blocks share one shape: a router module returning (router logits
    [tokens, experts], expert weights [tokens, k], expert indices [tokens, k]) and an experts
    module called as experts(hidden [tokens, d_model], indices, weights). A shared expert is a
    gated MLP every token goes through, its projections at shared_in / shared_in_linear /
    shared_out within it.
    """

    router: str
    experts: str
    n_experts: int
    top_k: int
    shared_expert: Optional[str] = None
    shared_in: str = "gate_proj"
    shared_in_linear: str = "up_proj"
    shared_out: str = "down_proj"


@dataclass(frozen=True)
class BlockArchitecture:
    """The modules of one decoder block, relative to the block.

    ln1 / ln2 are the norms before attention and before the MLP; ln1_post / ln2_post the
    norms some families put on their outputs (Gemma 2 and 3, OLMo-2), whose outputs are then
    hook_attn_out and hook_mlp_out. A parallel block's MLP reads resid_pre; one whose MLP
    reads ln1's output (Phi, GPT-J, Cohere) has no ln2.
    """

    attn: str
    o_proj: str  # attention output projection: its input is hook_z flattened
    mlp: str
    ln1: Optional[str] = None
    ln2: Optional[str] = None
    ln1_post: Optional[str] = None
    ln2_post: Optional[str] = None
    mlp_in: Optional[str] = None  # its output is mlp.hook_pre (the gate projection of a gated MLP)
    mlp_out: Optional[str] = None  # its input is mlp.hook_post
    mlp_in_linear: Optional[str] = None  # gated MLPs: the up projection, mlp.hook_pre_linear
    fused_gate_up: bool = False  # mlp_in returns [gate | up] in one tensor (Phi-3)
    moe: Optional[MoEArchitecture] = None  # a mixture-of-experts MLP: no hook_pre / hook_post
    qkv: tuple = ()  # (projection path, arrangement) of the q/k/v projections: see head_inputs.row_blocks
    norm: NormKind = "layernorm"
    o_proj_kind: ProjectionKind = "linear"  # the attention projections' kind (o_proj and q/k/v)
    parallel: bool = False  # attention and MLP both read resid_pre (no resid_mid)
    mlp_out_changed_in_place: bool = False  # the block adds into the MLP's output tensor (Falcon)

    @property
    def gated(self) -> bool:
        return self.mlp_in_linear is not None or self.fused_gate_up


@dataclass(frozen=True)
class Architecture:
    """Where embeddings, blocks, final norm and unembedding live in a causal LM, and what
    its forward does between them.

    `embed_multiplier` scales the embeddings in the model's forward (Granite; Gemma scales
    inside its embedding module, so hook_embed is already scaled there). The final logits are
    softcap(logits * logit_multiplier / logit_divisor): Cohere's logit_scale, Granite's
    logits_scaling, Gemma 2's final soft-cap; hook_logits is after all of them.
    """

    embed: str
    blocks: str  # an nn.ModuleList of decoder blocks
    final_norm: str
    unembed: str
    block: BlockArchitecture
    pos_embed: Optional[str] = None  # absolute-position models
    embed_dropout: Optional[str] = None  # dropout after the embeddings
    rotary: Optional[str] = None  # rotary-embedding models: the module computing cos/sin
    rotary_by_layer_type: bool = False  # rotary(x, positions, layer_type) per attention kind (Gemma 3)
    cache_kwarg: str = "cache"  # the keyword a decoder block takes its key/value cache by
    block_kwargs: tuple = ()  # (keyword, value) pairs every block call needs (Falcon: alibi=None)
    attention_forward: Optional[Callable] = None  # a forward for attention modules that compute
    # attention themselves instead of through AttentionInterface (Falcon); it calls shardlens_attention
    layer_blocks: tuple = ()  # per layer, where layers differ (dense and MoE layers); else `block`
    attention_kinds: tuple = ()  # per layer "full_attention" / "sliding_attention"; () : all full
    n_kv_heads: Optional[int] = None  # key/value heads where config.num_key_value_heads does not say
    embed_multiplier: float = 1.0
    residual_multiplier: float = 1.0  # each block adds this x hook_attn_out and x hook_mlp_out (Granite)
    logit_multiplier: float = 1.0
    logit_divisor: float = 1.0
    logit_softcap: Optional[float] = None

    def block_at(self, layer: int) -> BlockArchitecture:
        return self.layer_blocks[layer] if self.layer_blocks else self.block

    def attention_kind(self, layer: int) -> AttentionKind:
        return self.attention_kinds[layer] if self.attention_kinds else "full_attention"

    @property
    def transforms_logits(self) -> bool:
        return self.logit_multiplier != 1.0 or self.logit_divisor != 1.0 or self.logit_softcap is not None


def attention_kinds(config: Any) -> tuple:
    """Per-layer attention kinds as the config names them (`layer_types`), or sliding in every
    layer when the config has a window but no layer types (Mistral, Mixtral, Phi-3, ...)."""
    n_layers = config.num_hidden_layers
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return tuple(layer_types[:n_layers])
    if getattr(config, "sliding_window", None) is not None:
        return ("sliding_attention",) * n_layers
    return ()
