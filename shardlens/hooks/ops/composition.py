"""Ops made of ops: a chain, gradient ops between forward ops, an op at some layers only."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import KW_ONLY, dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from shardlens.hooks.ops.base import Op
from shardlens.hooks.ops.context import RunContext
from shardlens.hooks.ops.selectors import as_list, normalize_index


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

    def stores(self, name: str) -> tuple[str, ...]:
        return tuple(key for op in self.ops for key in op.stores(name))

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

    def stores(self, name: str) -> tuple[str, ...]:
        return tuple(key for op in self.fwd + self.bwd + self.fwd2 for key in op.stores(name))

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
class AtLayers(Op):
    """Run `op` only at hook points of the given layers, after neuron_explainer's AtLayers."""

    op: Op
    _: KW_ONLY
    layers: Any = ()

    def __post_init__(self) -> None:
        if not isinstance(self.op, Op):
            raise ValueError(f"AtLayers(op=...) takes an op; got {type(self.op).__name__}")
        object.__setattr__(self, "layers", as_list(normalize_index(self.layers, "layers"), "layers"))

    @property
    def reads(self) -> bool:  # type: ignore[override]
        return self.op.reads

    @property
    def direction(self) -> str:  # type: ignore[override]
        return self.op.direction

    @property
    def needs_grad(self) -> bool:
        return self.op.needs_grad

    def stores(self, name: str) -> tuple[str, ...]:
        return tuple(key for op in (self.op,) for key in op.stores(name))

    @property
    def creates_points(self) -> tuple[str, ...]:  # type: ignore[override]
        return self.op.creates_points

    def check(self, name: str, root: Any) -> None:
        self.op.check(name, root)

    def __call__(self, tensor: Tensor, hook: Any, ctx: RunContext) -> Optional[Tensor]:
        return self.op(tensor, hook, ctx) if hook.layer() in self.layers else None
