"""Tracer: HookedModel's API for a model cut into stages on many processes, GPUs and nodes."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Optional, Union

import torch
from torch import Tensor

from shardlens.cluster import Coordinator, make_backend
from shardlens.cluster.coordinator import Destination, KVSession
from shardlens.errors import HookNameError
from shardlens.hooks.architectures import layout_for
from shardlens.hooks.generation import KeyValueCache, KeyValueCacheEntry
from shardlens.hooks.hook_points import HookTarget
from shardlens.hooks.metrics import Metric
from shardlens.hooks.model import token_ids
from shardlens.hooks.names import NamesFilter, names_predicate
from shardlens.hooks.ops import Cache, CacheGrad, Code, Op
from shardlens.hooks.specs import HookSpec
from shardlens.hooks.tapped import cache_fields, canonical_shape
from shardlens.hooks.taps import PointOptions
from shardlens.sharding import ShardPlan
from shardlens.tables import ActivationCache
from shardlens.tables.arrow import check_layout
from shardlens.tables.parquet import check_part_name, is_uri

_RETURN_TYPES = ("logits", "loss", "both", "metric", None)


class StageKeyValueCache(KeyValueCache):
    """A Tracer's key/value cache: each stage of the first replica keeps its own layers'
    keys and values under `session`; this handle holds only the attention mask so far, the
    frozen flag, and how many times a run repeats the cached batch.

    Example:
        >>> cache = tracer.init_kv_cache(batch_size=2)
        >>> tracer(prefix, past_kv_cache=cache); cache.freeze()
        >>> logits, acts = tracer.run_with_cache(suffix, past_kv_cache=cache)   # only the suffix runs
        >>> cache.close()                                                          # the stages forget it
    """

    def __init__(self, coordinator: Coordinator, session: str, previous_attention_mask: Tensor, frozen: bool = False, times: int = 1):
        super().__init__(None, previous_attention_mask, frozen)
        self.coordinator, self.session, self.times = coordinator, session, times

    @property
    def entries(self) -> list[KeyValueCacheEntry]:
        """Every layer's past keys and values, fetched from the stages (of the cached batch,
        not repeated)."""
        by_layer = self.coordinator.kv_entries(self.session)
        return [KeyValueCacheEntry(*by_layer[layer]) for layer in sorted(by_layer)]

    def repeat(self, times: int) -> "StageKeyValueCache":
        """A frozen view whose batch is this batch repeated `times` times (the stages copy
        their entries per run; nothing is copied now)."""
        if not isinstance(times, int) or times < 1:
            raise ValueError(f"times must be a positive int; got {times!r}")
        return StageKeyValueCache(self.coordinator, self.session, self.previous_attention_mask.repeat(times, 1), True, self.times * times)

    def for_run(self) -> Any:
        raise TypeError("a Tracer's key/value cache lives on its stages: pass it as past_kv_cache= to the Tracer")

    @property
    def kv(self) -> KVSession:
        return KVSession(self.session, self.frozen, self.times, self.seq_len)

    def close(self) -> None:
        """Make the stages forget this cache's keys and values (and every repeat of it)."""
        self.coordinator.end_session(self.session)

    def __enter__(self) -> "StageKeyValueCache":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class Tracer:
    """A hooked model run by a coordinator over stage workers (Ray actors, or this process).

    The hook API is HookedModel's: run_with_cache, run_with_hooks, hooks(), add_hook,
    reset_hooks, hook_names, list_hooks. Hooks are sl.HookSpec values, or (name, op) pairs;
    a plain Python function as a hook is pickled and run on the workers, so it needs
    allow_code=True.

    Example:
        >>> with sl.Tracer.from_pretrained("path/to/checkpoint", stages=2) as tracer:
        ...     logits, cache = tracer.run_with_cache(tokens, names_filter="blocks.*.hook_resid_post")
    """

    def __init__(self, coordinator: Coordinator, *, tokenizer: Any = None, config: Any = None):
        self.coordinator = coordinator
        self.tokenizer = tokenizer
        self.config = config
        self.layout = layout_for(config) if config is not None else None  # the model's canonical layout, if any
        self.context_level = 0

    @classmethod
    def from_pretrained(
        cls,
        path: Union[str, os.PathLike],
        *,
        stages: int = 1,
        replicas: int = 1,
        backend: str = "ray",
        address: Optional[str] = None,
        dtype: Optional[torch.dtype] = None,
        max_memory: Optional[dict] = None,
        microbatch_size: Optional[int] = None,
        allow_code: bool = False,
        device: Optional[str] = None,
        worker_threads: Optional[int] = None,
        stage_resources: Optional[Sequence[dict]] = None,
        point_options: PointOptions = PointOptions(),
    ) -> "Tracer":
        """Plan `stages` stages of the checkpoint at `path` and start `replicas` pipelines.

        Args:
            backend: "ray" (actors; connects to `address`, or starts a local Ray instance) or
                "local" (the same workers in this process).
            dtype: the stages' parameter dtype; None: as transformers' dtype="auto" (see
                ShardPlan.for_model).
            max_memory: each stage's device budgets (see ShardPlan.for_model); GPUs named
                there are requested from Ray per worker.
            microbatch_size: examples per microbatch (default: the batch split evenly over
                the replicas).
            allow_code: accept plain Python callables as hooks (pickled to the workers).
            device: put every stage on this device ("cuda", "cpu") instead of the plan's map.
            worker_threads: torch threads per worker.
            stage_resources: per stage, the custom Ray resources its workers need
                ([{"node_a": 1}, {"node_b": 1}] pins stage 0 to a node advertising node_a,
                stage 1 to one with node_b). None: Ray spreads the stages over the nodes.
            points: TransformerLens' optional hook points every stage adds (sl.PointOptions;
                a HookedModel switches them with set_use_*, a Tracer when it starts).
        """
        plan = ShardPlan.for_model(path, stages=stages, max_memory=max_memory, dtype=dtype, stage_resources=stage_resources)
        gpus = sum(1 for d in (max_memory or {}) if isinstance(d, int)) or (1.0 if device and device.startswith("cuda") else 0.0)
        workers = make_backend(backend, address, gpus_per_worker=gpus)
        try:
            coordinator = Coordinator(
                os.fspath(path), plan, workers, replicas=replicas, microbatch_size=microbatch_size,
                device=device, worker_threads=worker_threads, allow_code=allow_code, point_options=point_options,
            )
        except BaseException:
            workers.shutdown()  # no actors (or Ray instance) of ours left behind by a failed start
            raise
        from transformers import AutoConfig

        from shardlens.hooks.model import _load_tokenizer

        return cls(coordinator, tokenizer=_load_tokenizer(path), config=AutoConfig.from_pretrained(path))

    @property
    def plan(self) -> ShardPlan:
        return self.coordinator.plan

    def hook_names(self) -> list[str]:
        return list(self.coordinator.hook_names)

    def hook_shape(self, name: str) -> Optional[tuple[int, ...]]:
        """The shape of a canonical hook point's tensors after [batch, pos] (as on a
        HookedModel), or None where it depends on the input or is unknown."""
        if self.layout is None or name.startswith("module:") or name not in self.coordinator.hook_names:
            return None
        return canonical_shape(self.config, self.layout, name)

    def shutdown(self) -> None:
        """Stop the workers (and the Ray instance, when this tracer started it)."""
        self.coordinator.shutdown()

    def __enter__(self) -> "Tracer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    def stats(self) -> list[dict]:
        """Each worker's memory and timings."""
        return self.coordinator.stats()

    def placement(self) -> list[dict]:
        """Where each worker runs: [{"replica", "stage", "node"}], node being the Ray node's
        address ("local" on the local backend)."""
        return self.coordinator.placement()

    # ------------------------------------------------------------------ hooks

    def _spec(self, item: Any, direction: str, argument: str) -> HookSpec:
        if isinstance(item, HookSpec):
            return item
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise TypeError(f"{argument} takes sl.HookSpec or (name, op_or_fn) pairs; got {item!r}")
        name, hook = item
        if callable(name) and not isinstance(name, str):
            matched = tuple(n for n in self.hook_names() if name(n))
            if not matched:
                raise HookNameError(getattr(name, "__name__", "<predicate>"), self.hook_names(), what="hook point matches the predicate")
            name = matched
        return HookSpec(name, self._op(hook), dir=direction)  # a pair takes its direction from the list it is in

    def _op(self, hook: Any) -> Op:
        if isinstance(hook, Op):
            return hook
        if not self.coordinator.allow_code:
            raise ValueError(
                "a plain Python function as a hook would be pickled and run on the workers; this Tracer "
                "was made with allow_code=False. Use sl.HookSpec / sl.ops, or Tracer.from_pretrained(..., allow_code=True)"
            )
        return Code(hook)

    def add_hook(
        self, name: HookTarget, hook: Any, dir: str = "fwd", is_permanent: bool = False,
        level: Optional[int] = None, prepend: bool = False,
    ) -> None:
        """Attach an op (or, with allow_code, a function) at hook points on every worker."""
        spec = self._spec((name, hook), dir, "add_hook")
        spec = HookSpec(spec.points, spec.op, dir=spec.dir, permanent=is_permanent, prepend=prepend)
        self.coordinator.push(None if is_permanent else level, [spec])

    def add_spec(self, spec: HookSpec) -> None:
        self.coordinator.push(None if spec.permanent else spec.level, [spec])

    @contextmanager
    def hooks(
        self, fwd_hooks: Sequence = (), bwd_hooks: Sequence = (), reset_hooks_end: bool = True, clear_contexts: bool = False,
    ) -> Iterator["Tracer"]:
        """A block whose specs are removed from every worker when it ends, also when it raised."""
        specs = [self._spec(h, "fwd", "fwd_hooks") for h in fwd_hooks] + [self._spec(h, "bwd", "bwd_hooks") for h in bwd_hooks]
        self.context_level += 1
        level = self.context_level
        try:
            permanent = [s for s in specs if s.permanent]
            if permanent:
                self.coordinator.push(None, permanent)
            self.coordinator.push(level, [s for s in specs if not s.permanent])
            yield self
        finally:
            if reset_hooks_end:
                self.coordinator.pop(level)
            self.context_level -= 1

    def reset_hooks(self, clear_contexts: bool = True, including_permanent: bool = False) -> None:
        self.coordinator.reset(including_permanent)

    def list_hooks(self) -> dict[str, list[HookSpec]]:
        """The specs installed, by hook point (as the coordinator's stack holds them)."""
        listed: dict[str, list[HookSpec]] = {}
        for entry in self.coordinator.stack:
            for spec in entry.specs:
                for name in spec.resolve(self.hook_names()):
                    listed.setdefault(name, []).append(spec)
        return listed

    def has_hooks(self) -> bool:
        return bool(self.coordinator.stack)

    # ------------------------------------------------------------------ running

    def _tokens(self, input: Any, attention_mask: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
        """Token ids and attention mask on the CPU; a mask of all ones becomes None."""
        tokens, attention_mask = token_ids(input, attention_mask, self._tokenizer)
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None
        return tokens.cpu(), None if attention_mask is None else attention_mask.cpu()

    def _tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise ValueError("text input needs a tokenizer; this checkpoint has none: pass token ids")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        return self.tokenizer

    def init_kv_cache(self, batch_size: int = 1) -> StageKeyValueCache:
        """An empty key/value cache kept on the stages (see StageKeyValueCache): pass it as
        past_kv_cache= to a run, freeze() it to share a prefix between runs, close() it to
        free the stages' memory."""
        import uuid

        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int; got {batch_size!r}")
        return StageKeyValueCache(self.coordinator, f"kv.{uuid.uuid4().hex[:12]}", torch.zeros(batch_size, 0, dtype=torch.long))

    def _kv_mask(self, cache: Any, tokens: Tensor, mask: Optional[Tensor]) -> Tensor:
        """The attention mask of a cache's tokens and these new ones (checked against the cache)."""
        if not isinstance(cache, StageKeyValueCache) or cache.coordinator is not self.coordinator:
            raise TypeError(f"past_kv_cache must be a cache of this Tracer (tracer.init_kv_cache()); got {type(cache).__name__}")
        if tokens.shape[0] != cache.previous_attention_mask.shape[0]:
            raise ValueError(
                f"the key/value cache holds a batch of {cache.previous_attention_mask.shape[0]}, the input {tokens.shape[0]}: "
                "use cache.repeat(k) to run k variants per cached example"
            )
        if cache.seq_len == 0 and cache.frozen:
            raise ValueError("the key/value cache is frozen and empty: run the prefix through it before freezing it")
        return cache.extended_mask(torch.ones_like(tokens) if mask is None else mask)

    def _run(
        self, input: Any, attention_mask: Optional[Tensor], return_type: Any, backward: bool, sources: Optional[dict],
        metric: Optional[Metric] = None, split: bool = True, past_kv_cache: Optional[StageKeyValueCache] = None,
        write: Optional[Callable[[int], Destination]] = None,
    ) -> tuple:
        if return_type not in _RETURN_TYPES:
            raise ValueError(f"return_type must be one of {_RETURN_TYPES}; got {return_type!r}")
        if return_type == "metric" and metric is None:
            raise ValueError("return_type='metric' needs metric=sl.metrics....")
        tokens, mask = self._tokens(input, attention_mask)
        run_mask = mask if past_kv_cache is None else self._kv_mask(past_kv_cache, tokens, mask)
        logits, loss, results = self.coordinator.run(
            tokens, attention_mask=run_mask, backward=backward or self.coordinator.needs_backward(), sources=sources,
            metric=metric, split=split, kv=None if past_kv_cache is None else past_kv_cache.kv,
            write=None if write is None else write(tokens.shape[0]), keep_logits=return_type in ("logits", "both"),
        )
        if past_kv_cache is not None and not past_kv_cache.frozen:
            past_kv_cache.previous_attention_mask = run_mask
        output = {"logits": logits, "loss": loss, "metric": loss, "both": (logits, loss), None: None}[return_type]
        return output, results, mask

    def __call__(
        self, input: Any, return_type: Any = "logits", attention_mask: Optional[Tensor] = None, metric: Optional[Metric] = None,
        past_kv_cache: Optional[StageKeyValueCache] = None,
    ) -> Any:
        """Run the pipeline (see HookedModel.forward); with `past_kv_cache` only `input`, the
        new tokens, runs, attending to the cached ones (the cache grows unless frozen)."""
        return self._run(input, attention_mask, return_type, False, None, metric, past_kv_cache=past_kv_cache)[0]

    def _caching(self, names_filter: NamesFilter, incl_bwd: bool) -> tuple[tuple[str, ...], list[HookSpec]]:
        """The hook points `names_filter` selects, and the specs that cache them (and their gradients)."""
        selected = names_predicate(names_filter, self.coordinator.hook_names)
        names = tuple(n for n in self.coordinator.hook_names if selected(n))
        caching = [HookSpec(names, Cache())] + ([HookSpec(names, CacheGrad())] if incl_bwd else []) if names else []
        return names, caching

    def write_cache(
        self, input: Any, path: Union[str, os.PathLike], *, names_filter: NamesFilter = None, layout: str = "example",
        incl_bwd: bool = False, return_type: Any = "logits", attention_mask: Optional[Tensor] = None,
        examples: Optional[Tensor] = None, batch: int = 0, metadata: Optional[Mapping[str, Any]] = None,
        name: Optional[str] = None, fwd_hooks: Sequence = (), bwd_hooks: Sequence = (), sources: Optional[dict] = None,
        metric: Optional[Metric] = None,
    ) -> tuple[Any, list[str]]:
        """run_with_cache for caches too big for the driver: each worker writes what it cached
        straight into the Parquet dataset at `path` (as ParquetSink does: path/hook=<name>/
        part-*.parquet, one part per hook point per microbatch, readable with sl.read_cache),
        and the values never pass through this process. A stage writes in the background
        while it runs its next microbatch. Returns (output, the parts written) once all the
        parts are on disk.
        The logits do come back when `return_type` asks for them: pass "loss", "metric" or
        None to keep them off the driver too.

        Every worker must reach `path`: a local path when all run on this machine, shared
        storage or an object store URI (s3://...) across nodes; a local path that some
        worker does not see (see `shares`) is an error before any work starts. `examples`
        are the batch's rows in the dataset (default 0..batch-1; give each batch its own
        when writing many into one dataset), `batch` is stored with them. `metadata` joins
        the parts' schema metadata after the model, dtype, shard plan and hook names. A run
        that fails leaves no part of its own behind. With `name`, the parts are named
        `<name>-<the microbatch's first row>.parquet`, so that writing the batch again with
        the same microbatch size replaces its parts instead of adding to them (a campaign's
        resume relies on it).
        """
        check_layout(layout)
        if name is not None:
            check_part_name(name)
        if not self.shares(path):
            raise ValueError(
                f"not every worker sees {os.fspath(path)} as this machine does (workers on other machines would write "
                "to their own disks): give write_cache a path every machine shares, a shared filesystem or an object "
                "store URI (s3://...), or use run_with_cache"
            )
        names, caching = self._caching(names_filter, incl_bwd)
        fields = {"model": self.coordinator.source, "dtype": self.plan.dtype, "shard_plan": self.plan.to_dict(),
                  "hooks": list(names), **(metadata or {})}

        def destination(n: int) -> Destination:  # n: the batch size, known once the input is read
            rows = torch.arange(n) if examples is None else torch.as_tensor(examples).long().cpu()
            if rows.shape != (n,):
                raise ValueError(f"examples must hold one index per example of the batch ({n}); got shape {tuple(rows.shape)}")
            return Destination(os.fspath(path), layout, rows, batch, fields, name)

        with self.hooks(fwd_hooks, bwd_hooks):
            with self.hooks(caching):
                output, parts, _ = self._run(input, attention_mask, return_type, incl_bwd, sources, metric, write=destination)
        return output, parts

    def shares(self, path: Union[str, os.PathLike]) -> bool:
        """Whether every worker reaches `path` as this process does: always for an object
        store URI (s3://...); for a local folder, whether a file put there now exists for
        each worker (workers on other machines need a filesystem shared with this one)."""
        path = os.fspath(path)
        return is_uri(path) or self.coordinator.shares(path)

    def run_with_hooks(
        self, input: Any, *, fwd_hooks: Sequence = (), bwd_hooks: Sequence = (), return_type: Any = "logits",
        attention_mask: Optional[Tensor] = None, store: Optional[dict] = None, sources: Optional[dict] = None,
        metric: Optional[Metric] = None, split: bool = True, past_kv_cache: Optional[StageKeyValueCache] = None,
    ) -> Any:
        """One run with temporary specs; what reading specs read goes into `store`. A
        backward pass (from the loss, or `metric`) runs when a gradient spec is active.
        split=False runs the batch whole on one replica (for specs that select batch rows);
        past_kv_cache: see __call__."""
        with self.hooks(fwd_hooks, bwd_hooks):
            output, results, _ = self._run(input, attention_mask, return_type, False, sources, metric, split, past_kv_cache)
        if results and store is None:
            raise ValueError("reading specs produced results but run_with_hooks got no store={}: use run_with_cache, or pass store")
        if store is not None:
            store.update(results)
        return output

    def generate(
        self, input: Any, *, max_new_tokens: int, use_kv_cache: bool = True, fwd_hooks: Sequence = (),
        attention_mask: Optional[Tensor] = None, store: Optional[dict] = None, **sampling: Any,
    ) -> Tensor:
        """Generate tokens through the pipeline with specs active at every step (greedy by
        default). With the key/value cache each stage keeps its own layers' keys and values,
        so a step sends only the new token through the stages. `sampling`: temperature,
        top_k, top_p, stop_at_eos, seed; reading specs store per step as ``<entry>.step<k>``."""
        import uuid

        from shardlens.hooks.generation import decode_loop

        tokens, mask = self._tokens(input, attention_mask)
        mask = torch.ones_like(tokens) if mask is None else mask.long()
        session = f"generate.{uuid.uuid4().hex[:12]}"

        def step(all_tokens: Tensor, all_mask: Tensor, new_tokens: Tensor, new_mask: Tensor) -> Tensor:
            if use_kv_cache:
                return self.coordinator.step(new_tokens, all_mask, session)
            return self.coordinator.run(all_tokens, attention_mask=all_mask, split=False)[0]

        def after_step(index: int) -> None:
            results = self.coordinator.take(session)
            if store is not None:
                store.update({f"{name}.step{index}": value for name, value in results.items()})

        with self.hooks(fwd_hooks):
            try:
                return decode_loop(step, tokens, mask, self.config, max_new_tokens=max_new_tokens, after_step=after_step, **sampling)
            finally:
                self.coordinator.end_session(session)

    def run_with_cache(
        self, input: Any, *, names_filter: NamesFilter = None, incl_bwd: bool = False, return_type: Any = "logits",
        attention_mask: Optional[Tensor] = None, device: Union[str, torch.device, None] = None,
        remove_batch_dim: bool = False, fwd_hooks: Sequence = (), bwd_hooks: Sequence = (), sources: Optional[dict] = None,
        metric: Optional[Metric] = None, split: bool = True, past_kv_cache: Optional[StageKeyValueCache] = None,
    ) -> tuple[Any, ActivationCache]:
        """Run and return (output, ActivationCache) gathered from every stage. incl_bwd
        backpropagates the batch's mean next-token loss (or `metric`) and caches
        ``<name>_grad``. With `past_kv_cache` (tracer.init_kv_cache()) only `input`, the new
        tokens, runs against the cached ones, on the first replica, and the cache holds the
        new positions only."""
        _, caching = self._caching(names_filter, incl_bwd)
        with self.hooks(fwd_hooks, bwd_hooks):
            with self.hooks(caching):
                output, results, mask = self._run(input, attention_mask, return_type, incl_bwd, sources, metric, split, past_kv_cache)
        if remove_batch_dim:
            if next(iter(results.values())).shape[0] != 1:
                raise ValueError("remove_batch_dim=True needs a batch of one example")
            results = {k: v[0] for k, v in results.items()}
        if device is not None:
            results = {k: v.to(device) for k, v in results.items()}
        return output, ActivationCache(results, attention_mask=mask, **cache_fields(self.layout))
