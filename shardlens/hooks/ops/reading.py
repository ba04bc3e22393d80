"""Reading ops: they put what they read in the run's cache and leave the tensor unchanged."""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass
from typing import Any, ClassVar, Optional

import torch
from torch import Tensor

from shardlens.hooks.ops.base import Op, _Reading, _Selecting
from shardlens.hooks.ops.context import RunContext
from shardlens.hooks.ops.selectors import as_list, flat, is_groups, normalize_index, outer_index
from shardlens.hooks.ops.writing import EXPERT_WEIGHTS, check_point
from shardlens.tables import sparse
from shardlens.tables.dtypes import normalize_dtype
from shardlens.tables.axes import PATTERN_SUFFIXES


@dataclass(frozen=True, eq=False, kw_only=True)
class Cache(_Reading):
    """Store the (selected) activation under the hook point's name.

    Args:
        dtype: cast to this dtype (e.g. "bfloat16") before storing.
        device: move to this device before storing.
        sparse: store only the non-zeros, as a torch sparse COO tensor of the dense shape
            (SAE latents: a few dozen of tens of thousands per token).
        top_k: store only the k largest values along the last axis (the features) at each
            position, as torch.topk picks them, as a sparse COO tensor; with sparse=True
            too, only those of them that are non-zero.

    Sparse entries go through ActivationCache, Arrow, Parquet and the Tracer's stages as
    such (see shardlens.tables.sparse); `.to_dense()` gives the dense tensor, zero where
    nothing was kept.

    Example:
        >>> spec = sl.HookSpec("blocks.*.mlp.hook_post", sl.ops.Cache(top_k=32))
    """

    dtype: Optional[str] = None
    device: Optional[str] = None
    sparse: bool = False
    top_k: Optional[int] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "dtype", normalize_dtype(self.dtype, "dtype"))
        object.__setattr__(self, "device", None if self.device is None else str(self.device))
        sparse.check_options("Cache", self.sparse, self.top_k)

    def stores(self, name: str) -> tuple[str, ...]:
        return (name,)

    def __call__(self, tensor: Tensor, hook: Any, ctx: RunContext) -> None:
        value = self.read(tensor.detach(), hook.name)
        value = sparse.kept(value, sparse=self.sparse, k=self.top_k, name=hook.name)
        if self.dtype is not None:
            value = value.to(getattr(torch, self.dtype))
        if self.device is not None:
            value = value.to(self.device)
        ctx.store(hook.name, value)


@dataclass(frozen=True, eq=False, kw_only=True)
class CacheGrad(_Reading):
    """Store the (selected) gradient under ``<name>_grad``. A backward op.

    Args:
        sparse: store only the non-zeros, as a torch sparse COO tensor of the dense shape:
            all of a dense gradient, in the form a sparse activation of the same hook point
            needs to share its table (Arrow, Parquet) with it.
        top_k: store only the k largest values (not magnitudes) along the last axis at each
            position, as Cache(top_k=k) does, as a sparse COO tensor.

    Example:
        >>> specs = [sl.HookSpec(point, sl.ops.Cache(sparse=True)), sl.HookSpec(point, sl.ops.CacheGrad(sparse=True))]
    """

    direction: ClassVar[str] = "bwd"
    sparse: bool = False
    top_k: Optional[int] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        sparse.check_options("CacheGrad", self.sparse, self.top_k)

    def stores(self, name: str) -> tuple[str, ...]:
        return (name + "_grad",)

    def __call__(self, tensor: Tensor, hook: Any, ctx: RunContext) -> None:
        value = sparse.kept(self.read(tensor.detach(), hook.name), sparse=self.sparse, k=self.top_k, name=hook.name)
        ctx.store(hook.name + "_grad", value)


@dataclass(frozen=True, eq=False, kw_only=True)
class NormStats(_Reading):
    """Mean, variance and second moment over the last axis (keepdim), per selected position:
    ``<name>.mean``, ``<name>.variance``, ``<name>.second_moment``. With token groups and
    reduce, each statistic is reduced over the group's positions."""

    def stores(self, name: str) -> tuple[str, ...]:
        return (f"{name}.mean", f"{name}.variance", f"{name}.second_moment")

    def __call__(self, tensor: Tensor, hook: Any, ctx: RunContext) -> None:
        x = tensor.detach()
        mean = x.mean(-1, keepdim=True)
        stats = {"mean": mean, "variance": (x - mean).square().mean(-1, keepdim=True), "second_moment": x.square().mean(-1, keepdim=True)}
        for key, value in stats.items():
            ctx.store(f"{hook.name}.{key}", self.read(value, hook.name))


@dataclass(frozen=True, eq=False)
class AttnPatternBlocks(Op):
    """Blocks of an attention pattern [batch, head, q_pos, k_pos], as easyroutine's
    attention_pattern_head: block B_ij has the rows of ``rows[i]`` and the columns of
    ``columns[j]`` (rows default to the column groups).

    reduce: "none" keeps the pattern on (all rows) x (all columns), [batch, head, R, C];
    "mean" / "sum" give one value per block, [batch, head, n_row_groups, n_column_groups];
    "baseline_ratio" divides each block's observed attention by what uniform attention over
    the keys each row may attend to would give: observed = mean over the block's rows of the
    attention mass on the block's columns; expected = mean over those rows of the fraction of
    the row's allowed keys (k <= q) that lie in the columns. Stored as ``<name>.blocks``.
    """

    reads: ClassVar[bool] = True
    columns: Any
    _: KW_ONLY
    rows: Any = None
    reduce: str = "mean"
    heads: Any = None
    batch: Any = None

    def __post_init__(self) -> None:
        columns = normalize_index(self.columns, "columns", groups=True)
        object.__setattr__(self, "columns", columns if is_groups(columns) else tuple((c,) for c in as_list(columns, "columns")))
        if self.rows is not None:
            rows = normalize_index(self.rows, "rows", groups=True)
            object.__setattr__(self, "rows", rows if is_groups(rows) else tuple((r,) for r in as_list(rows, "rows")))
        object.__setattr__(self, "heads", normalize_index(self.heads, "heads"))
        object.__setattr__(self, "batch", normalize_index(self.batch, "batch"))
        if self.reduce not in ("none", "mean", "sum", "baseline_ratio"):
            raise ValueError(f"reduce must be 'none', 'mean', 'sum' or 'baseline_ratio'; got {self.reduce!r}")

    def check(self, name: str, root: Any) -> None:
        if not name.endswith(PATTERN_SUFFIXES):
            raise ValueError(f"AttnPatternBlocks reads an attention pattern; {name} is not hook_pattern or hook_attn_scores")

    def stores(self, name: str) -> tuple[str, ...]:
        return (f"{name}.blocks",)

    def __call__(self, tensor: Tensor, hook: Any, ctx: RunContext) -> None:
        pattern = tensor.detach()[outer_index(tensor, {0: self.batch, 1: self.heads})]
        rows = self.rows if self.rows is not None else self.columns
        if self.reduce == "none":
            block = pattern[..., list(flat(rows)), :][..., list(flat(self.columns))]
            ctx.store(f"{hook.name}.blocks", block)
            return
        out = pattern.new_empty(*pattern.shape[:2], len(rows), len(self.columns))
        for i, row_group in enumerate(rows):
            for j, column_group in enumerate(self.columns):
                out[..., i, j] = self._block_value(pattern, row_group, column_group)
        ctx.store(f"{hook.name}.blocks", out)

    def _block_value(self, pattern: Tensor, rows: tuple, columns: tuple) -> Tensor:
        block = pattern[..., list(rows), :][..., list(columns)]  # [batch, head, R, C]
        if self.reduce == "mean":
            return block.mean((-2, -1))
        if self.reduce == "sum":
            return block.sum((-2, -1))
        n_keys = pattern.shape[-1]
        observed = block.sum(-1).mean(-1)
        fractions = [sum(1 for c in columns if c % n_keys <= r % n_keys) / (r % n_keys + 1) for r in rows]
        return observed / (sum(fractions) / len(fractions))


@dataclass(frozen=True, eq=False, kw_only=True)
class ProjectedHeads(_Reading):
    """Each head's query, key or value vectors projected through that head's W_O, as
    easyroutine's projected_*_vectors_head: [batch, pos, head, d_model] under
    ``<name>.projected``. Key / value heads shared by several query heads (grouped-query
    attention) are projected through each of those query heads' W_O. Needs a model that
    provides ``w_o(layer)`` ([head, d_head, d_model]), such as HookedModel."""

    bias: bool = False

    def check(self, name: str, root: Any) -> None:
        if not name.endswith(("hook_q", "hook_k", "hook_v")):
            raise ValueError(f"ProjectedHeads projects query, key or value vectors; {name} is none of hook_q/k/v")
        if not callable(getattr(root, "w_o", None)):
            raise ValueError(f"ProjectedHeads needs the model's W_O; {type(root).__name__} has no w_o(layer)")

    def stores(self, name: str) -> tuple[str, ...]:
        return (f"{name}.projected",)

    def __call__(self, tensor: Tensor, hook: Any, ctx: RunContext) -> None:
        w_o = ctx.root.w_o(hook.layer())  # [head, d_head, d_model]
        x = tensor.detach()
        x = x.repeat_interleave(w_o.shape[0] // x.shape[2], dim=2)  # kv heads -> query heads
        projected = torch.einsum("bphd,hdm->bphm", x, w_o.to(x.dtype))
        if self.bias:
            projected = projected + ctx.root.b_o(hook.layer()).to(x.dtype)
        ctx.store(f"{hook.name}.projected", self.read(projected, hook.name))


@dataclass(frozen=True, eq=False, kw_only=True)
class RoutingStats(_Selecting):
    """Per example, how many of its (selected) tokens each expert got and the weight it got
    in all, at blocks.<layer>.mlp.hook_expert_weights: ``<name>.expert_counts`` and
    ``<name>.expert_weight_sums``, each [batch, n_experts]. `positions` (token groups count
    as their positions together) and `batch` select the tokens."""

    reads: ClassVar[bool] = True

    def check(self, name: str, root: Any) -> None:
        super().check(name, root)
        check_point(self, name, EXPERT_WEIGHTS)

    def stores(self, name: str) -> tuple[str, ...]:
        return (f"{name}.expert_counts", f"{name}.expert_weight_sums")

    def __call__(self, weights: Tensor, hook: Any, ctx: RunContext) -> None:
        router = hook.name.rsplit(".", 1)[0] + ".hook_router_logits"
        n_experts = ctx.root.hook_shape(router)[0]
        index = self.index(weights, hook.name)
        indices = hook.ctx["expert_indices"][index].flatten(1)  # [batch, tokens x top_k]
        chosen = weights.detach()[index].flatten(1).float()
        counts = chosen.new_zeros(indices.shape[0], n_experts).scatter_add_(1, indices, torch.ones_like(chosen))
        sums = chosen.new_zeros(indices.shape[0], n_experts).scatter_add_(1, indices, chosen)
        ctx.store(hook.name + ".expert_counts", counts)
        ctx.store(hook.name + ".expert_weight_sums", sums)
