"""Ops: what a hook spec does at each hook point it matches.

Each op is a small frozen dataclass and a pure function of (tensor, hook, ctx): `tensor` is
the activation (or, for backward ops, its gradient), `hook` the hook point, and `ctx` the
per-run store (`RunContext`) where reading ops put what they read. An op returns a
replacement tensor or None.

Selectors, where an op takes them, pick part of the tensor; each keeps its axis:
- `positions`: an int, a slice, a list of ints, or token groups (a list of index lists).
  Reading ops reduce each group with `reduce="mean"|"sum"` (None: the groups' positions
  side by side); writing ops act on every position of every group.
- `heads`: an int, slice or list of heads (hook points with a head axis only).
- `batch`: an int, slice or list of examples.
- `features`: an int, slice or list along the last axis (a dictionary's latents, an MLP's
  neurons): Ablate / Patch / Add / Scale with features= ablate, clamp, steer or scale them.
Axes: per-head points (hook_q/k/v/z/result) are [batch, pos, head, ...]; hook_attn_scores
and hook_pattern are [batch, head, q_pos, k_pos] (positions select query positions);
everything else is [batch, pos, ...].

Cache entries written by reading ops, by hook point name N: Cache -> N; CacheGrad -> N_grad
(each, with sparse=True or top_k=k, a torch sparse COO tensor of the dense shape: see
shardlens.tables.sparse);
NormStats -> N.mean, N.variance, N.second_moment; AttnPatternBlocks -> N.blocks;
ProjectedHeads -> N.projected; RoutingStats -> N.expert_counts, N.expert_weight_sums.
"""

from shardlens.hooks.ops.base import Op
from shardlens.hooks.ops.code import Code
from shardlens.hooks.ops.composition import AtLayers, Chain, FwdBwd
from shardlens.hooks.ops.context import RunContext
from shardlens.hooks.ops.reading import AttnPatternBlocks, Cache, CacheGrad, NormStats, ProjectedHeads, RoutingStats
from shardlens.hooks.ops.sae import Splice
from shardlens.hooks.ops.selectors import normalize_index
from shardlens.hooks.ops.writing import Ablate, AblateExperts, Add, AttnEdit, Patch, RouteTo, Scale, ScaleGrad, StopGrad

__all__ = [
    "Ablate", "AblateExperts", "Add", "AtLayers", "AttnEdit", "AttnPatternBlocks", "Cache", "CacheGrad", "Chain",
    "Code", "FwdBwd", "NormStats", "Op", "Patch", "ProjectedHeads", "RouteTo", "RoutingStats",
    "RunContext", "Scale", "ScaleGrad", "Splice", "StopGrad", "normalize_index",
]
