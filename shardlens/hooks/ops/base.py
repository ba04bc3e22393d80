"""The base classes of ops: `Op`, and the selecting and reading ops that the others build on."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch
from torch import Tensor

from shardlens.hooks.codec import serializable, values_equal
from shardlens.hooks.ops.context import RunContext, axes_of
from shardlens.hooks.ops.selectors import check_sizes, is_groups, normalize_index, outer_index


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

    def stores(self, name: str) -> tuple[str, ...]:
        """The cache entries this op stores when it acts at hook point `name` (a reading op's)."""
        return ()

    def created_names(self, names: Sequence[str]) -> list[str]:
        """The hook points this op makes when it acts at the points `names`."""
        return [f"{name}.{sub}" for name in names for sub in self.creates_points]

    def check(self, name: str, root: Any) -> None:
        """Refuse, before anything runs, a hook point this op cannot act on (changes nothing)."""

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and all(
            values_equal(getattr(self, f.name), getattr(other, f.name)) for f in dataclasses.fields(self)
        )

    __hash__ = None  # ops may hold tensors


@dataclass(frozen=True, eq=False, kw_only=True)
class _Selecting(Op):
    """An op with positions / heads / batch / features selectors (features: the last axis,
    such as a dictionary's latents or an MLP's neurons)."""

    positions: Any = None
    heads: Any = None
    batch: Any = None
    features: Any = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "positions", normalize_index(self.positions, "positions", groups=True))
        object.__setattr__(self, "heads", normalize_index(self.heads, "heads"))
        object.__setattr__(self, "batch", normalize_index(self.batch, "batch"))
        object.__setattr__(self, "features", normalize_index(self.features, "features"))

    def check(self, name: str, root: Any) -> None:
        if self.heads is not None and axes_of(name).head is None:
            raise ValueError(f"{type(self).__name__}(heads={self.heads!r}) at {name}: that hook point has no head axis")

    def index(self, tensor: Tensor, name: str) -> tuple:
        axes = axes_of(name)
        feature_axis = tensor.ndim - 1
        for selector, axis, what in ((self.batch, axes.batch, "batch"), (self.positions, axes.pos, "positions"),
                                     (self.heads, axes.head, "heads"), (self.features, feature_axis, "features")):
            if selector is not None and axis is not None and axis < tensor.ndim:
                check_sizes(selector, tensor.shape[axis], what, name)
        selections = {axes.batch: self.batch, axes.pos: self.positions}
        if axes.head is not None:
            selections[axes.head] = self.heads
        if self.features is not None:
            if feature_axis in selections:
                raise ValueError(f"{type(self).__name__}(features=...) at {name}: its tensors have no feature axis after "
                                 f"batch, position and head (shape {list(tensor.shape)})")
            selections[feature_axis] = self.features
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
        if self.positions is None and self.heads is None and self.batch is None and self.features is None:
            return tensor  # all of it: the common case, on every hook point of a run_with_cache
        if not (is_groups(self.positions) and self.reduce):
            return tensor[self.index(tensor, name)]
        pos_axis = axes_of(name).pos
        parts = []
        for group in self.positions:
            part = dataclasses.replace(self, positions=group, reduce=None).read(tensor, name)
            parts.append(part.mean(pos_axis, keepdim=True) if self.reduce == "mean" else part.sum(pos_axis, keepdim=True))
        return torch.cat(parts, dim=pos_axis)


def normalize_tensor(value: Any, field_name: str, *, optional: bool = False) -> Optional[Tensor]:
    if value is None and optional:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return torch.tensor(float(value))
    if not isinstance(value, Tensor):
        raise ValueError(f"{field_name} must be a tensor; got {type(value).__name__}")
    return value
