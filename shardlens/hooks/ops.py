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
Axes: per-head points (hook_q/k/v/z/result) are [batch, pos, head, ...]; hook_attn_scores
and hook_pattern are [batch, head, q_pos, k_pos] (positions select query positions);
everything else is [batch, pos, ...].

Cache entries written by reading ops, by hook point name N: Cache -> N; CacheGrad -> N_grad;
NormStats -> N.mean, N.variance, N.second_moment; AttnPatternBlocks -> N.blocks;
ProjectedHeads -> N.projected; RoutingStats -> N.expert_counts, N.expert_weight_sums.
"""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import KW_ONLY, dataclass, field
from typing import Any, Callable, ClassVar, Optional, Union

import torch
from torch import Tensor

from shardlens.hooks.codec import serializable, values_equal
from shardlens.tables.axes import PATTERN_SUFFIXES, head_axis, position_axis


Index = Union[None, int, slice, tuple]  # normalised selector


@dataclass
class RunContext:
    """The per-run store that ops read from and write to.

    Attributes:
        root: the hooked module the run belongs to (ops read weights from it, e.g. W_O).
        cache: where reading ops put their results (the run's ActivationCache dict), or None
            when the run keeps no results.
        sources: caches of earlier runs by name, for Patch(from_cache=...).
    """

    root: Any
    cache: Optional[dict] = None
    sources: Mapping[str, Mapping[str, Tensor]] = field(default_factory=dict)

    def store(self, key: str, value: Tensor) -> None:
        if self.cache is None:
            raise ValueError(f"a reading op produced {key!r} but this run keeps no results: use run_with_cache, or pass store={{}}")
        self.cache[key] = value


@dataclass(frozen=True)
class Axes:
    batch: int
    pos: int
    head: Optional[int]


def axes_of(name: str) -> Axes:
    """Where batch, position and head live in the tensor of the hook point `name`."""
    return Axes(batch=0, pos=position_axis(name), head=head_axis(name))


# ---------------------------------------------------------------- selectors


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def normalize_index(value: Any, field_name: str, *, groups: bool = False) -> Index:
    """A selector as None, int, slice, tuple of ints, or (with groups) tuple of int tuples."""
    if value is None or _is_int(value) or isinstance(value, slice):
        return value
    if isinstance(value, Tensor):
        value = value.tolist()
    if isinstance(value, (list, tuple, range)):
        items = list(value)
        if items and all(isinstance(v, (list, tuple, range)) for v in items):
            if not groups:
                raise ValueError(f"{field_name} takes an int, a slice or a list of ints; token groups only for positions")
            normalized = tuple(tuple(normalize_index(list(g), field_name)) for g in items)
            if any(not g for g in normalized):
                raise ValueError(f"{field_name}: a token group is empty")
            return normalized
        if all(_is_int(v) for v in items):
            return tuple(items)
    raise ValueError(f"{field_name} must be an int, a slice, a list of ints{' or a list of index lists' if groups else ''}; got {value!r}")


def is_groups(index: Index) -> bool:
    return isinstance(index, tuple) and bool(index) and isinstance(index[0], tuple)


def flat(index: Index) -> Index:
    """Token groups as one list of positions; other selectors unchanged."""
    return tuple(p for group in index for p in group) if is_groups(index) else index


def _axis_indices(index: Index, size: int, device: torch.device) -> Tensor:
    if index is None:
        return torch.arange(size, device=device)
    if _is_int(index):
        return torch.tensor([index], device=device)
    if isinstance(index, slice):
        return torch.arange(size, device=device)[index]
    return torch.tensor(flat(index), dtype=torch.long, device=device)


def outer_index(tensor: Tensor, selections: Mapping[int, Index]) -> tuple:
    """An index that takes the outer product of the selections (axis -> selector), keeping
    every axis: usable to read (tensor[idx]) and to write (tensor[idx] = values)."""
    chosen = {axis: index for axis, index in selections.items() if index is not None}
    if not chosen:
        return (Ellipsis,)
    n = max(chosen) + 1
    index = []
    for axis in range(n):
        indices = _axis_indices(chosen.get(axis), tensor.shape[axis], tensor.device)
        shape = [1] * n
        shape[axis] = -1
        index.append(indices.view(shape))
    return tuple(index)


def _check_sizes(selector: Index, size: int, what: str, name: str) -> None:
    values = [selector] if _is_int(selector) else (flat(selector) if isinstance(selector, tuple) else [])
    bad = [v for v in values if not -size <= v < size]
    if bad:
        raise IndexError(f"{name}: {what} {bad} out of range for an axis of {size}")


# ---------------------------------------------------------------- the base classes


@dataclass(frozen=True, eq=False)
class Op:
    """The base of every op. Subclasses say what they need as data: `reads` (puts results
    in ctx), `direction`, `needs_grad` (a run must backpropagate for it to act) and
    `creates_points` (hook points it makes under each point it acts at, by suffix)."""

    reads: ClassVar[bool] = False
    direction: ClassVar[str] = "fwd"  # "fwd": sees activations; "bwd": sees gradients
    either_direction: ClassVar[bool] = False  # acts on activations or gradients, as its spec says
    creates_points: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.__name__.startswith("_"):
            serializable(cls)

    def __call__(self, tensor: Tensor, hook: Any, ctx: RunContext) -> Optional[Tensor]:
        raise NotImplementedError

    @property
    def needs_grad(self) -> bool:
        return self.direction == "bwd"

    def check(self, name: str, root: Any) -> None:
        """Refuse, before anything runs, a hook point this op cannot act on (changes nothing)."""

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and all(
            values_equal(getattr(self, f.name), getattr(other, f.name)) for f in dataclasses.fields(self)
        )

    __hash__ = None  # ops may hold tensors


@dataclass(frozen=True, eq=False, kw_only=True)
class _Selecting(Op):
    """An op with positions / heads / batch selectors."""

    positions: Any = None
    heads: Any = None
    batch: Any = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "positions", normalize_index(self.positions, "positions", groups=True))
        object.__setattr__(self, "heads", normalize_index(self.heads, "heads"))
        object.__setattr__(self, "batch", normalize_index(self.batch, "batch"))

    def check(self, name: str, root: Any) -> None:
        if self.heads is not None and axes_of(name).head is None:
            raise ValueError(f"{type(self).__name__}(heads={self.heads!r}) at {name}: that hook point has no head axis")

    def index(self, tensor: Tensor, name: str) -> tuple:
        axes = axes_of(name)
        for selector, axis, what in ((self.batch, axes.batch, "batch"), (self.positions, axes.pos, "positions"), (self.heads, axes.head, "heads")):
            if selector is not None and axis is not None and axis < tensor.ndim:
                _check_sizes(selector, tensor.shape[axis], what, name)
        selections = {axes.batch: self.batch, axes.pos: self.positions}
        if axes.head is not None:
            selections[axes.head] = self.heads
        return outer_index(tensor, {a: s for a, s in selections.items() if a < tensor.ndim})


@dataclass(frozen=True, eq=False, kw_only=True)
class _Reading(_Selecting):
    """A selecting op that reads: token groups reduce with `reduce`."""

    reads: ClassVar[bool] = True
    reduce: Optional[str] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.reduce not in (None, "mean", "sum"):
            raise ValueError(f"reduce must be None, 'mean' or 'sum'; got {self.reduce!r}")

    def read(self, tensor: Tensor, name: str) -> Tensor:
        """The selected part of `tensor`, each token group reduced to one position."""
        if not (is_groups(self.positions) and self.reduce):
            return tensor[self.index(tensor, name)]
        pos_axis = axes_of(name).pos
        parts = []
        for group in self.positions:
            part = dataclasses.replace(self, positions=group, reduce=None).read(tensor, name)
            parts.append(part.mean(pos_axis, keepdim=True) if self.reduce == "mean" else part.sum(pos_axis, keepdim=True))
        return torch.cat(parts, dim=pos_axis)


def _dtype(value: Any, field_name: str) -> Optional[str]:
    if value is None:
        return None
    name = str(value).removeprefix("torch.")
    if not isinstance(getattr(torch, name, None), torch.dtype):
        raise ValueError(f"{field_name} must be a torch dtype or its name (e.g. 'bfloat16'); got {value!r}")
    return name


def _tensor(value: Any, field_name: str, *, optional: bool = False) -> Optional[Tensor]:
    if value is None and optional:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return torch.tensor(float(value))
    if not isinstance(value, Tensor):
        raise ValueError(f"{field_name} must be a tensor; got {type(value).__name__}")
    return value


# ---------------------------------------------------------------- reading ops


@dataclass(frozen=True, eq=False, kw_only=True)
class Cache(_Reading):
    """Store the (selected) activation under the hook point's name.

    Args:
        dtype: cast to this dtype (e.g. "bfloat16") before storing.
        device: move to this device before storing.
    """

    dtype: Optional[str] = None
    device: Optional[str] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "dtype", _dtype(self.dtype, "dtype"))
        object.__setattr__(self, "device", None if self.device is None else str(self.device))

    def __call__(self, tensor: Tensor, hook: Any, ctx: RunContext) -> None:
        value = self.read(tensor.detach(), hook.name)
        if self.dtype is not None:
            value = value.to(getattr(torch, self.dtype))
        if self.device is not None:
            value = value.to(self.device)
        ctx.store(hook.name, value)


@dataclass(frozen=True, eq=False, kw_only=True)
class CacheGrad(_Reading):
    """Store the (selected) gradient under ``<name>_grad``. A backward op."""

    direction: ClassVar[str] = "bwd"

    def __call__(self, tensor: Tensor, hook: Any, ctx: RunContext) -> None:
        ctx.store(hook.name + "_grad", self.read(tensor.detach(), hook.name))


@dataclass(frozen=True, eq=False, kw_only=True)
class NormStats(_Reading):
    """Mean, variance and second moment over the last axis (keepdim), per selected position:
    ``<name>.mean``, ``<name>.variance``, ``<name>.second_moment``. With token groups and
    reduce, each statistic is reduced over the group's positions."""

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
        object.__setattr__(self, "columns", columns if is_groups(columns) else tuple((c,) for c in _as_list(columns, "columns")))
        if self.rows is not None:
            rows = normalize_index(self.rows, "rows", groups=True)
            object.__setattr__(self, "rows", rows if is_groups(rows) else tuple((r,) for r in _as_list(rows, "rows")))
        object.__setattr__(self, "heads", normalize_index(self.heads, "heads"))
        object.__setattr__(self, "batch", normalize_index(self.batch, "batch"))
        if self.reduce not in ("none", "mean", "sum", "baseline_ratio"):
            raise ValueError(f"reduce must be 'none', 'mean', 'sum' or 'baseline_ratio'; got {self.reduce!r}")

    def check(self, name: str, root: Any) -> None:
        if not name.endswith(PATTERN_SUFFIXES):
            raise ValueError(f"AttnPatternBlocks reads an attention pattern; {name} is not hook_pattern or hook_attn_scores")

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


def _as_list(index: Index, field_name: str) -> tuple:
    if _is_int(index):
        return (index,)
    if isinstance(index, tuple):
        return index
    raise ValueError(f"{field_name} must be ints or groups of ints; got {index!r}")


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

    def __call__(self, tensor: Tensor, hook: Any, ctx: RunContext) -> None:
        w_o = ctx.root.w_o(hook.layer())  # [head, d_head, d_model]
        x = tensor.detach()
        x = x.repeat_interleave(w_o.shape[0] // x.shape[2], dim=2)  # kv heads -> query heads
        projected = torch.einsum("bphd,hdm->bphm", x, w_o.to(x.dtype))
        if self.bias:
            projected = projected + ctx.root.b_o(hook.layer()).to(x.dtype)
        ctx.store(f"{hook.name}.projected", self.read(projected, hook.name))


# ---------------------------------------------------------------- writing ops


def _shape_error(name: str, op: str, expected: Sequence[int], given: Sequence[int]) -> ValueError:
    return ValueError(f"{op} at {name}: values of shape {list(given)} do not fit the selection of shape {list(expected)}")


def _write(tensor: Tensor, index: tuple, values: Tensor, name: str, op: str) -> Tensor:
    out = tensor.clone()
    target = out[index]
    try:
        if torch.broadcast_shapes(values.shape, target.shape) != target.shape:
            raise RuntimeError
    except RuntimeError:
        raise _shape_error(name, op, target.shape, values.shape) from None
    out[index] = values.to(device=out.device, dtype=out.dtype)
    return out


@dataclass(frozen=True, eq=False)
class Patch(_Selecting):
    """Replace the selection with `values`, or with the entry of an earlier run's cache.

    Args:
        values: a tensor that broadcasts to the selection.
        from_cache: the name of a source cache given to the run (sources={"clean": cache});
            the patch takes its entry `entry` (default: this hook point's name), at the same
            selection when the entry has the activation's full shape.
    """

    values: Any = None
    _: KW_ONLY
    from_cache: Optional[str] = None
    entry: Optional[str] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.values is None) == (self.from_cache is None):
            raise ValueError("Patch takes exactly one of values= and from_cache=")
        if self.values is not None:
            object.__setattr__(self, "values", _tensor(self.values, "values"))

    def check(self, name: str, root: Any) -> None:
        super().check(name, root)
        shape = getattr(root, "hook_shape", lambda n: None)(name)
        if self.values is None or shape is None or self.values.ndim == 0:
            return
        if self.values.shape[-1] not in (1, shape[-1]):
            raise ValueError(
                f"Patch at {name}: values of shape {list(self.values.shape)} end in {self.values.shape[-1]}, "
                f"but the hook point's tensors are [batch, pos, {', '.join(map(str, shape))}]"
            )

    def __call__(self, tensor: Tensor, hook: Any, ctx: RunContext) -> Tensor:
        index = self.index(tensor, hook.name)
        values = self.values if self.values is not None else self._source(tensor, hook, ctx, index)
        return _write(tensor, index, values, hook.name, "Patch")

    def _source(self, tensor: Tensor, hook: Any, ctx: RunContext, index: tuple) -> Tensor:
        if self.from_cache not in ctx.sources:
            raise KeyError(f"Patch(from_cache={self.from_cache!r}) at {hook.name}: the run has no source cache of that name; given: {sorted(ctx.sources)}")
        source = ctx.sources[self.from_cache][self.entry or hook.name]
        return source[index] if source.shape == tensor.shape else source


@dataclass(frozen=True, eq=False)
class Ablate(_Selecting):
    """Zero the selection (mode="zero"), or set it to `mean` (mode="mean"; without `mean`,
    the selection's mean over the batch)."""

    mode: str = "zero"
    _: KW_ONLY
    mean: Any = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mode not in ("zero", "mean"):
            raise ValueError(f"mode must be 'zero' or 'mean'; got {self.mode!r}")
        if self.mean is not None and self.mode != "mean":
            raise ValueError("mean= is only used with mode='mean'")
        object.__setattr__(self, "mean", _tensor(self.mean, "mean", optional=True))

    def __call__(self, tensor: Tensor, hook: Any, ctx: RunContext) -> Tensor:
        index = self.index(tensor, hook.name)
        if self.mode == "zero":
            values = tensor.new_zeros(())
        else:
            values = self.mean if self.mean is not None else tensor[index].mean(0, keepdim=True)
        return _write(tensor, index, values, hook.name, "Ablate")


@dataclass(frozen=True, eq=False)
class Add(_Selecting):
    """Add ``scale * vector`` to the selection (a steering vector)."""

    vector: Any
    _: KW_ONLY
    scale: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "vector", _tensor(self.vector, "vector"))
        object.__setattr__(self, "scale", float(self.scale))

    def __call__(self, tensor: Tensor, hook: Any, ctx: RunContext) -> Tensor:
        index = self.index(tensor, hook.name)
        return _write(tensor, index, tensor[index] + self.scale * self.vector.to(tensor.device, tensor.dtype), hook.name, "Add")


@dataclass(frozen=True, eq=False)
class Scale(_Selecting):
    """Multiply the selection by `factor` (on hook_pattern: easyroutine's multiply_pattern)."""

    factor: Any  # a number, or a tensor that broadcasts to the selection

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.factor, Tensor):
            object.__setattr__(self, "factor", float(_tensor(self.factor, "factor")))

    def __call__(self, tensor: Tensor, hook: Any, ctx: RunContext) -> Tensor:
        index = self.index(tensor, hook.name)
        factor = self.factor.to(tensor.device, tensor.dtype) if isinstance(self.factor, Tensor) else self.factor
        return _write(tensor, index, tensor[index] * factor, hook.name, "Scale")


@dataclass(frozen=True, eq=False)
class AttnEdit(Op):
    """Multiply a block of an attention pattern by `factor`: heads x q_positions x
    k_positions, as easyroutine's intervention_attn_mat_hook. With renormalize=True the
    edited rows are rescaled to sum to one again."""

    factor: float
    _: KW_ONLY
    q_positions: Any = None
    k_positions: Any = None
    heads: Any = None
    renormalize: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "factor", float(self.factor))
        for name in ("q_positions", "k_positions", "heads"):
            object.__setattr__(self, name, normalize_index(getattr(self, name), name))

    def check(self, name: str, root: Any) -> None:
        if not name.endswith(PATTERN_SUFFIXES):
            raise ValueError(f"AttnEdit edits an attention pattern; {name} is not hook_pattern or hook_attn_scores")

    def __call__(self, tensor: Tensor, hook: Any, ctx: RunContext) -> Tensor:
        out = tensor.clone()
        index = outer_index(out, {1: self.heads, 2: self.q_positions, 3: self.k_positions})
        out[index] = out[index] * self.factor
        if self.renormalize:
            rows = outer_index(out, {1: self.heads, 2: self.q_positions})
            out[rows] = out[rows] / out[rows].sum(-1, keepdim=True)
        return out


@dataclass(frozen=True, eq=False)
class ScaleGrad(_Selecting):
    """Multiply the (selected) gradient by `factor`. A backward op."""

    direction: ClassVar[str] = "bwd"
    factor: float

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "factor", float(self.factor))

    def __call__(self, tensor: Tensor, hook: Any, ctx: RunContext) -> Tensor:
        index = self.index(tensor, hook.name)
        return _write(tensor, index, tensor[index] * self.factor, hook.name, "ScaleGrad")


@dataclass(frozen=True, eq=False, kw_only=True)
class StopGrad(_Selecting):
    """Stop the (selected) gradient here: it flows on as zero. A backward op."""

    direction: ClassVar[str] = "bwd"

    def __call__(self, tensor: Tensor, hook: Any, ctx: RunContext) -> Tensor:
        return _write(tensor, self.index(tensor, hook.name), tensor.new_zeros(()), hook.name, "StopGrad")


# ---------------------------------------------------------------- routing (mixture of experts)

EXPERT_INDICES, EXPERT_WEIGHTS = "mlp.hook_expert_indices", "mlp.hook_expert_weights"


def _experts(value: Any, field_name: str) -> tuple:
    experts = normalize_index(value, field_name)
    experts = (experts,) if _is_int(experts) else experts
    if not isinstance(experts, tuple) or not experts or any(e < 0 for e in experts):
        raise ValueError(f"{field_name} must be expert indices (non-negative ints); got {value!r}")
    return experts


def _check_point(op: Op, name: str, suffix: str) -> None:
    if not name.endswith(suffix):
        raise ValueError(f"{type(op).__name__} acts on blocks.<layer>.{suffix} of a mixture-of-experts block; got {name}")


def _check_experts(op: Op, experts: tuple, name: str, root: Any) -> None:
    router = name.rsplit(".", 1)[0] + ".hook_router_logits"
    shape = getattr(root, "hook_shape", lambda n: None)(router)
    if shape is not None and max(experts) >= shape[0]:
        raise ValueError(f"{type(op).__name__} at {name}: experts {list(experts)}, but the block has {shape[0]} (0-{shape[0] - 1})")


@dataclass(frozen=True, eq=False)
class _ExpertOp(_Selecting):
    """An op on a mixture-of-experts block's routing that names experts; it acts at `point`."""

    point: ClassVar[str]
    experts: Any = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "experts", _experts(self.experts, "experts"))

    def check(self, name: str, root: Any) -> None:
        super().check(name, root)
        _check_point(self, name, self.point)
        _check_experts(self, self.experts, name, root)


@dataclass(frozen=True, eq=False)
class AblateExperts(_ExpertOp):
    """Take experts out of the routing at blocks.<layer>.mlp.hook_expert_weights: a token
    routed to one of `experts` gets weight zero for it. With `renormalize`, the token's other
    weights are scaled so that they keep the sum they had (what the router's renormalised
    top-k would give without those experts); without, the block's output just loses those
    experts' share. `positions` and `batch` select the tokens."""

    point: ClassVar[str] = EXPERT_WEIGHTS
    _: KW_ONLY
    renormalize: bool = False

    def __call__(self, weights: Tensor, hook: Any, ctx: RunContext) -> Tensor:
        indices = hook.ctx["expert_indices"]  # [batch, pos, top_k], set by the block's routing tap
        chosen = torch.isin(indices, torch.tensor(self.experts, device=indices.device))
        selected = torch.zeros_like(chosen)
        selected[self.index(selected, hook.name)] = True
        kept = weights.masked_fill(chosen & selected, 0)
        if self.renormalize:
            total, left = weights.sum(-1, keepdim=True), kept.sum(-1, keepdim=True)
            kept = torch.where(left > 0, kept * (total / left.clamp_min(torch.finfo(left.dtype).tiny)), kept)
        return kept


@dataclass(frozen=True, eq=False)
class RouteTo(_ExpertOp):
    """Force a routing at blocks.<layer>.mlp.hook_expert_indices: the selected tokens go to
    `experts` (one per top-k slot, in order) instead of the router's choice; each slot keeps
    its weight (set those with Patch at hook_expert_weights)."""

    point: ClassVar[str] = EXPERT_INDICES

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(set(self.experts)) != len(self.experts):
            raise ValueError(f"RouteTo sends a token to each expert once: experts {list(self.experts)} name one twice")

    def check(self, name: str, root: Any) -> None:
        super().check(name, root)
        shape = getattr(root, "hook_shape", lambda n: None)(name)
        if shape is not None and len(self.experts) != shape[0]:
            raise ValueError(f"RouteTo at {name}: {len(self.experts)} experts given, the block routes each token to {shape[0]}")

    def __call__(self, indices: Tensor, hook: Any, ctx: RunContext) -> Tensor:
        forced = torch.tensor(self.experts, dtype=indices.dtype, device=indices.device)
        return _write(indices, self.index(indices, hook.name), forced, hook.name, "RouteTo")


@dataclass(frozen=True, eq=False, kw_only=True)
class RoutingStats(_Selecting):
    """Per example, how many of its (selected) tokens each expert got and the weight it got
    in all, at blocks.<layer>.mlp.hook_expert_weights: ``<name>.expert_counts`` and
    ``<name>.expert_weight_sums``, each [batch, n_experts]. `positions` (token groups count
    as their positions together) and `batch` select the tokens."""

    reads: ClassVar[bool] = True

    def check(self, name: str, root: Any) -> None:
        super().check(name, root)
        _check_point(self, name, EXPERT_WEIGHTS)

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


# ---------------------------------------------------------------- composition


def _run_ops(ops: Sequence[Op], tensor: Tensor, hook: Any, ctx: RunContext) -> tuple[Tensor, bool]:
    replaced = False
    for op in ops:
        result = op(tensor, hook, ctx)
        if result is not None:
            tensor, replaced = result, True
    return tensor, replaced


def _ops_tuple(ops: Any, field_name: str) -> tuple:
    ops = tuple(ops) if isinstance(ops, (list, tuple)) else (ops,)
    if not all(isinstance(op, Op) for op in ops):
        raise ValueError(f"{field_name} must hold ops; got {[type(op).__name__ for op in ops]}")
    return ops


def _created(ops: Sequence[Op]) -> tuple[str, ...]:
    """The hook points a composition of ops makes (by suffix), each once, in order."""
    return tuple(dict.fromkeys(sub for op in ops for sub in op.creates_points))


def _same_direction(ops: Sequence[Op], field_name: str) -> str:
    directions = {op.direction for op in ops}
    if len(directions) > 1:
        raise ValueError(f"{field_name} mixes forward and backward ops; use FwdBwd to put gradient ops between forward ops")
    return directions.pop() if directions else "fwd"


@dataclass(frozen=True, eq=False)
class Chain(Op):
    """Run ops in order, each seeing the previous one's result."""

    ops: Any

    def __post_init__(self) -> None:
        object.__setattr__(self, "ops", _ops_tuple(self.ops, "ops"))
        _same_direction(self.ops, "Chain")

    @property
    def reads(self) -> bool:  # type: ignore[override]
        return any(op.reads for op in self.ops)

    @property
    def direction(self) -> str:  # type: ignore[override]
        return _same_direction(self.ops, "Chain")

    @property
    def needs_grad(self) -> bool:
        return any(op.needs_grad for op in self.ops)

    @property
    def creates_points(self) -> tuple[str, ...]:  # type: ignore[override]
        return _created(self.ops)

    def check(self, name: str, root: Any) -> None:
        for op in self.ops:
            op.check(name, root)

    def __call__(self, tensor: Tensor, hook: Any, ctx: RunContext) -> Optional[Tensor]:
        tensor, replaced = _run_ops(self.ops, tensor, hook, ctx)
        return tensor if replaced else None


class _GradOps(torch.autograd.Function):
    """Identity forward; the backward runs gradient ops on the incoming gradient."""

    @staticmethod
    def forward(autograd_ctx, tensor, ops, hook, run_ctx):  # type: ignore[override]
        autograd_ctx.ops, autograd_ctx.hook, autograd_ctx.run_ctx = ops, hook, run_ctx
        return tensor.view_as(tensor)

    @staticmethod
    def backward(autograd_ctx, grad):  # type: ignore[override]
        grad, _ = _run_ops(autograd_ctx.ops, grad, autograd_ctx.hook, autograd_ctx.run_ctx)
        return grad, None, None, None


@dataclass(frozen=True, eq=False)
class FwdBwd(Op):
    """Forward ops, then gradient ops, then more forward ops, after neuron_explainer's
    FwdBwdHooks: the `bwd` ops see the gradient of the value between `fwd` and `fwd2`
    (through an identity autograd function), not that of the hook point's final output."""

    fwd: Any = ()
    bwd: Any = ()
    fwd2: Any = ()

    def __post_init__(self) -> None:
        for name, want in (("fwd", "fwd"), ("bwd", "bwd"), ("fwd2", "fwd")):
            ops = _ops_tuple(getattr(self, name), name)
            if any(op.direction != want for op in ops):
                raise ValueError(f"FwdBwd.{name} takes {'gradient' if want == 'bwd' else 'forward'} ops only")
            object.__setattr__(self, name, ops)

    @property
    def reads(self) -> bool:  # type: ignore[override]
        return any(op.reads for op in self.fwd + self.bwd + self.fwd2)

    @property
    def needs_grad(self) -> bool:
        return bool(self.bwd) or any(op.needs_grad for op in self.fwd + self.fwd2)

    @property
    def creates_points(self) -> tuple[str, ...]:  # type: ignore[override]
        return _created(self.fwd + self.bwd + self.fwd2)

    def check(self, name: str, root: Any) -> None:
        for op in self.fwd + self.bwd + self.fwd2:
            op.check(name, root)

    def __call__(self, tensor: Tensor, hook: Any, ctx: RunContext) -> Tensor:
        tensor, _ = _run_ops(self.fwd, tensor, hook, ctx)
        if self.bwd and tensor.requires_grad:
            tensor = _GradOps.apply(tensor, self.bwd, hook, ctx)
        tensor, _ = _run_ops(self.fwd2, tensor, hook, ctx)
        return tensor


@dataclass(frozen=True, eq=False)
class When(Op):
    """Run `op` only at hook points of the given layers (neuron_explainer's AtLayers)."""

    op: Op
    _: KW_ONLY
    layers: Any = ()

    def __post_init__(self) -> None:
        if not isinstance(self.op, Op):
            raise ValueError(f"When(op=...) takes an op; got {type(self.op).__name__}")
        object.__setattr__(self, "layers", _as_list(normalize_index(self.layers, "layers"), "layers"))

    @property
    def reads(self) -> bool:  # type: ignore[override]
        return self.op.reads

    @property
    def direction(self) -> str:  # type: ignore[override]
        return self.op.direction

    @property
    def needs_grad(self) -> bool:
        return self.op.needs_grad

    @property
    def creates_points(self) -> tuple[str, ...]:  # type: ignore[override]
        return self.op.creates_points

    def check(self, name: str, root: Any) -> None:
        self.op.check(name, root)

    def __call__(self, tensor: Tensor, hook: Any, ctx: RunContext) -> Optional[Tensor]:
        return self.op(tensor, hook, ctx) if hook.layer() in self.layers else None


@serializable
@dataclass(frozen=True, eq=False)
class Linear:
    """x @ weight (+ bias), then an optional activation ("relu"): an SAE's encoder or decoder."""

    weight: Any
    bias: Any = None
    _: KW_ONLY
    activation: Optional[str] = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "weight", _tensor(self.weight, "weight"))
        object.__setattr__(self, "bias", _tensor(self.bias, "bias", optional=True))
        if self.activation not in (None, "relu"):
            raise ValueError(f"activation must be None or 'relu'; got {self.activation!r}")

    def __call__(self, x: Tensor) -> Tensor:
        y = x @ self.weight.to(x.device, x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.device, x.dtype)
        return torch.relu(y) if self.activation == "relu" else y

    __eq__ = Op.__eq__
    __hash__ = None


SPLICE_POINTS = ("sae.hook_latents", "sae.hook_reconstruction", "sae.hook_error")


@dataclass(frozen=True, eq=False)
class Splice(Op):
    """Replace the activation x by an autoencoder's reconstruction, after neuron_explainer's
    AutoencoderHooks, exposing hook points ``<point>.sae.hook_latents``,
    ``.hook_reconstruction`` and ``.hook_error`` that other specs can cache or patch.

    With add_error=True the output is reconstruction + (x - decode(latents)), where the error
    term is computed from latents before their hooks: an exact autoencoder leaves the model
    unchanged, and edits of the latents act through the decoder only. With add_error=False
    the output is the reconstruction alone, and hook_error sees x - reconstruction.
    """

    creates_points: ClassVar[tuple[str, ...]] = SPLICE_POINTS
    encoder: Linear
    decoder: Linear
    _: KW_ONLY
    add_error: bool = True

    def __post_init__(self) -> None:
        for name in ("encoder", "decoder"):
            if not isinstance(getattr(self, name), Linear):
                raise ValueError(f"Splice.{name} must be an sl.ops.Linear; got {type(getattr(self, name)).__name__}")

    def __call__(self, tensor: Tensor, hook: Any, ctx: RunContext) -> Tensor:
        points = ctx.root.hook_dict
        latents_point, reconstruction_point, error_point = (points[f"{hook.name}.{sub}"] for sub in SPLICE_POINTS)
        latents = self.encoder(tensor)
        reconstruction = reconstruction_point(self.decoder(latents_point(latents.clone() if self.add_error else latents)))
        if self.add_error:
            return reconstruction + error_point(tensor - self.decoder(latents))
        error_point(tensor - reconstruction)
        return reconstruction


@dataclass(frozen=True, eq=False)
class Code(Op):
    """A Python callable as an op, called TransformerLens-style: fn(tensor, hook=hook).

    It runs in one process like any hook. Serialising it pickles code (cloudpickle), which
    whoever reads it would execute, so to_json / from_json refuse it unless given
    allow_code=True.
    """

    either_direction: ClassVar[bool] = True
    fn: Callable

    def __post_init__(self) -> None:
        if not callable(self.fn):
            raise ValueError(f"Code(fn) takes a callable; got {type(self.fn).__name__}")

    def __call__(self, tensor: Tensor, hook: Any, ctx: RunContext) -> Optional[Tensor]:
        return self.fn(tensor, hook=hook)

    def encode_fields(self, allow_code: bool) -> dict:
        if not allow_code:
            raise ValueError(
                "sl.ops.Code holds a Python callable: serialising it pickles code that the reader would "
                "execute. Use declarative ops, or pass allow_code=True if you trust every reader"
            )
        import cloudpickle

        return {"pickle": base64.b64encode(cloudpickle.dumps(self.fn)).decode("ascii")}

    @classmethod
    def decode_fields(cls, fields: dict, allow_code: bool) -> "Code":
        if not allow_code:
            raise ValueError("this spec holds sl.ops.Code (pickled Python code); reading it would execute it: pass allow_code=True to accept")
        import pickle

        return cls(pickle.loads(base64.b64decode(fields["pickle"])))


__all__ = [
    "Ablate", "Add", "AttnEdit", "AttnPatternBlocks", "Cache", "CacheGrad", "Chain", "Code", "FwdBwd",
    "Linear", "NormStats", "Op", "Patch", "ProjectedHeads", "RunContext", "Scale", "ScaleGrad", "Splice",
    "StopGrad", "When",
]
