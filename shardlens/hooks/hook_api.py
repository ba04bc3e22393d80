"""TransformerLens' hook API, written once over a runner's few primitives.

A runner is anything that runs a hooked model: `HookedModel` in this process, a `Tracer`
over stage workers. It implements the primitives below; `HookAPI` builds the whole
TransformerLens-compatible surface on them (`hooks`, `add_hook`, `add_spec`,
`reset_hooks`, `list_hooks`, `has_hooks`, `run_with_hooks`, `run_with_cache`,
`write_cache`, `generate`, `to_tokens`, ...), so every runner behaves the same. Sweeps,
attribution and campaigns take any `Runner`.

Hooks are hook specs everywhere: a (name, fn) pair becomes ``HookSpec(name, sl.ops.Code(fn))``
(a runner that ships specs to other processes may refuse code; see `HookAPI._as_op`).
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Optional, Protocol, Union

import torch
from torch import Tensor

from shardlens.errors import HookNameError
from shardlens.hooks.generation import decode_loop
from shardlens.hooks.hook_point import Direction, DirectionOrBoth, check_dir, removed
from shardlens.hooks.names import NamesFilter, names_predicate
from shardlens.hooks.ops import Cache, CacheGrad, Code, Op
from shardlens.hooks.run import BaseRun, Destination, RunRequest, RunResult
from shardlens.hooks.shapes import cache_fields, canonical_shape
from shardlens.hooks.slice import Slice, SliceInput
from shardlens.hooks.specs import HookSpec
from shardlens.tables import ActivationCache

HookTarget = Union[str, Callable[[str], bool]]  # a hook name, a glob, or a predicate on names
HookList = Sequence[Union[tuple[HookTarget, Callable], HookSpec]]  # (name, fn or op) pairs and specs


@dataclass(frozen=True)
class Scope:
    """Where the reading specs of one hooks() block (or add_spec) put what they read
    (`store`), and the earlier runs' caches every run reads while they are installed, for
    Patch(from_cache=...) (`sources`)."""

    store: Optional[dict] = None
    sources: Optional[Mapping[str, Mapping[str, Tensor]]] = None


@dataclass(frozen=True)
class Scoped:
    """Specs installed with a scope, at a level (None: level-less or permanent)."""

    level: Optional[int]
    permanent: bool
    scope: Scope
    specs: tuple[HookSpec, ...]

    def removed_by(self, level: Optional[int], including_permanent: bool) -> bool:
        """Whether remove(level, including_permanent=...) removes these specs (as it does hooks)."""
        return removed(permanent=self.permanent, level=self.level, asked=level, including_permanent=including_permanent)


class Runner(Protocol):
    """What every runner has: these primitives, and the TransformerLens surface HookAPI
    builds on them (run_with_cache, run_with_hooks, hooks, ...)."""

    context_level: int
    takes_tokens: bool  # its runs take token ids, return_type, attention_mask, ... (a plain module's forward takes anything)
    architecture: Any  # the model's Architecture (None: module points only)
    config: Any  # the model's config

    def init_kv_cache(self, batch_size: int = 1) -> Any:
        """An empty key/value cache of this runner's kind (a context manager that frees it)."""

    def hook_names(self) -> list[str]: ...

    def install(self, level: Optional[int], specs: Sequence[HookSpec], scope: Scope = Scope()) -> None:
        """Install specs at a context level (None: permanent or level-less ones). A runner
        that runs its module's forward outside run() binds the scope to the specs; others
        may ignore it (HookAPI routes what runs read to the scopes' stores)."""

    def remove(self, level: Optional[int], *, including_permanent: bool = False, direction: DirectionOrBoth = "both", clear_contexts: bool = False) -> None:
        """Remove the specs of one level (None: of every level; permanent ones only if asked)."""

    def installed(self) -> list[tuple[str, HookSpec]]:
        """Every installed spec, once per hook point it acts at, with its level."""

    def run(self, request: RunRequest) -> RunResult: ...

    def run_variants(self, requests: Sequence[RunRequest]) -> list[RunResult]: ...


def token_ids(input: Any, attention_mask: Optional[Tensor], tokenizer: Callable[[], Any]) -> tuple[Tensor, Optional[Tensor]]:
    """Token ids [batch, pos] and the attention mask (None when there is none) of `input`:
    integer ids ([batch, pos] or [pos]) or text, encoded with padding by `tokenizer()` (which
    raises when there is no tokenizer)."""
    if isinstance(input, (str, list)) and (isinstance(input, str) or all(isinstance(s, str) for s in input)):
        encoded = tokenizer()(input, return_tensors="pt", padding=True)
        tokens, attention_mask = encoded["input_ids"], encoded["attention_mask"]
    elif isinstance(input, Tensor):
        if input.dtype.is_floating_point or input.dtype == torch.bool:
            raise TypeError(f"token ids must be an integer tensor; got dtype {input.dtype}")
        tokens = input[None] if input.ndim == 1 else input
        if tokens.ndim != 2:
            raise ValueError(f"token ids must be [batch, pos] or [pos]; got shape {tuple(input.shape)}")
    else:
        raise TypeError(f"input must be token ids (a tensor) or text; got {type(input).__name__}")
    if attention_mask is not None and attention_mask.shape != tokens.shape:
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, tokens {tuple(tokens.shape)}")
    return tokens, attention_mask


def by_point(installed: Sequence[tuple[str, HookSpec]], name_filter: NamesFilter, dir: str, including_permanent: bool) -> dict[str, list[HookSpec]]:
    """list_hooks' answer: the installed specs that pass the filters, by hook point."""
    check_dir(dir, ("fwd", "bwd", "both"))
    selected = names_predicate(name_filter, [name for name, _ in installed])
    listed: dict[str, list[HookSpec]] = {}
    for name, spec in installed:
        if selected(name) and dir in ("both", spec.dir) and (including_permanent or not spec.permanent):
            listed.setdefault(name, []).append(spec)
    return listed


def caching_specs(names: Sequence[str], incl_bwd: bool, pos_slice: Union[Slice, SliceInput] = None) -> tuple[HookSpec, ...]:
    """The specs that cache `names` (and, with incl_bwd, their gradients as ``<name>_grad``),
    keeping only the positions of `pos_slice` (TransformerLens' Slice; an int keeps the axis)."""
    if not names:
        return ()
    positions = _positions(Slice.unwrap(pos_slice))
    specs = (HookSpec(tuple(names), Cache(positions=positions)),)
    return specs + ((HookSpec(tuple(names), CacheGrad(positions=positions)),) if incl_bwd else ())


def _positions(pos_slice: Slice) -> Any:
    if pos_slice.mode == "identity":
        return None
    return pos_slice.slice.tolist() if pos_slice.mode == "array" else pos_slice.slice


class HookAPI:
    """TransformerLens' hook API over a runner's primitives (see `Runner`).

    A runner sets `context_level = 0`, `tokenizer` and `config` (its text config, or None),
    and implements hook_names, install, remove, installed and run (run_variants defaults to
    one run after another) and, for base runs, _keep_base. Options a runner may set:
    `backward_in_run` (its runs backpropagate themselves whenever a gradient spec is active,
    as a Tracer's must: its outputs come back without a graph).
    """

    context_level: int = 0
    backward_in_run: bool = False
    tokenizer: Any = None
    takes_tokens: bool = True  # runs take token ids (False: a plain module's forward takes anything)
    _scoped: tuple = ()  # Scoped: the specs installed now with a store or sources

    # ------------------------------------------------------------------ primitives' defaults

    def run_variants(self, requests: Sequence[RunRequest]) -> list[RunResult]:
        """The results of several runs, each with its own specs (one after another here)."""
        return [self.run(request) for request in requests]

    def _prepare_names(self, names: Any) -> None:
        """Make the hook points that `names` asks for and that are made on request (none here)."""

    def _as_op(self, hook: Any) -> Op:
        """The op of a hook given as an op or a Python function."""
        return hook if isinstance(hook, Op) else Code(hook)

    def _place(self, tokens: Tensor, mask: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
        """Token ids and mask where this runner takes them."""
        return tokens, mask

    def _cache_fields(self) -> dict:
        """ActivationCache's keyword arguments besides the tensors and the attention mask:
        what the model's architecture tells a cache (none for module points only)."""
        return cache_fields(getattr(self, "architecture", None))

    def check_ops(self, spec: HookSpec, names: Sequence[str]) -> None:
        """Refuse, before anything is installed, a hook point among `names` (those `spec`
        selects) that its op cannot act on (see Op.check)."""
        for name in names:
            spec.op.check(name, self)

    def _dataset_metadata(self) -> dict:
        """What every dataset part this runner writes records about the model."""
        return {}

    def hook_shape(self, name: str) -> Optional[tuple[int, ...]]:
        """The shape of a canonical hook point's tensors after [batch, pos], or None where it
        depends on the input (attention scores and patterns) or is unknown (module points)."""
        architecture = getattr(self, "architecture", None)
        if architecture is None or name.startswith("module:") or name not in self.hook_names():
            return None
        return canonical_shape(self.config, architecture, name)

    def shares(self, path: Union[str, os.PathLike]) -> bool:
        """Whether everything that writes for this runner reaches `path` as this process does
        (always, in one process)."""
        return True

    # ------------------------------------------------------------------ hooks

    def _spec(self, item: Any, direction: Direction, argument: str) -> HookSpec:
        """A spec for a hook list item. A predicate that selects no hook point is an error
        (TransformerLens attaches such a hook nowhere, silently)."""
        if isinstance(item, HookSpec):
            return item
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise TypeError(f"{argument} takes sl.HookSpec or (name_or_predicate, fn_or_op) pairs; got {item!r}")
        name, hook = item
        if not (callable(hook) or isinstance(hook, Op)):
            raise TypeError(f"a hook must be an op or callable as hook(tensor, hook=...); got {hook!r}")
        if callable(name) and not isinstance(name, str):
            predicate, name = name, tuple(n for n in self.hook_names() if name(n))
            if not name:
                raise HookNameError(getattr(predicate, "__name__", "<predicate>"), self.hook_names(), what="hook point matches the predicate")
        elif not isinstance(name, str):
            raise TypeError(f"a hook's target is a hook name, a glob or a predicate on names; got {name!r}")
        op = self._as_op(hook)
        if isinstance(hook, Op) and direction != op.direction and argument == "add_hook":
            direction = op.direction  # add_hook(name, sl.ops.CacheGrad()) needs no dir="bwd"
        return HookSpec(name, op, dir=direction)

    def _specs(self, items: HookList, direction: Direction, argument: str) -> list[HookSpec]:
        return [self._spec(item, direction, argument) for item in items]

    def _install_scoped(self, level: Optional[int], specs: Sequence[HookSpec], scope: Scope) -> None:
        """Install specs, remembering their scope: its sources go with every run while they
        are installed, and what they read goes to its store."""
        self.install(level, specs, scope)
        if specs and (scope.store is not None or scope.sources):
            self._scoped += tuple(Scoped(level, s.permanent, scope, (s,)) for s in specs)

    def _forget_scopes(self, level: Optional[int], including_permanent: bool) -> None:
        self._scoped = tuple(s for s in self._scoped if not s.removed_by(level, including_permanent))

    def add_hook(
        self, name: HookTarget, hook: Any, dir: Direction = "fwd", is_permanent: bool = False,
        level: Optional[int] = None, prepend: bool = False,
    ) -> None:
        """Attach `hook` (a function hook(tensor, hook=...) or an op) to the hook point `name`,
        or to every point a glob or predicate selects. An unknown name raises HookNameError
        listing the closest names."""
        check_dir(dir, ("fwd", "bwd"))
        spec = dataclasses.replace(self._spec((name, hook), dir, "add_hook"), permanent=is_permanent, prepend=prepend)
        self.install(None if is_permanent else level, [spec])

    def add_perma_hook(self, name: HookTarget, hook: Any, dir: Direction = "fwd") -> None:
        self.add_hook(name, hook, dir=dir, is_permanent=True)

    def add_spec(self, spec: HookSpec, *, store: Optional[dict] = None, sources: Optional[Mapping] = None) -> None:
        """Install `spec` at its own level (or as permanent), outside any hooks() block; what
        it reads goes into `store` (see hooks())."""
        self._install_scoped(None if spec.permanent else spec.level, [spec], Scope(store, sources))

    @contextmanager
    def hooks(
        self, fwd_hooks: HookList = (), bwd_hooks: HookList = (), reset_hooks_end: bool = True,
        clear_contexts: bool = False, *, store: Optional[dict] = None, sources: Optional[Mapping] = None,
    ) -> Iterator[Any]:
        """A block whose hooks are removed when it ends, also when it raised.

        Each block is one context level deeper; leaving it removes only the hooks of its
        level, so hooks of enclosing blocks and permanent hooks stay.

        Args:
            fwd_hooks, bwd_hooks: (name_or_predicate, fn_or_op) pairs and sl.HookSpec (a
                spec's own `dir` decides its direction).
            store: a dict where reading ops (sl.ops.Cache, ...) of this block put what they
                read, in every run inside it (and not in the run's own results).
            sources: earlier runs' caches by name, for sl.ops.Patch(from_cache=name), read
                by every run inside the block.

        Example:
            >>> with model.hooks(fwd_hooks=[("blocks.0.hook_resid_post", fn)]):
            ...     loss = model(tokens, return_type="loss")
        """
        specs = self._specs(fwd_hooks, "fwd", "fwd_hooks") + self._specs(bwd_hooks, "bwd", "bwd_hooks")
        self.context_level += 1
        level = self.context_level
        scope = Scope(store, sources)
        try:
            permanent = [spec for spec in specs if spec.permanent]
            if permanent:
                self._install_scoped(None, permanent, scope)
            self._install_scoped(level, [spec for spec in specs if not spec.permanent], scope)
            yield self
        finally:
            if reset_hooks_end:
                self.remove(level, clear_contexts=clear_contexts)
                self._forget_scopes(level, including_permanent=False)
            self.context_level -= 1

    def reset_hooks(
        self, clear_contexts: bool = True, direction: DirectionOrBoth = "both", including_permanent: bool = False,
        level: Optional[int] = None,
    ) -> None:
        """Remove non-permanent hooks (of `level` only, when given; permanent ones too with
        including_permanent) and clear the hook points' contexts."""
        check_dir(direction, ("fwd", "bwd", "both"))
        self.remove(level, including_permanent=including_permanent, direction=direction, clear_contexts=clear_contexts)
        if direction == "both":
            self._forget_scopes(level, including_permanent)
        else:
            self._scoped = tuple(s for s in self._scoped if not (s.removed_by(level, including_permanent) and s.specs[0].dir == direction))

    def list_hooks(
        self, name_filter: NamesFilter = None, dir: DirectionOrBoth = "both", including_permanent: bool = True,
    ) -> dict[str, list[HookSpec]]:
        """The installed hooks as specs (each with its level), by hook point; points without
        hooks are left out. A function hook shows as sl.ops.Code(fn).

        Args:
            name_filter: a name, glob, list of names, or predicate; None for every point.
            dir: "fwd", "bwd" or "both".
            including_permanent: False leaves permanent hooks out.
        """
        return by_point(self.installed(), name_filter, dir, including_permanent)

    def has_hooks(self, dir: DirectionOrBoth = "both", including_permanent: bool = True, level: Optional[int] = None) -> bool:
        """Whether any hook is installed (in `dir`; permanent ones counted if asked; of
        `level` only, when given)."""
        check_dir(dir, ("fwd", "bwd", "both"))
        return any(
            dir in ("both", spec.dir) and (including_permanent or not spec.permanent) and (level is None or spec.level == level)
            for _, spec in self.installed()
        )

    # ------------------------------------------------------------------ requests

    def tokens_of(self, input: Any, attention_mask: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
        """Token ids [batch, pos] and attention mask of an input, where the runner takes them."""
        return self._place(*token_ids(input, attention_mask, lambda: self._tokenizer_or_raise("text input")))

    def _request(self, args: tuple, kwargs: dict, **fields: Any) -> RunRequest:
        """The request of a TransformerLens-style call. A runner that takes tokens reads
        (input, return_type=..., attention_mask=..., metric=..., past_kv_cache=...) and passes
        the other keywords to the model's forward; a plain module's forward gets them all.
        The sources of the scopes installed now go with it."""
        if len(args) > 1:
            raise TypeError(f"a run takes one input and keyword arguments; got {len(args)} positional arguments")
        input = args[0] if args else kwargs.pop("input", None)
        options = {}
        if self.takes_tokens:
            options = {key: kwargs.pop(key) for key in ("return_type", "attention_mask", "metric", "weight_grads") if key in kwargs}
            if "past_kv_cache" in kwargs:
                options["kv_cache"] = kwargs.pop("past_kv_cache")
        fields["sources"] = {**self._scope_sources(), **fields.get("sources", {})}
        return RunRequest(input, **options, **fields, forward_kwargs=kwargs)

    def _scope_sources(self) -> dict:
        """The sources of every scope installed now."""
        return {key: value for scoped in self._scoped for key, value in (scoped.scope.sources or {}).items()}

    def routed(self, result: RunResult) -> dict[str, Tensor]:
        """What a run read, less what went to the stores of the scopes installed now (each
        spec's entries to its own scope's store)."""
        left = dict(result.cache)
        if not left:
            return left
        names = self.hook_names()
        for scoped in self._scoped:
            if scoped.scope.store is None:
                continue
            for spec in scoped.specs:
                for key in (key for name in spec.resolve(names) for key in spec.op.stores(name)):
                    if key in left:
                        scoped.scope.store[key] = left.pop(key)
        return left

    def _keep(self, result: RunResult, store: Optional[dict], what: str) -> None:
        """Put what a run's reading specs read into their scopes' stores, the rest into
        `store`; refuse to drop it silently."""
        left = self.routed(result)
        if store is not None:
            store.update(left)
        elif left:
            raise ValueError(
                f"reading specs read {sorted(left)[:3]} but {what} keeps no results: use run_with_cache, "
                "or pass store={} to hooks() / run_with_hooks()"
            )

    def call_with(self, args: tuple, kwargs: dict) -> Any:
        """A plain call of the runner: one run with the hooks installed now."""
        result = self.run(self._request(args, kwargs))
        self._keep(result, None, "a plain call")
        return result.output

    def run_with_hooks(
        self, *model_args: Any, fwd_hooks: HookList = (), bwd_hooks: HookList = (), reset_hooks_end: bool = True,
        clear_contexts: bool = False, store: Optional[dict] = None, sources: Optional[Mapping] = None,
        whole_batch: bool = False, **model_kwargs: Any,
    ) -> Any:
        """One run with temporary hooks and specs; what reading specs read goes into `store`.

        In one process only the forward pass runs: backward hooks fire on a later
        ``.backward()``, so they need ``reset_hooks_end=False`` (then call reset_hooks()
        yourself). A Tracer, whose outputs carry no graph, backpropagates the loss (or
        metric) itself whenever a gradient spec is active. whole_batch keeps the batch on one
        pipeline (for specs that select batch rows).
        """
        if bwd_hooks and reset_hooks_end and not self.backward_in_run:
            warnings.warn(
                "run_with_hooks removes its hooks when the forward pass ends (reset_hooks_end=True), "
                "so the bwd_hooks given will never fire; pass reset_hooks_end=False and call "
                "reset_hooks() after your backward pass",
                stacklevel=2,
            )
        with self.hooks(fwd_hooks, bwd_hooks, reset_hooks_end, clear_contexts, store=store):
            result = self.run(self._request(model_args, model_kwargs, sources=dict(sources or {}), whole_batch=whole_batch))
            self._keep(result, store, "run_with_hooks")
        return result.output

    def _names(self, names_filter: NamesFilter) -> list[str]:
        self._prepare_names(names_filter)
        names = self.hook_names()
        selected = names_predicate(names_filter, names)
        return [name for name in names if selected(name)]

    def run_with_cache(
        self, *model_args: Any, names_filter: NamesFilter = None, device: Union[str, torch.device, None] = None,
        remove_batch_dim: bool = False, incl_bwd: bool = False, reset_hooks_end: bool = True,
        clear_contexts: bool = False, pos_slice: Union[Slice, SliceInput] = None, fwd_hooks: HookList = (),
        bwd_hooks: HookList = (), sources: Optional[Mapping] = None, whole_batch: bool = False, **model_kwargs: Any,
    ) -> tuple[Any, ActivationCache]:
        """Run and return (output, ActivationCache of the selected hook points).

        Args:
            names_filter: a name, glob, list, or predicate; None caches every hook point.
            device: where to put cached tensors (default: where they were computed).
            remove_batch_dim: drop the batch axis (the batch must hold one example).
            incl_bwd: also backpropagate the loss (or `metric=`; on a plain HookedRootModule,
                the output, which must be a scalar) and cache gradients as ``<name>_grad``.
                The parameters are frozen for such a run (no weight gradient is computed or
                kept in .grad) unless `weight_grads=True` is passed too.
            pos_slice: keep only these positions (TransformerLens' Slice; an int keeps the axis).
            fwd_hooks, bwd_hooks: hooks and specs active during the run, before the caching
                (so the cache sees their edits); what reading specs read lands in the
                returned cache too. names_filter=[] caches nothing else.
            sources: earlier runs' caches by name, for sl.ops.Patch(from_cache=name).

        Example:
            >>> logits, cache = model.run_with_cache(tokens, names_filter="blocks.*.hook_resid_post")
        """
        # The given hooks first (a Splice makes hook points the filter may name); the caching
        # specs are the run's own, one level deeper, so that they see the edits. With
        # reset_hooks_end=False they stay installed with the given hooks, as TransformerLens'
        # do, until reset_hooks(); what they read in later runs comes back with those runs.
        with self.hooks(fwd_hooks, bwd_hooks, reset_hooks_end, clear_contexts):
            specs = caching_specs(self._names(names_filter), incl_bwd, pos_slice)
            if not reset_hooks_end:
                self.install(self.context_level, specs)
                specs = ()
            request = self._request(model_args, model_kwargs, specs=specs, grads=incl_bwd, sources=dict(sources or {}), whole_batch=whole_batch)
            result = self.run(request)
            values = self.routed(result)
        if remove_batch_dim:
            bad = [name for name, value in values.items() if value.shape[0] != 1]
            if bad:
                raise ValueError(f"remove_batch_dim=True needs a batch of one example; {bad[0]} has a batch of {values[bad[0]].shape[0]}")
            values = {name: value[0] for name, value in values.items()}
        if device is not None:
            values = {name: value.to(device) for name, value in values.items()}
        return result.output, ActivationCache(values, attention_mask=result.attention_mask, **self._cache_fields())

    def write_cache(
        self, input: Any, path: Union[str, os.PathLike], *, names_filter: NamesFilter = None, layout: str = "example",
        incl_bwd: bool = False, examples: Optional[Tensor] = None, batch: int = 0,
        metadata: Optional[Mapping[str, Any]] = None, name: Optional[str] = None, fwd_hooks: HookList = (),
        bwd_hooks: HookList = (), sources: Optional[Mapping] = None, **model_kwargs: Any,
    ) -> tuple[Any, list[str]]:
        """run_with_cache for caches too big to hold: what is cached is written straight into
        the Parquet dataset at `path` (as ParquetSink does: path/hook=<name>/part-*.parquet,
        readable with sl.read_cache); on a Tracer each worker writes its own, in the
        background while it runs on, and the values never pass through this process.
        Returns (output, the parts written) once all the parts are on disk; pass
        return_type="loss", "metric" or None to keep the logits off this process too.

        Everything that writes must reach `path` (see `shares`). `examples` are the batch's
        rows in the dataset (default 0..batch-1), `batch` is stored with them; `metadata`
        joins the parts' schema metadata after the model's. A run that fails leaves no part
        of its own behind. With `name`, the parts are named `<name>-<the microbatch's first
        row>.parquet`, so that writing the batch again with the same microbatch size replaces
        its parts instead of adding to them (a campaign's resume relies on it).
        """
        destination = Destination(os.fspath(path), layout, examples, batch, None, name)
        if not self.shares(path):
            raise ValueError(
                f"not every worker sees {os.fspath(path)} as this machine does (workers on other machines would "
                "write to their own disks): give write_cache a path every machine shares, "
                "a shared filesystem or an object store URI (s3://...), or use run_with_cache"
            )
        with self.hooks(fwd_hooks, bwd_hooks):
            names = self._names(names_filter)
            fields = {**self._dataset_metadata(), "hooks": list(names), **(metadata or {})}
            destination = dataclasses.replace(destination, metadata=fields)
            request = self._request(
                (input,), model_kwargs, specs=caching_specs(names, incl_bwd), grads=incl_bwd,
                sources=dict(sources or {}), write=destination,
            )
            result = self.run(request)
        return result.output, list(result.parts)

    # ------------------------------------------------------------------ base runs

    def base_run(self, input: Any, *, attention_mask: Optional[Tensor] = None) -> BaseRun:
        """Run `input` once and keep it, so that variant runs can start inside it at any
        layer and position: RunRequest(..., resume=sl.hooks.Resume(base, layer, position,
        repeat)) computes only the layers from `layer` on over the positions from `position`
        on (what sweeps do). The hooks installed now act on it. Use it as a context manager,
        or close() it: that frees what is kept (on a Tracer, on every replica's stages).

        Example:
            >>> with model.base_run(corrupt) as base:
            ...     request = sl.RunRequest(corrupt.repeat(2, 1), specs=patches, resume=sl.hooks.Resume(base, 3, position=5, repeat=2))
            ...     logits = model.run(request).output        # [2 * batch, pos - 5, vocab]
        """
        if getattr(self, "architecture", None) is None:
            raise ValueError(f"a base run needs a model of a registered architecture (canonical layers); {type(self).__name__} has none")
        tokens, mask = self.tokens_of(input, attention_mask)
        return self._keep_base(tokens, mask)

    def _keep_base(self, tokens: Tensor, mask: Optional[Tensor]) -> BaseRun:
        raise NotImplementedError

    # ------------------------------------------------------------------ generation

    def init_kv_cache(self, batch_size: int = 1) -> Any:
        """An empty key/value cache of this runner: pass it as past_kv_cache= to a run,
        freeze() it to share a prefix between runs, close() it (or use it as a context
        manager) to free it. A Tracer's stays on its stages."""
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int; got {batch_size!r}")
        return self._new_kv_cache(batch_size)

    def _new_kv_cache(self, batch_size: int) -> Any:
        raise ValueError(f"{type(self).__name__} runs its own forward: a key/value cache needs a HookedModel or a Tracer")

    def generate(
        self, input: Any, *, max_new_tokens: int, use_kv_cache: bool = True, fwd_hooks: HookList = (),
        attention_mask: Optional[Tensor] = None, store: Optional[dict] = None, **sampling: Any,
    ) -> Tensor:
        """Generate tokens with hooks and specs active at every step (greedy by default).

        With the key/value cache only the new token runs at each step (on a Tracer each stage
        keeps its own layers' keys and values). Returns [batch, prompt + new] token ids.
        `sampling`: temperature (0: greedy), top_k, top_p, stop_at_eos, seed (see
        shardlens.hooks.generation.decode_loop). What reading specs read at step k goes into
        `store` under ``<entry>.step<k>``.
        """
        tokens, mask = self.tokens_of(input, attention_mask)
        mask = torch.ones_like(tokens) if mask is None else mask.long()
        cache = self.init_kv_cache(tokens.shape[0]) if use_kv_cache else None
        read: dict = {}

        def step(all_tokens: Tensor, all_mask: Tensor, new_tokens: Tensor, new_mask: Tensor) -> Tensor:
            sources = self._scope_sources()
            if cache is None:
                request = RunRequest(all_tokens, attention_mask=all_mask, whole_batch=True, sources=sources)
            else:
                request = RunRequest(new_tokens, attention_mask=new_mask, kv_cache=cache, sources=sources)
            result = self.run(request)
            read.update(self.routed(result))
            return result.output

        def after_step(index: int) -> None:
            if store is not None:
                store.update({f"{name}.step{index}": value for name, value in read.items()})
            read.clear()

        with torch.no_grad(), self.hooks(fwd_hooks=fwd_hooks):
            try:
                return decode_loop(step, tokens, mask, self.config, max_new_tokens=max_new_tokens, after_step=after_step, **sampling)
            finally:
                if cache is not None:
                    cache.close()

    # ------------------------------------------------------------------ tokens

    def _tokenizer_or_raise(self, what: str) -> Any:
        if self.tokenizer is None:
            raise ValueError(f"{what} needs a tokenizer; this model has none: pass token ids, or load a checkpoint that has one")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        return self.tokenizer

    def to_tokens(self, text: Union[str, list[str]], *, padding_side: Optional[str] = None) -> Tensor:
        """Token ids [batch, pos] for a string or list of strings (padded with the pad token)."""
        tokenizer = self._tokenizer_or_raise("to_tokens")
        options = {} if padding_side is None else {"padding_side": padding_side}
        return tokenizer(text, return_tensors="pt", padding=True, **options)["input_ids"]

    def to_str_tokens(self, input: Any, *, prepend_bos: Optional[bool] = None) -> list:
        """Each token of a string or of token ids ([pos] or [1, pos]) as its own string, as
        TransformerLens gives them (see shardlens.hooks.lens.str_tokens)."""
        from shardlens.hooks.lens import str_tokens  # lens reads TappedModel, which is built on this module

        return str_tokens(self._tokenizer_or_raise("to_str_tokens"), input, prepend_bos=prepend_bos)

    def to_single_token(self, text: str) -> int:
        """The id of `text`, which must be exactly one token."""
        from shardlens.hooks.lens import single_token

        return single_token(self._tokenizer_or_raise("to_single_token"), text)

    @property
    def cfg(self) -> Any:
        """TransformerLens' config of the model (n_layers, d_model, n_heads, d_head, d_mlp,
        d_vocab, n_ctx, act_fn, normalization_type, ...): what TransformerLens' analysis code
        reads. See shardlens.hooks.lens.LensConfig."""
        from shardlens.hooks.lens import lens_config

        config, options = self._lens_config_args()
        key = (id(config), tuple(sorted(options.items(), key=lambda item: item[0])))
        if getattr(self, "_cfg", (None, None))[0] != key:  # built once per config and point options
            self._cfg = (key, lens_config(config, self.architecture, **options))
        return self._cfg[1]

    def _lens_config_args(self) -> tuple[Any, dict]:
        """The model's own (not text) config, and lens_config's keyword arguments."""
        raise ValueError(f"{type(self).__name__} has no TransformerLens config: it needs a model of a registered architecture")

    def to_string(self, tokens: Union[Tensor, list[int]]) -> Union[str, list[str]]:
        """The text of token ids: a string for [pos], a list of strings for [batch, pos]."""
        tokenizer = self._tokenizer_or_raise("to_string")
        tokens = torch.as_tensor(tokens)
        if tokens.ndim == 2:
            return tokenizer.batch_decode(tokens)
        return tokenizer.decode(tokens)

