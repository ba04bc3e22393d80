"""Writing ops: each returns the tensor with its selection replaced, on activations or gradients."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import KW_ONLY, dataclass
from typing import Any, ClassVar, Optional

import torch
from torch import Tensor

from shardlens.hooks.ops.base import Op, _Selecting, normalize_tensor
from shardlens.hooks.ops.context import RunContext
from shardlens.hooks.ops.selectors import is_int, normalize_index, outer_index
from shardlens.tables.axes import PATTERN_SUFFIXES


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
            object.__setattr__(self, "values", normalize_tensor(self.values, "values"))

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
        object.__setattr__(self, "mean", normalize_tensor(self.mean, "mean", optional=True))

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
        object.__setattr__(self, "vector", normalize_tensor(self.vector, "vector"))
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
            object.__setattr__(self, "factor", float(normalize_tensor(self.factor, "factor")))

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
    experts = (experts,) if is_int(experts) else experts
    if not isinstance(experts, tuple) or not experts or any(e < 0 for e in experts):
        raise ValueError(f"{field_name} must be expert indices (non-negative ints); got {value!r}")
    return experts


def check_point(op: Op, name: str, suffix: str) -> None:
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
        check_point(self, name, self.point)
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
