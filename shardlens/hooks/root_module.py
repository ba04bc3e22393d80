"""HookedRootModule: TransformerLens' root module for any nn.Module, a runner in one process.

Its hook points are found by name; hooks and specs are installed on them directly, and a run
(`run(request)`) calls the module's own forward with a fresh per-run context that the
installed specs read from and store into. The TransformerLens surface comes from `HookAPI`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from shardlens.hooks.hook_api import HookAPI, HookList, Scope, by_point
from shardlens.hooks.hook_point import DirectionOrBoth, HookPoint, LensHandle
from shardlens.hooks.names import NamesFilter
from shardlens.hooks.ops import Code, RunContext
from shardlens.hooks.run import RUN_LEVEL, RunRequest, RunResult
from shardlens.hooks.slice import Slice, SliceInput
from shardlens.hooks.specs import HookSpec, SpecHook
from shardlens.tables.axes import PER_HEAD_SUFFIXES


def installed_specs(hook_dict: dict[str, HookPoint]) -> list[tuple[str, HookSpec]]:
    """Every hook attached to these hook points, as (name, spec): a spec's hook as its op,
    a plain function as sl.ops.Code(fn); each with its level and permanence."""
    found = []
    for name, hook_point in hook_dict.items():
        for direction, handles in (("fwd", hook_point.fwd_hooks), ("bwd", hook_point.bwd_hooks)):
            found += [(name, _spec_of(name, direction, handle)) for handle in handles]
    return found


def _spec_of(name: str, direction: str, handle: LensHandle) -> HookSpec:
    hook = handle.user_hook
    level = None if handle.is_permanent else handle.context_level
    if isinstance(hook, SpecHook):
        return dataclasses.replace(hook.spec, points=name, level=level)
    return HookSpec(name, Code(hook), dir=direction, level=level, permanent=handle.is_permanent)


class HookIntrospectionMixin:
    """`list_hooks()` for any class with a `hook_dict` (attribute or property), in the shape
    every runner's list_hooks has: specs by hook point name."""

    def list_hooks(self, name_filter: NamesFilter = None, dir: DirectionOrBoth = "both", including_permanent: bool = True) -> dict[str, list[HookSpec]]:
        return by_point(installed_specs(getattr(self, "hook_dict")), name_filter, dir, including_permanent)


@dataclass(eq=False)
class CachingHook:
    """The hook get_caching_hooks hands out: stores a detached copy of what it sees in `cache`."""

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
                raise ValueError(f"remove_batch_dim=True needs a batch of one example; {hook.name} has a batch of {value.shape[0]}")
            value = value[0]
        if self.pos_slice.mode != "identity":
            pos_dim = -3 if hook.name.endswith(PER_HEAD_SUFFIXES) else -2  # TransformerLens' convention
            if value.ndim >= -pos_dim:
                value = self.pos_slice.apply(value, dim=pos_dim)
        self.cache[hook.name + "_grad" if self.grad else hook.name] = value


class HookedRootModule(HookAPI, nn.Module):
    """An nn.Module whose HookPoints can be hooked by name, with TransformerLens' API.

    Call `setup()` at the end of `__init__`, after every submodule exists: it names each
    module and builds `mod_dict` and `hook_dict`. Runs (run_with_cache, run_with_hooks, ...)
    call the module's forward with their input and keyword arguments as given.

    Hooks are global state on the model; prefer the scoped forms (`hooks()`,
    `run_with_hooks`, `run_with_cache`), which remove what they added when they end.
    """

    name: Optional[str]
    mod_dict: dict[str, nn.Module]
    hook_dict: dict[str, HookPoint]
    takes_tokens = False  # its forward gets a run's input and keywords as they are

    def __init__(self, *args: Any):
        super().__init__()
        self.name = None
        self.is_caching = False
        self.context_level = 0
        self.config = None
        self.mod_dict = {}
        self.hook_dict = {}
        self._extra_points: dict[str, HookPoint] = {}  # hook points made on request, not submodules
        self.run_context = RunContext(self)  # what specs without a store of their own use: the run's

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

    # ------------------------------------------------------------------ the runner's primitives

    def install(self, level: Optional[int], specs: Any, scope: Scope = Scope()) -> None:
        """Attach each spec's op at the hook points it selects, with the scope's store and
        sources (a plain module's forward, called directly, runs outside any run)."""
        for spec in specs:
            self._install_spec(spec, scope, level)

    def _install_spec(self, spec: HookSpec, scope: Scope, level: Optional[int]) -> None:
        self._prepare_names(list(spec.points) if isinstance(spec.points, tuple) else spec.points)
        names = spec.resolve(list(self.hook_dict))
        for name in spec.created_names(names):
            self.add_hook_point(name)
        self.check_ops(spec, names)
        hook = SpecHook(spec, self, scope.store, scope.sources)
        for name in names:
            self.check_and_add_hook(
                self.hook_dict[name], name, hook, dir=spec.dir, is_permanent=spec.permanent,
                level=None if spec.permanent else level, prepend=spec.prepend,
            )

    def remove(
        self, level: Optional[int], *, including_permanent: bool = False, direction: DirectionOrBoth = "both",
        clear_contexts: bool = False,
    ) -> None:
        """Remove the non-permanent hooks of `level` (of every level when None; permanent
        ones too with including_permanent)."""
        if clear_contexts:
            self.clear_contexts()
        for hook_point in self.hook_points():
            hook_point.remove_hooks(direction, including_permanent=including_permanent, level=level)
        self.is_caching = False

    def installed(self) -> list[tuple[str, HookSpec]]:
        return installed_specs(self.hook_dict)

    def run(self, request: RunRequest) -> RunResult:
        """One run: the request's own specs at the run level (above every hooks() level), a
        fresh context that every spec without a store of its own reads from and stores into,
        and the backward pass when the request needs one. A `write` destination gets what was
        read as one part per hook point."""
        ctx = RunContext(self, {}, dict(request.sources))
        previous, self.run_context = self.run_context, ctx  # as running(ctx), inline: once per run, on every generation step
        try:
            if request.specs:
                self.install(RUN_LEVEL, request.specs)
            with self.activation_grads_only() if request.needs_grad and not request.weight_grads else nullcontext():
                output, objective, mask = self._compute(request)
            if request.needs_grad:
                _backpropagate(objective)
        finally:
            self.run_context = previous
            if request.specs:
                self.remove(RUN_LEVEL)
        if request.write is not None:
            return RunResult(output, parts=tuple(request.write.write(ctx.cache, mask)), attention_mask=mask)
        return RunResult(output, ctx.cache, attention_mask=mask)

    @contextmanager
    def running(self, ctx: RunContext) -> Iterator[None]:
        """Specs without a store of their own read from and store into `ctx` in this block
        (a run's, or on a stage worker one batch's, forward or backward)."""
        previous, self.run_context = self.run_context, ctx
        try:
            yield
        finally:
            self.run_context = previous

    @contextmanager
    def activation_grads_only(self) -> Iterator[None]:
        """A forward in this block records gradients of activations only: every parameter is
        frozen (so backward computes no weight gradient and leaves .grad alone), and the
        outputs of the modules where the graph starts (`_graph_entries`: the embeddings)
        become leaves that require grad. A module that does not know where its graph starts
        keeps its parameters as they are (its own forward decides what requires grad)."""
        entries = self._graph_entries()
        if entries is None:
            yield
            return
        trainable = [p for p in self.parameters() if p.requires_grad]
        for parameter in trainable:
            parameter.requires_grad_(False)
        # prepend: the leaf comes before any hook point tapped into the module's output
        handles = [module.register_forward_hook(_leaf_output, prepend=True) for module in entries]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            for parameter in trainable:
                parameter.requires_grad_(True)

    def _graph_entries(self) -> Optional[list[nn.Module]]:
        """The modules whose outputs start the graph of a run (see activation_grads_only);
        None where that is not known (a plain module)."""
        return None

    def _compute(self, request: RunRequest) -> tuple[Any, Optional[Tensor], Optional[Tensor]]:
        """(output, what a gradient run backpropagates, attention mask) of the forward pass:
        here the module's own forward of the input as it is, backpropagated from its output."""
        if request.kv_cache is not None or request.resume is not None or request.attention_mask is not None:
            raise ValueError(
                f"{type(self).__name__} runs its own forward: a key/value cache, resume and attention_mask need a "
                "HookedModel of a registered architecture (or pass them as the forward's own arguments)"
            )
        output = self(request.input, **request.forward_kwargs)
        return output, output, None

    # ------------------------------------------------------------------ TransformerLens' extras

    def clear_contexts(self) -> None:
        for hook_point in self.hook_points():
            hook_point.clear_context()

    def remove_all_hook_fns(self, direction: DirectionOrBoth = "both", including_permanent: bool = False, level: Optional[int] = None) -> None:
        self.remove(level, including_permanent=including_permanent, direction=direction)

    def check_hooks_to_add(
        self, hook_point: HookPoint, hook_point_name: str, hook: Any, dir: str = "fwd", is_permanent: bool = False,
        prepend: bool = False,
    ) -> None:
        """Override to refuse some hooks; raise to refuse. Accepts every hook by default."""

    def check_and_add_hook(
        self, hook_point: HookPoint, hook_point_name: str, hook: Any, dir: str = "fwd", is_permanent: bool = False,
        level: Optional[int] = None, prepend: bool = False,
    ) -> None:
        """Run check_hooks_to_add, then attach the hook to `hook_point`."""
        self.check_hooks_to_add(hook_point, hook_point_name, hook, dir=dir, is_permanent=is_permanent, prepend=prepend)
        hook_point.add_hook(hook, dir=dir, is_permanent=is_permanent, level=level, prepend=prepend)

    def get_caching_hooks(
        self, names_filter: NamesFilter = None, incl_bwd: bool = False, device: Union[str, torch.device, None] = None,
        remove_batch_dim: bool = False, cache: Optional[dict] = None, pos_slice: Union[Slice, SliceInput] = None,
    ) -> tuple[dict, HookList, HookList]:
        """Caching hooks for the selected hook points, not yet attached.

        Returns:
            (cache, fwd_hooks, bwd_hooks): the dict the hooks fill (gradients under
            ``<name>_grad``), and the (name, hook) pairs to pass to hooks().
        """
        cache = {} if cache is None else cache
        options = dict(device=device, remove_batch_dim=remove_batch_dim, pos_slice=Slice.unwrap(pos_slice))
        self.is_caching = True
        names = self._names(names_filter)
        fwd = [(name, CachingHook(cache, grad=False, **options)) for name in names]
        bwd = [(name, CachingHook(cache, grad=True, **options)) for name in names] if incl_bwd else []
        return cache, fwd, bwd

    def add_caching_hooks(
        self, names_filter: NamesFilter = None, incl_bwd: bool = False, device: Union[str, torch.device, None] = None,
        remove_batch_dim: bool = False, cache: Optional[dict] = None,
    ) -> dict:
        """Attach caching hooks (until reset_hooks) and return the dict they fill."""
        cache, fwd, bwd = self.get_caching_hooks(names_filter, incl_bwd, device, remove_batch_dim, cache)
        for direction, pairs in (("fwd", fwd), ("bwd", bwd)):
            for name, hook in pairs:
                self.hook_dict[name].add_hook(hook, dir=direction)
        return cache


def _leaf_output(module: nn.Module, args: tuple, output: Any) -> Any:
    """A module's output as a leaf that requires grad (when gradients are being recorded)."""
    if torch.is_grad_enabled() and isinstance(output, Tensor) and output.is_floating_point():
        return output.detach().requires_grad_(True)
    return output


def _backpropagate(objective: Any) -> None:
    if not isinstance(objective, Tensor) or objective.numel() != 1:
        shape = tuple(objective.shape) if isinstance(objective, Tensor) else type(objective).__name__
        raise ValueError(
            "incl_bwd=True backpropagates from the model's output, which must be a scalar "
            f"(e.g. return_type='loss'); got {shape}"
        )
    if not objective.requires_grad:
        raise ValueError(
            "incl_bwd=True needs an output that requires grad; it was computed under "
            "torch.no_grad() or from parameters and inputs that require none"
        )
    objective.backward()
