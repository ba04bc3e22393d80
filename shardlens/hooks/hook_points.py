"""HookPoint and HookedRootModule: TransformerLens' hook API for any nn.Module.

A hook point is a named identity module. Hooks attach to it in one of two directions:
``"fwd"`` hooks see the activation as the forward pass goes through; ``"bwd"`` hooks see the
gradient of that activation as the backward pass goes through. Either kind may return None
(leave the value as it is) or a tensor of the same shape that replaces it.

Code written against ``transformer_lens.hook_points`` runs unchanged against these names.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Protocol, Union

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from shardlens.errors import HookNameError
from shardlens.hooks.names import NamesFilter, is_glob, names_predicate
from shardlens.hooks.ops import RunContext
from shardlens.hooks.slice import Slice, SliceInput
from shardlens.hooks.specs import HookSpec, SpecHook
from shardlens.tables import ActivationCache
from shardlens.tables.axes import PER_HEAD_SUFFIXES, layer_index

Direction = Literal["fwd", "bwd"]
DirectionOrBoth = Literal["fwd", "bwd", "both"]
HookFunction = Callable[..., Optional[Tensor]]  # fn(tensor, *, hook) -> Tensor | None
HookTarget = Union[str, Callable[[str], bool]]  # a hook name, a glob, or a predicate on names



def _check_dir(dir: str, allowed: tuple[str, ...]) -> None:
    if dir not in allowed:
        raise ValueError(f"dir must be one of {', '.join(map(repr, allowed))}; got {dir!r}")


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
        _check_dir(dir, ("fwd", "bwd"))
        if not callable(hook):
            raise TypeError(f"a hook must be callable as hook(tensor, hook=...); got {hook!r}")
        fns, handles = (self._fwd_fns, self.fwd_hooks) if dir == "fwd" else (self._bwd_fns, self.bwd_hooks)
        handle = RemovableHandle(fns)
        fns[handle.id] = self._bind(hook, alias_names)
        if prepend:
            fns.move_to_end(handle.id, last=False)
        lens_handle = LensHandle(handle, is_permanent, level, hook)
        if prepend:
            handles.insert(0, lens_handle)
        else:
            handles.append(lens_handle)

    def _bind(
        self, hook: HookFunction, alias_names: Optional[Sequence[str]]
    ) -> Callable[[Tensor], Optional[Tensor]]:
        """`hook` as a function of the tensor alone, with reshape and aliases applied."""
        targets = [_AliasedHookPoint(self, n) for n in alias_names] if alias_names else [self]

        def apply(tensor: Tensor) -> Optional[Tensor]:
            conversion = self.hook_conversion
            value = tensor if conversion is None else conversion.convert(tensor)
            replaced = False
            for target in targets:
                result = hook(value, hook=target)
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
        _check_dir(dir, ("fwd", "bwd", "both"))
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
        _check_dir(dir, ("fwd", "bwd", "both"))
        if not (self.fwd_hooks or self.bwd_hooks):
            return

        def keep(handle: LensHandle) -> bool:
            if including_permanent:
                return False
            return handle.is_permanent or (level is not None and handle.context_level != level)

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
        parts = [f"name={self.name!r}"]
        parts += [f"{len(hs)} {d}" for d, hs in (("fwd", self.fwd_hooks), ("bwd", self.bwd_hooks)) if hs]
        return ", ".join(parts)


class HookIntrospectionMixin:
    """`list_hooks()` for any class with a `hook_dict` (attribute or property)."""

    def list_hooks(
        self,
        name_filter: NamesFilter = None,
        dir: DirectionOrBoth = "both",
        including_permanent: bool = True,
    ) -> dict[str, list[LensHandle]]:
        """Attached hooks by hook point name; hook points without hooks are left out.

        Args:
            name_filter: a name, glob, list of names, or predicate; None for every point.
            dir: "fwd", "bwd" or "both".
            including_permanent: False leaves permanent hooks out.
        """
        hook_dict: dict[str, HookPoint] = getattr(self, "hook_dict")
        selected = names_predicate(name_filter, hook_dict)
        listed = {}
        for name, hook_point in hook_dict.items():
            if selected(name):
                handles = [h for h in hook_point._handles(dir) if including_permanent or not h.is_permanent]
                if handles:
                    listed[name] = handles
        return listed


@dataclass(eq=False)
class CachingHook:
    """The hook run_with_cache attaches: stores a detached copy of what it sees in `cache`."""

    cache: dict = field(repr=False)
    grad: bool = False
    device: Union[str, torch.device, None] = None
    remove_batch_dim: bool = False
    pos_slice: Slice = field(default_factory=Slice)

    def __call__(self, tensor: Tensor, hook: HookPoint) -> None:
        value = tensor.detach()
        if self.device is not None:
            value = value.to(self.device)
        if self.remove_batch_dim:
            if value.shape[0] != 1:
                raise ValueError(
                    f"remove_batch_dim=True needs a batch of one example; {hook.name} has a "
                    f"batch of {value.shape[0]}"
                )
            value = value[0]
        if self.pos_slice.mode != "identity":
            pos_dim = -3 if hook.name.endswith(PER_HEAD_SUFFIXES) else -2  # TransformerLens' convention
            if value.ndim >= -pos_dim:
                value = self.pos_slice.apply(value, dim=pos_dim)
        self.cache[hook.name + "_grad" if self.grad else hook.name] = value


HookList = Sequence[Union[tuple[HookTarget, HookFunction], HookSpec]]  # (name, fn) pairs and specs


def _hook_pair(item: Any, argument: str) -> tuple[HookTarget, HookFunction]:
    if not (isinstance(item, (tuple, list)) and len(item) == 2):
        raise TypeError(f"{argument} takes (name_or_predicate, hook_fn) pairs or sl.HookSpec; got {item!r}")
    return item[0], item[1]


class HookedRootModule(HookIntrospectionMixin, nn.Module):
    """An nn.Module whose HookPoints can be hooked by name, with TransformerLens' API.

    Call `setup()` at the end of `__init__`, after every submodule exists: it names each
    module and builds `mod_dict` and `hook_dict`.

    Hooks are global state on the model; prefer the scoped forms (`hooks()`,
    `run_with_hooks`, `run_with_cache`), which remove what they added when they end.
    """

    name: Optional[str]
    mod_dict: dict[str, nn.Module]
    hook_dict: dict[str, HookPoint]

    def __init__(self, *args: Any):
        super().__init__()
        self.name = None
        self.is_caching = False
        self.context_level = 0
        self.mod_dict = {}
        self.hook_dict = {}
        self._extra_points: dict[str, HookPoint] = {}  # hook points made on request, not submodules

    def setup(self) -> None:
        """Name every submodule and index the modules and hook points by name."""
        self.mod_dict = {}
        self.hook_dict = dict(self._extra_points)
        for name, module in self.named_modules():
            if name == "":
                continue
            try:
                module.name = name
            except AttributeError:  # a read-only `name` property of some third-party module
                pass
            self.mod_dict[name] = module
            if isinstance(module, HookPoint):
                self.hook_dict[name] = module

    def hook_points(self) -> Iterable[HookPoint]:
        return self.hook_dict.values()

    def hook_names(self) -> list[str]:
        """The names of every hook point, in module order."""
        return list(self.hook_dict)

    def add_hook_point(self, name: str) -> HookPoint:
        """The hook point `name`, made when it does not exist yet (as a Splice's sub points are).
        It fires when whatever computes that quantity calls it."""
        hook_point = self.hook_dict.get(name)
        if hook_point is None:
            hook_point = HookPoint()
            hook_point.name = name
            self._extra_points[name] = self.hook_dict[name] = hook_point
        return hook_point

    def _prepare_names(self, names: Any) -> None:
        """Make the hook points that `names` asks for and that are made on request (none here)."""

    def remove_all_hook_fns(
        self,
        direction: DirectionOrBoth = "both",
        including_permanent: bool = False,
        level: Optional[int] = None,
    ) -> None:
        for hook_point in self.hook_points():
            hook_point.remove_hooks(direction, including_permanent=including_permanent, level=level)

    def clear_contexts(self) -> None:
        for hook_point in self.hook_points():
            hook_point.clear_context()

    def reset_hooks(
        self,
        clear_contexts: bool = True,
        direction: DirectionOrBoth = "both",
        including_permanent: bool = False,
        level: Optional[int] = None,
    ) -> None:
        """Remove non-permanent hooks (of `level` only, when given) and clear hook contexts."""
        if clear_contexts:
            self.clear_contexts()
        self.remove_all_hook_fns(direction, including_permanent, level=level)
        self.is_caching = False

    def has_hooks(
        self,
        dir: DirectionOrBoth = "both",
        including_permanent: bool = True,
        level: Optional[int] = None,
    ) -> bool:
        """Whether any hook point has a hook matching these conditions."""
        return any(hp.has_hooks(dir, including_permanent, level) for hp in self.hook_points())

    def check_hooks_to_add(
        self,
        hook_point: HookPoint,
        hook_point_name: str,
        hook: HookFunction,
        dir: Direction = "fwd",
        is_permanent: bool = False,
        prepend: bool = False,
    ) -> None:
        """Override to refuse some hooks; raise to refuse. Accepts every hook by default."""

    def check_and_add_hook(
        self,
        hook_point: HookPoint,
        hook_point_name: str,
        hook: HookFunction,
        dir: Direction = "fwd",
        is_permanent: bool = False,
        level: Optional[int] = None,
        prepend: bool = False,
    ) -> None:
        """Run check_hooks_to_add, then attach the hook to `hook_point`."""
        self.check_hooks_to_add(
            hook_point, hook_point_name, hook, dir=dir, is_permanent=is_permanent, prepend=prepend
        )
        hook_point.add_hook(hook, dir=dir, is_permanent=is_permanent, level=level, prepend=prepend)

    def _select(self, target: Union[HookTarget, Sequence[str]]) -> list[tuple[str, HookPoint]]:
        """The hook points a name, glob, list of names or predicate selects."""
        if not (isinstance(target, str) and target in self.hook_dict):
            self._prepare_names(target)
        if isinstance(target, str) and not is_glob(target):
            hook_point = self.hook_dict.get(target)
            if hook_point is None:
                raise HookNameError(target, self.hook_dict)
            return [(target, hook_point)]
        selected = names_predicate(target, self.hook_dict)
        return [(name, hp) for name, hp in self.hook_dict.items() if selected(name)]

    def add_hook(
        self,
        name: HookTarget,
        hook: HookFunction,
        dir: Direction = "fwd",
        is_permanent: bool = False,
        level: Optional[int] = None,
        prepend: bool = False,
    ) -> None:
        """Attach `hook` to the hook point `name`, or to every point a glob or predicate selects.

        An unknown name raises HookNameError listing the closest existing names.
        """
        _check_dir(dir, ("fwd", "bwd"))
        for hook_point_name, hook_point in self._select(name):
            self.check_and_add_hook(
                hook_point, hook_point_name, hook, dir=dir, is_permanent=is_permanent, level=level, prepend=prepend
            )

    def add_perma_hook(self, name: HookTarget, hook: HookFunction, dir: Direction = "fwd") -> None:
        self.add_hook(name, hook, dir=dir, is_permanent=True)

    @contextmanager
    def hooks(
        self,
        fwd_hooks: HookList = (),
        bwd_hooks: HookList = (),
        reset_hooks_end: bool = True,
        clear_contexts: bool = False,
        *,
        store: Optional[dict] = None,
        sources: Optional[dict] = None,
    ) -> Iterator["HookedRootModule"]:
        """A block whose hooks are removed when it ends, also when it raised.

        Each block is one context level deeper; leaving it removes only the hooks of its level,
        so hooks of enclosing blocks and permanent hooks stay.

        Args:
            fwd_hooks, bwd_hooks: (name_or_predicate, fn) pairs and sl.HookSpec (a spec's own
                `dir` decides its direction).
            store: a dict where reading ops (sl.ops.Cache, ...) put what they read.
            sources: earlier runs' caches by name, for sl.ops.Patch(from_cache=name).

        Example:
            >>> with model.hooks(fwd_hooks=[("blocks.0.hook_resid_post", fn)]):
            ...     loss = model(tokens, return_type="loss")
        """
        ctx = RunContext(self, store, dict(sources or {}))
        self.context_level += 1
        try:
            for direction, items, argument in (("fwd", fwd_hooks, "fwd_hooks"), ("bwd", bwd_hooks, "bwd_hooks")):
                for item in items:
                    if isinstance(item, HookSpec):
                        self._install_spec(item, ctx, level=self.context_level)
                    else:
                        name, hook = _hook_pair(item, argument)
                        self.add_hook(name, hook, dir=direction, level=self.context_level)
            yield self
        finally:
            if reset_hooks_end:
                self.reset_hooks(clear_contexts, including_permanent=False, level=self.context_level)
            self.context_level -= 1

    def add_spec(self, spec: HookSpec, *, store: Optional[dict] = None, sources: Optional[dict] = None) -> None:
        """Install `spec` at its own level (or as permanent), outside any hooks() block."""
        self._install_spec(spec, RunContext(self, store, dict(sources or {})), level=spec.level)

    def _install_spec(self, spec: HookSpec, ctx: RunContext, level: Optional[int]) -> None:
        self._prepare_names(spec.points if not isinstance(spec.points, tuple) else list(spec.points))
        names = spec.resolve(list(self.hook_dict))
        if spec.op.reads and ctx.cache is None:
            raise ValueError(
                f"{type(spec.op).__name__} reads activations but this run keeps no results: use "
                "run_with_cache, or pass store={} to hooks() / run_with_hooks()"
            )
        for name in names:
            spec.op.check(name, self)
        hook = SpecHook(spec.op, ctx)
        for name in names:
            self.add_hook(
                name, hook, dir=spec.dir, is_permanent=spec.permanent,
                level=None if spec.permanent else level, prepend=spec.prepend,
            )

    def run_with_hooks(
        self,
        *model_args: Any,
        fwd_hooks: HookList = (),
        bwd_hooks: HookList = (),
        reset_hooks_end: bool = True,
        clear_contexts: bool = False,
        store: Optional[dict] = None,
        sources: Optional[dict] = None,
        **model_kwargs: Any,
    ) -> Any:
        """Run the model once with temporary hooks and specs (see hooks() for store / sources).

        Only the forward pass runs here: backward hooks fire on a later ``.backward()``, so
        they need ``reset_hooks_end=False`` (then call reset_hooks() yourself).
        """
        if bwd_hooks and reset_hooks_end:
            warnings.warn(
                "run_with_hooks removes its hooks when the forward pass ends (reset_hooks_end=True), "
                "so the bwd_hooks given will never fire; pass reset_hooks_end=False and call "
                "reset_hooks() after your backward pass",
                stacklevel=2,
            )
        with self.hooks(fwd_hooks, bwd_hooks, reset_hooks_end, clear_contexts, store=store, sources=sources):
            return self(*model_args, **model_kwargs)

    def get_caching_hooks(
        self,
        names_filter: NamesFilter = None,
        incl_bwd: bool = False,
        device: Union[str, torch.device, None] = None,
        remove_batch_dim: bool = False,
        cache: Optional[dict] = None,
        pos_slice: Union[Slice, SliceInput] = None,
    ) -> tuple[dict, list, list]:
        """Caching hooks for the selected hook points, not yet attached.

        Returns:
            (cache, fwd_hooks, bwd_hooks): the dict the hooks fill (gradients under
            ``<name>_grad``), and the (name, hook) pairs to pass to hooks().
        """
        cache = {} if cache is None else cache
        self._prepare_names(names_filter)
        selected = names_predicate(names_filter, self.hook_dict)
        options = dict(device=device, remove_batch_dim=remove_batch_dim, pos_slice=Slice.unwrap(pos_slice))
        self.is_caching = True
        names = [name for name in self.hook_dict if selected(name)]
        fwd = [(name, CachingHook(cache, grad=False, **options)) for name in names]
        bwd = [(name, CachingHook(cache, grad=True, **options)) for name in names] if incl_bwd else []
        return cache, fwd, bwd

    def add_caching_hooks(
        self,
        names_filter: NamesFilter = None,
        incl_bwd: bool = False,
        device: Union[str, torch.device, None] = None,
        remove_batch_dim: bool = False,
        cache: Optional[dict] = None,
    ) -> dict:
        """Attach caching hooks (until reset_hooks) and return the dict they fill."""
        cache, fwd, bwd = self.get_caching_hooks(names_filter, incl_bwd, device, remove_batch_dim, cache)
        for direction, pairs in (("fwd", fwd), ("bwd", bwd)):
            for name, hook in pairs:
                self.hook_dict[name].add_hook(hook, dir=direction)
        return cache

    def run_with_cache(
        self,
        *model_args: Any,
        names_filter: NamesFilter = None,
        device: Union[str, torch.device, None] = None,
        remove_batch_dim: bool = False,
        incl_bwd: bool = False,
        reset_hooks_end: bool = True,
        clear_contexts: bool = False,
        pos_slice: Union[Slice, SliceInput] = None,
        fwd_hooks: HookList = (),
        bwd_hooks: HookList = (),
        sources: Optional[dict] = None,
        **model_kwargs: Any,
    ) -> tuple[Any, ActivationCache]:
        """Run the model and return (output, ActivationCache of the selected hook points).

        Args:
            names_filter: a name, glob, list, or predicate; None caches every hook point.
            device: where to put cached tensors (default: where they were computed).
            remove_batch_dim: drop the batch axis (the batch must hold one example).
            incl_bwd: also backpropagate from the output, which must be a scalar (e.g.
                return_type="loss"), and cache gradients as ``<name>_grad``.
            pos_slice: keep only these positions (TransformerLens Slice; an int keeps the axis).
            fwd_hooks, bwd_hooks: hooks and specs active during the run, before the caching
                hooks (so the cache sees their edits); what reading specs read lands in the
                returned cache too. names_filter=[] caches nothing else.
            sources: earlier runs' caches by name, for sl.ops.Patch(from_cache=name).

        Example:
            >>> logits, cache = model.run_with_cache(tokens, names_filter="blocks.*.hook_resid_post")
        """
        cache: dict = {}
        # The given hooks and specs first (a Splice makes hook points the filter may name),
        # then the caching hooks, one level deeper, so that they see the edits.
        with self.hooks(fwd_hooks, bwd_hooks, reset_hooks_end, clear_contexts, store=cache, sources=sources):
            _, fwd, bwd = self.get_caching_hooks(
                names_filter, incl_bwd, device, remove_batch_dim=remove_batch_dim, cache=cache, pos_slice=pos_slice
            )
            with self.hooks(fwd, bwd, reset_hooks_end, clear_contexts):
                out = self(*model_args, **model_kwargs)
                if incl_bwd:
                    _backward_from_scalar(out)
        return out, ActivationCache(cache, **self._cache_context())

    def _cache_context(self) -> dict:
        """What the cache of the last run should know besides its tensors (ActivationCache's
        keyword arguments); models with attention masks or a readout say so here."""
        return {}


def _backward_from_scalar(out: Any) -> None:
    if not isinstance(out, Tensor) or out.numel() != 1:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(
            "incl_bwd=True backpropagates from the model's output, which must be a scalar "
            f"(e.g. return_type='loss'); got {shape}"
        )
    if not out.requires_grad:
        raise ValueError(
            "incl_bwd=True needs an output that requires grad; it was computed under "
            "torch.no_grad() or from parameters and inputs that require none"
        )
    out.backward()
