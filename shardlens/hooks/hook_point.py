"""HookPoint: a named identity module where TransformerLens-style hooks attach.

A hook point is a named identity module. Hooks attach to it in one of two directions:
``"fwd"`` hooks see the activation as the forward pass goes through; ``"bwd"`` hooks see the
gradient of that activation as the backward pass goes through. Either kind may return None
(leave the value as it is) or a tensor of the same shape that replaces it; a backward hook
may also return it as a one-tuple ``(grad,)``, as torch's module backward hooks do.

Code written against ``transformer_lens.hook_points`` runs unchanged against these names.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Optional, Protocol

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from shardlens.tables.axes import layer_index

Direction = Literal["fwd", "bwd"]
DirectionOrBoth = Literal["fwd", "bwd", "both"]
HookFunction = Callable[..., Optional[Tensor]]  # fn(tensor, *, hook) -> Tensor | None



def check_dir(dir: str, allowed: tuple[str, ...]) -> None:
    if dir not in allowed:
        raise ValueError(f"dir must be one of {', '.join(map(repr, allowed))}; got {dir!r}")


def removed(*, permanent: bool, level: Optional[int], asked: Optional[int], including_permanent: bool) -> bool:
    """Whether remove / reset_hooks(level=asked, including_permanent=...) removes a hook
    installed at `level`: every hook with including_permanent, else the non-permanent ones
    of `asked` (of every level when None). Hook points, runners' scopes and a coordinator's
    spec stack all follow this one rule."""
    return including_permanent or (not permanent and (asked is None or level == asked))


def layer_of(name: str) -> int:
    """The layer of a hook name of the form ``blocks.<layer>.…``."""
    layer = layer_index(name)
    if layer is None:
        raise ValueError(f"hook point {name!r} belongs to no layer (expected 'blocks.<layer>.…')")
    return layer


@dataclass
class LensHandle:
    """One hook attached to a hook point: its torch handle and how it was added."""

    hook: RemovableHandle
    is_permanent: bool = False
    context_level: Optional[int] = None
    user_hook: Optional[Callable] = None


class TensorConversion(Protocol):
    """What `HookPoint.enable_reshape` takes: hooks see convert(x) and return in that form."""

    def convert(self, tensor: Tensor) -> Tensor: ...

    def revert(self, tensor: Tensor) -> Tensor: ...


class _AliasedHookPoint:
    """The hook point as a hook added with `alias_names` sees it: the same point, another name."""

    def __init__(self, hook_point: "HookPoint", name: str):
        self._hook_point = hook_point
        self.name = name

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._hook_point, attr)

    def layer(self) -> int:
        return layer_of(self.name)


class HookPoint(nn.Module):
    """A named identity module where forward and backward hooks attach.

    Example:
        >>> hp = HookPoint()
        >>> hp.add_hook(lambda x, hook: x * 2)
        >>> hp(torch.ones(2))
        tensor([2., 2.])
    """

    def __init__(self):
        super().__init__()
        self.fwd_hooks: list[LensHandle] = []
        self.bwd_hooks: list[LensHandle] = []
        self.ctx: dict = {}
        self.name: Optional[str] = None
        self.hook_conversion: Optional[TensorConversion] = None
        # The hook functions of each direction, in call order, keyed by their handle's id (so
        # handle.remove() works). Kept here rather than in torch's module hooks: a hook point is
        # called hundreds of times per forward, and nn.Module's hook dispatch costs microseconds.
        self._fwd_fns: OrderedDict[int, Callable[[Tensor], Optional[Tensor]]] = OrderedDict()
        self._bwd_fns: OrderedDict[int, Callable[[Tensor], Optional[Tensor]]] = OrderedDict()

    def add_perma_hook(self, hook: HookFunction, dir: Direction = "fwd") -> None:
        self.add_hook(hook, dir=dir, is_permanent=True)

    def add_hook(
        self,
        hook: HookFunction,
        dir: Direction = "fwd",
        is_permanent: bool = False,
        level: Optional[int] = None,
        prepend: bool = False,
        alias_names: Optional[Sequence[str]] = None,
    ) -> None:
        """Attach `hook`, called as ``hook(tensor, hook=self)``.

        Args:
            dir: "fwd" to see the activation, "bwd" to see its gradient.
            is_permanent: survives reset_hooks() unless including_permanent=True.
            level: the context level that owns the hook (None: no level).
            prepend: run before the hooks already attached in this direction.
            alias_names: call the hook once per name, each time with a view of this hook
                point carrying that name (each call sees the previous call's result).
        """
        check_dir(dir, ("fwd", "bwd"))
        if not callable(hook):
            raise TypeError(f"a hook must be callable as hook(tensor, hook=...); got {hook!r}")
        fns, handles = (self._fwd_fns, self.fwd_hooks) if dir == "fwd" else (self._bwd_fns, self.bwd_hooks)
        handle = RemovableHandle(fns)
        fns[handle.id] = self._bind(hook, alias_names, one_tuple=dir == "bwd")
        if prepend:
            fns.move_to_end(handle.id, last=False)
        lens_handle = LensHandle(handle, is_permanent, level, hook)
        if prepend:
            handles.insert(0, lens_handle)
        else:
            handles.append(lens_handle)

    def _bind(
        self, hook: HookFunction, alias_names: Optional[Sequence[str]], *, one_tuple: bool = False
    ) -> Callable[[Tensor], Optional[Tensor]]:
        """`hook` as a function of the tensor alone, with reshape and aliases applied (and,
        with `one_tuple`, a returned ``(tensor,)`` taken as the tensor: a backward hook's)."""
        targets = [_AliasedHookPoint(self, n) for n in alias_names] if alias_names else [self]

        def apply(tensor: Tensor) -> Optional[Tensor]:
            conversion = self.hook_conversion
            value = tensor if conversion is None else conversion.convert(tensor)
            replaced = False
            for target in targets:
                result = hook(value, hook=target)
                if one_tuple and isinstance(result, tuple) and len(result) == 1:
                    result = result[0]
                if result is not None:
                    value, replaced = result, True
            if not replaced:
                return None
            return value if conversion is None else conversion.revert(value)

        return apply

    @property
    def active(self) -> bool:
        """Whether any hook, forward or backward, is attached."""
        return bool(self.fwd_hooks or self.bwd_hooks)

    def __call__(self, x: Tensor) -> Tensor:
        if self._forward_hooks or self._forward_pre_hooks or self._backward_hooks:
            x = super().__call__(x)  # hooks registered with torch directly: let nn.Module run them
        if self._fwd_fns:
            x = self.run_fwd_hooks(x)
        if self._bwd_fns and isinstance(x, Tensor) and x.requires_grad:
            # A fresh autograd node: the backward hooks see only the gradient that flows back
            # through this hook point, not that of other users of the same input tensor.
            x = x.view_as(x)
            x.register_hook(self.run_bwd_hooks)
        return x

    def run_fwd_hooks(self, x: Tensor) -> Tensor:
        """The forward hooks' result for `x`, each hook seeing the last one's result."""
        return self._run(self._fwd_fns, x)

    def run_bwd_hooks(self, grad: Tensor) -> Tensor:
        """The backward hooks' result for the gradient `grad`, each seeing the last result."""
        return self._run(self._bwd_fns, grad)

    @staticmethod
    def _run(fns: OrderedDict, value: Tensor) -> Tensor:
        for apply in list(fns.values()):
            result = apply(value)
            if result is not None:
                value = result
        return value

    def forward(self, x: Tensor) -> Tensor:
        return x

    def _handles(self, dir: DirectionOrBoth) -> list[LensHandle]:
        check_dir(dir, ("fwd", "bwd", "both"))
        if dir == "fwd":
            return self.fwd_hooks
        if dir == "bwd":
            return self.bwd_hooks
        return self.fwd_hooks + self.bwd_hooks

    def remove_hooks(
        self,
        dir: DirectionOrBoth = "fwd",
        including_permanent: bool = False,
        level: Optional[int] = None,
    ) -> None:
        """Remove hooks in `dir`: all of them if including_permanent, else the non-permanent
        ones of `level` (every level when None)."""
        check_dir(dir, ("fwd", "bwd", "both"))
        if not (self.fwd_hooks or self.bwd_hooks):
            return

        def keep(handle: LensHandle) -> bool:
            return not removed(permanent=handle.is_permanent, level=handle.context_level, asked=level, including_permanent=including_permanent)

        if dir in ("fwd", "both") and self.fwd_hooks:
            self._remove_where(self.fwd_hooks, keep)
        if dir in ("bwd", "both") and self.bwd_hooks:
            self._remove_where(self.bwd_hooks, keep)

    @staticmethod
    def _remove_where(handles: list[LensHandle], keep: Callable[[LensHandle], bool]) -> None:
        kept = []
        for handle in handles:
            if keep(handle):
                kept.append(handle)
            else:
                handle.hook.remove()
        handles[:] = kept  # in place: assigning a module attribute goes through nn.Module.__setattr__

    def has_hooks(
        self,
        dir: DirectionOrBoth = "both",
        including_permanent: bool = True,
        level: Optional[int] = None,
    ) -> bool:
        """Whether any hook in `dir` is attached (permanent ones counted if asked; of `level`
        only, when given)."""
        return any(
            (including_permanent or not h.is_permanent) and (level is None or h.context_level == level)
            for h in self._handles(dir)
        )

    def clear_context(self) -> None:
        if self.ctx:
            self.ctx = {}

    def layer(self) -> int:
        """The layer index of a hook point named ``blocks.<layer>.…``."""
        if self.name is None:
            raise ValueError("this hook point has no name yet: HookedRootModule.setup() names it")
        return layer_of(self.name)

    def enable_reshape(self, hook_conversion: Optional[TensorConversion] = None) -> None:
        """Hooks see ``hook_conversion.convert(x)``; a returned tensor goes back through
        ``revert``. None turns reshaping off."""
        if hook_conversion is not None and not all(
            callable(getattr(hook_conversion, m, None)) for m in ("convert", "revert")
        ):
            raise TypeError(
                f"enable_reshape needs an object with convert() and revert(); got {hook_conversion!r}"
            )
        self.hook_conversion = hook_conversion

    def extra_repr(self) -> str:
        """Empty for an unnamed point without hooks, so that repr(HookPoint()) is "HookPoint()"
        as in TransformerLens."""
        parts = [] if self.name is None else [f"name={self.name!r}"]
        parts += [f"{len(hs)} {d}" for d, hs in (("fwd", self.fwd_hooks), ("bwd", self.bwd_hooks)) if hs]
        return ", ".join(parts)

