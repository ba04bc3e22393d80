"""Tracer: HookedModel's API for a model cut into stages on many processes, GPUs and nodes."""

from __future__ import annotations

import dataclasses
import os
import uuid
from collections.abc import Sequence
from typing import Any, Optional, Union

import torch
from torch import Tensor

from shardlens.cluster import Coordinator, make_backend
from shardlens.cluster.sessions import StageBaseRun, StageKeyValueCache
from shardlens.hooks.architectures import architecture_for
from shardlens.hooks.hook_api import HookAPI, Scope
from shardlens.hooks.model import load_tokenizer
from shardlens.hooks.names import NamesFilter, names_predicate
from shardlens.hooks.ops import Code, Op
from shardlens.hooks.run import Resume, RunRequest, RunResult
from shardlens.hooks.sources import model_config
from shardlens.hooks.specs import HookSpec
from shardlens.hooks.taps import PointOptions
from shardlens.sharding import Estimate, ShardPlan, estimate, fit_microbatch
from shardlens.tables.parquet import is_uri


class Tracer(HookAPI):
    """A hooked model run by a coordinator over stage workers (Ray actors, or this process).

    The hook API is HookedModel's, written once for both (see shardlens.hooks.hook_api):
    run_with_cache, run_with_hooks, hooks(), add_hook, reset_hooks, hook_names, list_hooks,
    generate. Hooks are sl.HookSpec values, or (name, op) pairs; a plain Python function as a
    hook is pickled and run on the workers, so it needs allow_code=True. A run whose specs
    act on gradients backpropagates the loss (or metric) through the stages itself.

    Example:
        >>> with sl.Tracer.from_pretrained("path/to/checkpoint", stages=2) as tracer:
        ...     logits, cache = tracer.run_with_cache(tokens, names_filter="blocks.*.hook_resid_post")
    """

    backward_in_run = True

    def __init__(self, coordinator: Coordinator, *, tokenizer: Any = None, config: Any = None):
        self.coordinator = coordinator
        self.tokenizer = tokenizer
        self.config = config
        self.architecture = architecture_for(config) if config is not None else None  # the model's canonical architecture, if any
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
        dtype: Union[torch.dtype, str, None] = None,
        max_memory: Optional[dict] = None,
        microbatch_size: Union[int, str, None] = None,
        seq_len: Optional[int] = None,
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
            dtype: the stages' parameter dtype (a torch dtype or its name); None: as
                transformers' dtype="auto" (see ShardPlan.for_model).
            max_memory: each stage's device budgets (see ShardPlan.for_model); GPUs named
                there are requested from Ray per worker.
            microbatch_size: examples per microbatch (default: the batch split evenly over
                the replicas); "auto": the largest that fits every stage's max_memory in a
                run of `seq_len` tokens that keeps its graph for a backward and caches
                nothing (see shardlens.sharding.estimate; `tracer.estimate` sizes other runs).
            seq_len: the tokens per example microbatch_size="auto" sizes for.
            allow_code: accept plain Python callables as hooks (pickled to the workers).
            device: put every stage on this device ("cuda", "cpu") instead of the plan's map.
            worker_threads: torch threads per worker.
            stage_resources: per stage, the custom Ray resources its workers need
                ([{"node_a": 1}, {"node_b": 1}] pins stage 0 to a node advertising node_a,
                stage 1 to one with node_b). None: Ray spreads the stages over the nodes.
            point_options: TransformerLens' optional hook points every stage adds (sl.PointOptions;
                a HookedModel switches them with set_use_*, a Tracer when it starts).

        Loading reports a step per stage (per replica) as each worker has built it, in the mode
        of sl.progress (a bar on stderr by default; sl.progress.configure("quiet") for none).
        """
        plan = ShardPlan.for_model(path, stages=stages, max_memory=max_memory, dtype=dtype, stage_resources=stage_resources)
        config = model_config(path)
        microbatch_size = _microbatch_size(microbatch_size, plan, config, seq_len)
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
        return cls(coordinator, tokenizer=load_tokenizer(path), config=config)

    @property
    def plan(self) -> ShardPlan:
        return self.coordinator.plan

    def hook_names(self) -> list[str]:
        return list(self.coordinator.hook_names)

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

    def estimate(
        self, tokens_or_shape: Any, *, names_filter: NamesFilter = None, incl_bwd: bool = False,
        microbatch_size: Union[int, str, None] = None,
    ) -> Estimate:
        """What run_with_cache(tokens, names_filter=..., incl_bwd=...) would cost, per stage,
        without running it: weights, cache and working set per microbatch, the peak against
        each stage's budget, bytes sent between stages, bytes a dataset of the cache holds
        (see shardlens.sharding.estimate for what is counted and assumed).

        Args:
            tokens_or_shape: what run_with_cache takes (token ids [batch, pos], text), or a
                (batch, pos) shape.
            names_filter: the hook points cached, as run_with_cache takes it (None: every one).
            microbatch_size: None: this tracer's; "auto": the largest that fits every stage's
                budget (see fit_microbatch); or a number of examples.

        Example:
            >>> tracer.estimate((32, 512), names_filter="blocks.*.hook_resid_post").describe()
        """
        if isinstance(tokens_or_shape, tuple) and len(tokens_or_shape) == 2 and all(isinstance(n, int) for n in tokens_or_shape):
            batch, seq_len = tokens_or_shape
        else:
            batch, seq_len = self.tokens_of(tokens_or_shape, None)[0].shape
        selected = names_predicate(names_filter, self.hook_names())
        names = [name for name in self.hook_names() if selected(name)]
        if microbatch_size is None:
            microbatch_size = self.coordinator.microbatch_size or -(-batch // self.coordinator.replicas)
        elif microbatch_size == "auto":
            microbatch_size = fit_microbatch(self.plan, self.config, seq_len=seq_len, names=names, incl_bwd=incl_bwd, batch=batch)
        return estimate(self.plan, self.config, batch=batch, seq_len=seq_len, names=names, incl_bwd=incl_bwd, microbatch_size=microbatch_size)

    # ------------------------------------------------------------------ the runner's primitives

    def _as_op(self, hook: Any) -> Op:
        if isinstance(hook, Op):
            return hook
        if not self.coordinator.allow_code:
            raise ValueError(
                "a plain Python function as a hook would be pickled and run on the workers; this Tracer "
                "was made with allow_code=False. Use sl.HookSpec / sl.ops, or Tracer.from_pretrained(..., allow_code=True)"
            )
        return Code(hook)

    def install(self, level: Optional[int], specs: Sequence[HookSpec], scope: Scope = Scope()) -> None:
        """Validate specs against every stage's hook points (and each op's own check, here)
        and send each stage its share. The scope stays with HookAPI, which adds its sources to
        every run and routes what the specs read to its store."""
        self.coordinator.push(level, specs, check=self.check_ops)

    def check_specs(self, specs: Sequence[HookSpec]) -> None:
        """Refuse, as install() would, specs that name unknown hook points or that an op
        refuses at its points; nothing is installed or sent anywhere."""
        self.coordinator.stack.split(specs, check=self.check_ops)

    def remove(self, level: Optional[int], *, including_permanent: bool = False, direction: str = "both", clear_contexts: bool = False) -> None:
        self.coordinator.remove(level, including_permanent=including_permanent, direction=direction, clear_contexts=clear_contexts)

    def installed(self) -> list[tuple[str, HookSpec]]:
        return self.coordinator.stack.installed()

    def run(self, request: RunRequest) -> RunResult:
        """One request through the pipeline (see Coordinator.run)."""
        prepared, mask = self._prepared(request)
        result = self.coordinator.run(prepared)
        self._ran(request, prepared)
        return dataclasses.replace(result, attention_mask=mask)

    def run_variants(self, requests: Sequence[RunRequest]) -> list[RunResult]:
        """Several requests, each with its own specs, spread over the replicas (see
        Coordinator.run_variants)."""
        prepared = [self._prepared(request) for request in requests]
        results = self.coordinator.run_variants([p for p, _ in prepared])
        for request, (p, _) in zip(requests, prepared):
            self._ran(request, p)
        return [dataclasses.replace(result, attention_mask=mask) for result, (_, mask) in zip(results, prepared)]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the pipeline (see HookedModel.forward); with `past_kv_cache` only `input`, the
        new tokens, runs, attending to the cached ones (the cache grows unless frozen)."""
        return self.call_with(args, kwargs)

    def _prepared(self, request: RunRequest) -> tuple[RunRequest, Optional[Tensor]]:
        """The request as the coordinator takes it (token ids on the CPU; with a key/value
        cache, a mask over the cached tokens too), and the attention mask of the input alone."""
        if request.forward_kwargs:
            raise TypeError(f"a Tracer's run takes input, return_type, attention_mask, metric and past_kv_cache; got {sorted(request.forward_kwargs)}")
        tokens, mask = self.tokens_of(request.input, request.attention_mask)
        run_mask = mask if request.kv_cache is None else self._kv_mask(request.kv_cache, tokens, mask)
        resume = request.resume
        if resume is not None:
            if not isinstance(resume.base, StageBaseRun) or resume.base.coordinator is not self.coordinator:
                raise TypeError(f"Resume.base must be a base run of this Tracer (tracer.base_run(tokens)); got {type(resume.base).__name__}")
            resume.check(tokens, self.plan.n_layers, request, mask)
            mask = None if mask is None else mask[:, resume.position:]  # the output's positions
        prepared = dataclasses.replace(request, input=tokens, attention_mask=run_mask)
        return prepared, mask

    def _ran(self, request: RunRequest, prepared: RunRequest) -> None:
        """After a run: a key/value cache that is not frozen now holds the new tokens too."""
        if request.kv_cache is not None and not request.kv_cache.frozen:
            request.kv_cache.previous_attention_mask = prepared.attention_mask

    def _place(self, tokens: Tensor, mask: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
        """Token ids and attention mask on the CPU; a mask of all ones becomes None."""
        if mask is not None and bool(mask.all()):
            mask = None
        return tokens.cpu(), None if mask is None else mask.cpu()

    def _lens_config_args(self) -> tuple[Any, dict]:
        if self.architecture is None:
            return super()._lens_config_args()
        options = dict(device="cpu", dtype=getattr(torch, self.plan.dtype), n_devices=len(self.plan.stages), options=self.coordinator.point_options)
        return self.config, options

    def _dataset_metadata(self) -> dict:
        return {"model": self.coordinator.source, "dtype": self.plan.dtype, "shard_plan": self.plan.to_dict()}

    def shares(self, path: Union[str, os.PathLike]) -> bool:
        """Whether every worker reaches `path` as this process does: always for an object
        store URI (s3://...); for a local folder, whether a file put there now exists for
        each worker (workers on other machines need a filesystem shared with this one)."""
        path = os.fspath(path)
        return is_uri(path) or self.coordinator.shares(path)

    # ------------------------------------------------------------------ key/value caches

    def _keep_base(self, tokens: Tensor, mask: Optional[Tensor]) -> StageBaseRun:
        """One run of `tokens` on every replica, whose stages keep it (see StageBaseRun)."""
        session = f"base.{uuid.uuid4().hex[:12]}"
        request = RunRequest(
            tokens, attention_mask=torch.ones_like(tokens) if mask is None else mask, specs=(Resume.keeping(self.plan.n_layers),),
            whole_batch=True,
        )
        result = self.coordinator.keep_base(request, session)
        return StageBaseRun(self.coordinator, session, tokens, mask, result.output)

    def _new_kv_cache(self, batch_size: int) -> StageKeyValueCache:
        """A cache kept on the stages (see StageKeyValueCache); close() frees their memory."""
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


def _microbatch_size(size: Union[int, str, None], plan: ShardPlan, config: Any, seq_len: Optional[int]) -> Optional[int]:
    """A Tracer's microbatch size: as given, or for "auto" the largest that fits every stage's
    budget in a run of seq_len tokens that keeps its graph for a backward."""
    if size != "auto":
        if isinstance(size, str):
            raise ValueError(f"microbatch_size must be a positive int, None or 'auto'; got {size!r}")
        return size
    if seq_len is None:
        raise ValueError("microbatch_size='auto' needs seq_len=, the tokens per example it sizes microbatches for")
    return fit_microbatch(plan, config, seq_len=seq_len, incl_bwd=True)
