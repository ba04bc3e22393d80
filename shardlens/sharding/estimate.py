"""What a run costs before it runs, from a ShardPlan and the model's config alone (nothing loaded).

Per stage (see StageCost): the bytes of its weights; of what the hooks asked for cache per
microbatch (and their gradients, with a backward); of the working set of one microbatch
(its largest transient, or with a backward the graph autograd keeps for it); of what it
sends to the next stage (and back to the one before, with a backward); and of the raw values
a dataset of its cache holds. `fit_microbatch` picks the largest microbatch that fits every
stage's device budget (StagePlan.budget, from max_memory).

Assumptions (the per-token counts are in `_transient_bytes` and `_graph_bytes`):
- Cached values have the plan's dtype (expert indices int64); attention scores and patterns
  are [head, pos, pos] per example. Inputs are unpadded (a Tracer sends no attention mask then).
- The working set counts the tensors a decoder block holds at its largest moment, per token:
  attention 4 d_model + 3 q + 2 z (keys and values repeated to every query head); the MLP
  4 d_model + 3 d_mlp; the last stage its logits and the float32 copy and log-softmax of
  them for the next-token loss (counted whenever the run may need it: a run that returns
  no logits unembeds only the positions its metric reads, and then needs less). A layer whose scores or
  pattern are hooked computes its attention eagerly and holds two [head, pos, pos] tensors
  at once, one of them the cached one (otherwise SDPA keeps no scores).
- With a backward, each layer's graph keeps 2 d_model + q + k + v + z + 3 d_mlp per token
  (the pattern instead of z when eager): what its input gradient needs (the weights get no
  gradients); the last stage also keeps its final norm's input and the float32 log-softmax.
- These counts were measured on Llama-style blocks (a gated MLP) on CPU, and agree within
  20% with resident memory (tests/sharding/test_estimate.py); other families are estimated
  with them too. What the allocator and the runtime keep besides (thread buffers, a CUDA
  context, a caching allocator's slack) is not counted.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch

from shardlens.errors import ShardPlanError
from shardlens.hooks.architectures import Architecture, architecture_for
from shardlens.hooks.shapes import canonical_shape
from shardlens.sharding.plan import ShardPlan, StagePlan, meta_model, text_table
from shardlens.tables.axes import layer_index

SCORE_POINTS = ("hook_attn_scores", "hook_pattern")  # [head, q_pos, k_pos] per example; a layer with one hooked computes them
FIRST_STAGE_POINTS = ("hook_tokens", "hook_embed", "hook_pos_embed")
INT64_POINTS = ("hook_expert_indices", "hook_tokens")
INDEX_BYTES = 16  # what a hidden state takes along per token: its position id and label (int64 each)


@dataclass(frozen=True)
class StageCost:
    """What one stage of a run needs.

    Attributes:
        index, layers: the stage (as in its StagePlan).
        weight_bytes: its parameters.
        activation_bytes: what the hooks asked for cache per microbatch (with their
            gradients, with a backward).
        working_bytes: the working set of one microbatch: its largest transient, or with a
            backward the graph kept for it plus that transient.
        sent_bytes: over the whole batch, the hidden states it sends to the next stage (with
            their position ids and labels) and, with a backward, the gradient of its input
            sent back to the stage before.
        written_bytes: over the whole batch, the raw value bytes of its cache (what a dataset
            of it holds before Parquet's encoding and compression).
        budget: the bytes its devices' max_memory gives it (None: no budget).
    """

    index: int
    layers: range
    weight_bytes: int
    activation_bytes: int
    working_bytes: int
    sent_bytes: int
    written_bytes: int
    budget: Optional[int] = None

    @property
    def peak_bytes(self) -> int:
        """What the stage holds at its fullest: weights, one microbatch's cache and its working set."""
        return self.weight_bytes + self.activation_bytes + self.working_bytes

    @property
    def fits(self) -> bool:
        return self.budget is None or self.peak_bytes <= self.budget


@dataclass(frozen=True)
class Estimate:
    """The cost of a run of `batch` examples of `seq_len` tokens, per stage.

    Attributes:
        microbatch_size: examples per microbatch (the whole batch when it is not split).
        incl_bwd: whether the run backpropagates (and caches gradients).
        forwards: forward-equivalents of the whole run (a backward counts as one; see
            shardlens.tracer.campaign.cost for campaigns).
        stages: one StageCost per stage.
    """

    model_type: str
    dtype: str
    batch: int
    seq_len: int
    microbatch_size: int
    incl_bwd: bool
    forwards: float
    stages: tuple

    @property
    def weight_bytes(self) -> int:
        return sum(s.weight_bytes for s in self.stages)

    @property
    def sent_bytes(self) -> int:
        return sum(s.sent_bytes for s in self.stages)

    @property
    def written_bytes(self) -> int:
        return sum(s.written_bytes for s in self.stages)

    @property
    def peak_bytes(self) -> int:
        """The largest stage's peak."""
        return max(s.peak_bytes for s in self.stages)

    @property
    def fits(self) -> bool:
        return all(s.fits for s in self.stages)

    def __str__(self) -> str:
        backward = ", with a backward" if self.incl_bwd else ""
        head = (f"{self.model_type}, {self.dtype}: a batch of {self.batch} x {self.seq_len} tokens in microbatches of "
                f"{self.microbatch_size}{backward}, {self.forwards:g} forward-equivalents")
        return head + "\n" + stage_table(self.stages)

    def describe(self) -> str:
        """A table of the stages (weights, activations and working set per microbatch, peak,
        budget, sent, written); printed and returned."""
        text = str(self)
        print(text)
        return text


def stage_table(stages: Sequence[StageCost]) -> str:
    """The rows of StageCosts as an aligned text table."""
    rows = [("stage", "layers", "weights", "activations/mb", "working/mb", "peak", "budget", "sent", "written")]
    for s in stages:
        budget = "-" if s.budget is None else format_bytes(s.budget) + ("" if s.fits else " (exceeded)")
        sizes = (s.weight_bytes, s.activation_bytes, s.working_bytes, s.peak_bytes)
        rows.append((str(s.index), f"{s.layers.start}-{s.layers.stop - 1}", *map(format_bytes, sizes), budget,
                     format_bytes(s.sent_bytes), format_bytes(s.written_bytes)))
    return text_table(rows)


def format_bytes(n_bytes: float) -> str:
    """1234567 -> '1.23 MB' (decimal units, as `ShardPlan.describe` prints GB)."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.3g} {unit}"
    return f"{int(n_bytes)} B"


# ---------------------------------------------------------------------- model dimensions


@dataclass(frozen=True)
class _Dims:
    """Per-token widths of a model, from its config: d_model, the query / key / value / z
    widths over all heads, the MLP width, the vocabulary; and the bytes of its dtype."""

    d_model: int
    n_heads: int
    q: int
    k: int
    v: int
    z: int
    d_mlp: int
    vocab: int
    itemsize: int
    eager_always: bool  # soft-capped scores: every layer computes them (SDPA cannot)

    @classmethod
    def of(cls, config: Any, architecture: Architecture, dtype: torch.dtype) -> "_Dims":
        def width(point: str) -> int:  # over all heads
            return math.prod(canonical_shape(config, architecture, f"blocks.0.{point}"))

        text = config.get_text_config()
        return cls(
            d_model=text.hidden_size, n_heads=canonical_shape(config, architecture, "blocks.0.attn.hook_q")[0],
            q=width("attn.hook_q"), k=width("attn.hook_k"), v=width("attn.hook_v"), z=width("attn.hook_z"),
            d_mlp=width("mlp.hook_pre"), vocab=text.vocab_size, itemsize=torch.empty((), dtype=dtype).element_size(),
            eager_always=getattr(text, "attn_logit_softcapping", None) is not None,
        )


def _context(plan: ShardPlan, config: Any) -> tuple[Architecture, _Dims]:
    architecture = architecture_for(config)
    if architecture is None:
        raise ShardPlanError(f"no architecture for model type {config.model_type!r}: shardlens estimates only what it can shard")
    return architecture, _Dims.of(config, architecture, plan.torch_dtype)


def point_bytes(config: Any, architecture: Architecture, name: str, seq_len: int, dtype: torch.dtype,
                shapes: Optional[Mapping[str, tuple]] = None) -> int:
    """The bytes one example of `seq_len` tokens caches at hook point `name` (`shapes`: the
    shapes after [batch, pos] of points the config does not give, a spliced dictionary's)."""
    point = name.rsplit(".", 1)[-1]
    if shapes and name in shapes:
        elements = seq_len * math.prod(shapes[name])
    elif point in SCORE_POINTS:
        elements = canonical_shape(config, architecture, name.rsplit(".", 1)[0] + ".hook_q")[0] * seq_len * seq_len
    else:
        elements = seq_len * math.prod(canonical_shape(config, architecture, name) or ())
    itemsize = 8 if point in INT64_POINTS else torch.empty((), dtype=dtype).element_size()
    return elements * itemsize


def stage_of(plan: ShardPlan, name: str) -> int:
    """The stage that holds hook point `name`: a block's by its layer, the embeddings' the
    first, the rest (final norm, logits) the last."""
    layer = layer_index(name)
    if layer is not None:
        return next(s.index for s in plan.stages if layer in s.layers)
    return 0 if name.rsplit(".", 1)[-1] in FIRST_STAGE_POINTS else len(plan.stages) - 1


def split_names(plan: ShardPlan, names: Sequence[str]) -> tuple[tuple[str, ...], ...]:
    """Hook names by the stage that holds them (see stage_of)."""
    per_stage: list[list[str]] = [[] for _ in plan.stages]
    for name in names:
        per_stage[stage_of(plan, name)].append(name)
    return tuple(tuple(names) for names in per_stage)


def model_hook_names(plan: ShardPlan, config: Any) -> list[str]:
    """The canonical hook names of the model the plan is for, from its config (no weights)."""
    from shardlens.hooks.model import HookedModel

    return HookedModel(meta_model(config, plan.torch_dtype)).hook_names()


# ---------------------------------------------------------------------- per-token counts


def _scores_cached(names: Sequence[str], layer: int) -> bool:
    prefix = f"blocks.{layer}.attn."
    return any(n.startswith(prefix) and n.rsplit(".", 1)[-1] in SCORE_POINTS for n in names)


def _eager(dims: _Dims, names: Sequence[str], layer: int) -> bool:
    """Whether a layer computes its [head, pos, pos] scores (else SDPA keeps none)."""
    return dims.eager_always or _scores_cached(names, layer)


def _scores_bytes(dims: _Dims, names: Sequence[str], layer: int, elements: int) -> int:
    """The score tensors an eager layer holds at once beyond its cache: two (scores and their
    masked copy, or those and the pattern), one of them the cached one when scores or pattern
    are cached; and the float32 softmax a narrower dtype casts from."""
    if not _eager(dims, names, layer):
        return 0
    s = dims.itemsize
    softmax = 4 if s < 4 else 0
    return elements * ((s if _scores_cached(names, layer) else 2 * s) + softmax)


def _transient_bytes(dims: _Dims, stage: StagePlan, names: Sequence[str], tokens: int, seq_len: int) -> int:
    """The largest transient of one forward of `tokens` tokens (batch x seq_len) through the stage."""
    s = dims.itemsize
    attention = tokens * s * (4 * dims.d_model + 3 * dims.q + 2 * dims.z)
    scores = max(_scores_bytes(dims, names, layer, tokens * dims.n_heads * seq_len) for layer in stage.layers)
    phases = [attention + scores, tokens * s * (4 * dims.d_model + 3 * dims.d_mlp)]
    if stage.head:  # logits, and the next-token loss's float32 copy and log-softmax of them
        phases.append(tokens * (2 * dims.d_model * s + dims.vocab * (s + 8)))
    return max(phases)


def _graph_bytes(dims: _Dims, stage: StagePlan, names: Sequence[str], tokens: int, seq_len: int) -> int:
    """What autograd keeps of one forward for the gradients of activations (weights frozen)."""
    s = dims.itemsize
    total = 0
    for layer in stage.layers:
        kept = tokens * s * (2 * dims.d_model + dims.q + dims.k + dims.v + 3 * dims.d_mlp)
        pattern = tokens * dims.n_heads * seq_len * (s + (4 if s < 4 else 0))  # the softmax's float32 output too
        total += kept + (pattern if _eager(dims, names, layer) else tokens * s * dims.z)
    if stage.head:  # the final norm's input, the loss's float32 log-softmax
        total += tokens * (dims.d_model * s + dims.vocab * 4)
    return total


def _boundary_bytes(dims: _Dims, tokens: int, *, backward: bool) -> int:
    """What crosses one stage boundary for `tokens` tokens: hidden states, position ids and labels forward; their gradient back."""
    return tokens * (dims.d_model * dims.itemsize + INDEX_BYTES) if not backward else tokens * dims.d_model * dims.itemsize


# ---------------------------------------------------------------------- estimates


def estimate(
    plan: ShardPlan,
    config: Any,
    *,
    batch: int,
    seq_len: int,
    names: Sequence[str] = (),
    incl_bwd: bool = False,
    microbatch_size: Optional[int] = None,
    shapes: Optional[Mapping[str, tuple]] = None,
) -> Estimate:
    """The cost of one run of the planned model, per stage (see StageCost and the module's assumptions).

    Args:
        plan: the stages (their budgets come from its max_memory).
        config: the model's transformers config.
        batch, seq_len: the run's token ids are [batch, seq_len].
        names: the hook points it caches (exact names; see model_hook_names).
        incl_bwd: it backpropagates and caches their gradients too.
        microbatch_size: examples per microbatch (None: the whole batch at once).
        shapes: the shapes after [batch, pos] of cached points the config does not give (a
            spliced dictionary's: its latents are [d_sae]).

    Example:
        >>> config = AutoConfig.from_pretrained("path/to/checkpoint")
        >>> plan = ShardPlan.for_model(config, stages=2, max_memory={0: "24GiB"})
        >>> estimate(plan, config, batch=32, seq_len=512, names=["blocks.3.hook_resid_post"]).describe()
    """
    _check_sizes(batch=batch, seq_len=seq_len, microbatch_size=microbatch_size)
    architecture, dims = _context(plan, config)
    size = batch if microbatch_size is None else min(microbatch_size, batch)
    stages = tuple(
        _stage_cost(config, architecture, dims, plan, stage, stage_names, batch=batch, seq_len=seq_len, size=size, incl_bwd=incl_bwd,
                    shapes=shapes)
        for stage, stage_names in zip(plan.stages, split_names(plan, names))
    )
    return Estimate(plan.model_type, plan.dtype, batch, seq_len, size, incl_bwd, 1.0 + incl_bwd, stages)


def _check_sizes(**sizes: Optional[int]) -> None:
    for key, value in sizes.items():
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{key} must be a positive int; got {value!r}")


def _stage_cost(
    config: Any, architecture: Architecture, dims: _Dims, plan: ShardPlan, stage: StagePlan, names: Sequence[str], *,
    batch: int, seq_len: int, size: int, incl_bwd: bool, shapes: Optional[Mapping[str, tuple]] = None,
) -> StageCost:
    per_example = sum(point_bytes(config, architecture, n, seq_len, plan.torch_dtype, shapes) * _copies(n, incl_bwd) for n in names)
    tokens = size * seq_len
    working = _transient_bytes(dims, stage, names, tokens, seq_len)
    if incl_bwd:
        working += _graph_bytes(dims, stage, names, tokens, seq_len)
    sent = 0 if stage.head else _boundary_bytes(dims, batch * seq_len, backward=False)
    if incl_bwd and stage.index > 0:
        sent += _boundary_bytes(dims, batch * seq_len, backward=True)
    return StageCost(stage.index, stage.layers, stage.bytes, size * per_example, working, sent, batch * per_example, stage.budget)


def _copies(name: str, incl_bwd: bool) -> int:
    """A point's cached copies: the value, and its gradient with a backward (integer points have none)."""
    return 1 + (incl_bwd and name.rsplit(".", 1)[-1] not in INT64_POINTS)


def fit_microbatch(
    plan: ShardPlan,
    config: Any,
    *,
    seq_len: int,
    names: Sequence[str] = (),
    incl_bwd: bool = False,
    batch: Optional[int] = None,
    shapes: Optional[Mapping[str, tuple]] = None,
) -> int:
    """The largest microbatch whose peak (weights + cache + working set, see `estimate`) fits
    every stage's budget, at most `batch`: what microbatch_size="auto" picks.

    Every term but the weights grows in proportion to the microbatch, so each stage fits
    (budget - weights) // (what one example adds) examples.

    Raises:
        ShardPlanError: a stage without a budget (a plan made without max_memory), or one
            that cannot hold even one example (naming the stage, its budget and the need).

    Example:
        >>> plan = ShardPlan.for_model(config, stages=2, max_memory={0: "24GiB"})
        >>> fit_microbatch(plan, config, seq_len=1024, incl_bwd=True)
        12
    """
    one = estimate(plan, config, batch=1, seq_len=seq_len, names=names, incl_bwd=incl_bwd, microbatch_size=1, shapes=shapes)
    sizes = [] if batch is None else [batch]
    for stage in one.stages:
        sizes.append(_stage_fit(stage, seq_len))
    return min(sizes)


def _stage_fit(stage: StageCost, seq_len: int) -> int:
    where = f"stage {stage.index} (layers {stage.layers.start}-{stage.layers.stop - 1})"
    if stage.budget is None:
        raise ShardPlanError(
            f"microbatch_size='auto' fits microbatches to each stage's device budget, but {where} has none: give max_memory"
        )
    per_example = stage.peak_bytes - stage.weight_bytes
    fits = (stage.budget - stage.weight_bytes) // per_example
    if fits < 1:
        raise ShardPlanError(
            f"{where} has a budget of {format_bytes(stage.budget)}: its weights take {format_bytes(stage.weight_bytes)} and one "
            f"example of {seq_len} tokens needs {format_bytes(per_example)} more; use more stages, more memory or shorter sequences"
        )
    return int(fits)
