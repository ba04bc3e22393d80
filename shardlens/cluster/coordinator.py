"""Coordinator: R replicas x N stages of workers, their spec stack, and runs.

The spec stack (cluster.stack) is the truth: each worker gets the specs that match its hook
points, with their context level; a worker found restarted (its incarnation changed) is
re-sent the whole stack before it runs anything. A run (cluster.pipeline) goes through the
pipeline as one RunRequest and comes back as one RunResult; key/value sessions
(cluster.sessions) keep earlier tokens on the first replica's stages, base runs on every
replica's.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, Optional

from torch import Tensor

import shardlens.progress
from shardlens.cluster.pipeline import PipelineRun, Route
from shardlens.cluster.sessions import KVSession
from shardlens.cluster.stack import SpecStack
from shardlens.errors import WorkerError
from shardlens.hooks.run import RunRequest, RunResult
from shardlens.hooks.specs import HookSpec
from shardlens.hooks.taps import PointOptions
from shardlens.sharding import ShardPlan

RUN_LEVELS = 1_000_000  # a run's own specs go above any hooks() level: RUN_LEVELS + the run's id


class Coordinator:
    """Runs requests through R replicas of an N-stage pipeline of StageWorkers.

    Args:
        source: the checkpoint folder every worker builds its stage from.
        plan: the ShardPlan.
        backend: LocalBackend or RayBackend (see cluster.backends).
        replicas: pipelines that split the batches (data parallel).
        microbatch_size: examples per microbatch (None: the batch split over the replicas).
        device, worker_threads, allow_code, point_options: passed to each StageWorker.
        retries: how many times a run whose worker was lost is run again.

    Starting reports a "load" task (shardlens.progress): a step per worker, as each has built its stage.
    """

    def __init__(
        self,
        source: str,
        plan: ShardPlan,
        backend: Any,
        *,
        replicas: int = 1,
        microbatch_size: Optional[int] = None,
        device: Optional[str] = None,
        worker_threads: Optional[int] = None,
        allow_code: bool = False,
        retries: int = 2,
        point_options: PointOptions = PointOptions(),
    ):
        if not isinstance(replicas, int) or replicas < 1:
            raise ValueError(f"replicas must be a positive int; got {replicas!r}")
        if microbatch_size is not None and (not isinstance(microbatch_size, int) or microbatch_size < 1):
            raise ValueError(f"microbatch_size must be None or a positive int; got {microbatch_size!r}")
        self.source, self.plan, self.backend, self.replicas = str(source), plan, backend, replicas
        self.microbatch_size, self.allow_code, self.retries = microbatch_size, allow_code, retries
        self.point_options = point_options
        n = len(plan.stages)
        arguments = [
            dict(source=str(source), plan_json=plan.to_json(), index=s, replica=r, device=device, threads=worker_threads,
                 allow_code=allow_code, point_options=dataclasses.asdict(point_options))
            for r in range(replicas) for s in range(n)
        ]
        needs = [{**plan.stages[s].resources, "memory": plan.stages[s].host_bytes} for r in range(replicas) for s in range(n)]
        loading = f"loading {n} stage{'s' * (n > 1)}" + (f" x {replicas} replicas" if replicas > 1 else "")
        with shardlens.progress.task("load", loading, total=len(arguments), unit="stage") as task:  # a step as each worker has built its stage
            flat = backend.make_workers(arguments, needs, on_built=task.advance)
            self.workers = [flat[r * n:(r + 1) * n] for r in range(replicas)]
            # a worker that failed to build raises here, ending the task with ok false
            self.stack = SpecStack(self._get([backend.call(w, "hook_names") for w in self.workers[0]]), allow_code=allow_code)
            self.incarnations = self._get([backend.call(w, "ping") for row in self.workers for w in row])
        self._runs = itertools.count()
        self.recoveries = 0  # runs retried after a worker was lost

    def _get(self, handles: Any) -> Any:
        return self.backend.get(handles)

    def _all(self) -> list[Any]:
        return [w for row in self.workers for w in row]

    @property
    def hook_names(self) -> list[str]:
        return self.stack.hook_names

    @property
    def stage_names(self) -> list[list[str]]:
        return self.stack.stage_names

    # ------------------------------------------------------------------ the spec stack

    def push(self, level: Optional[int], specs: Sequence[HookSpec], *, check: Optional[Callable] = None) -> None:
        """Validate specs against every stage's hook points (and with check(spec, names)),
        then send each stage its share. When a worker refuses its share, every worker is
        put back to what the stack holds."""
        per_stage, known = self.stack.split(specs, check=check)
        try:
            self._get([self.backend.call(row[s], "install", level, list(share)) for row in self.workers for s, share in enumerate(per_stage) if share])
        except BaseException:
            self._resync()
            raise
        self.stack.push(level, specs, per_stage, known)

    def _resync(self) -> None:
        """Make every worker hold exactly what the stack holds (quietly: called on failure)."""
        n = len(self.stage_names)
        try:
            for i, worker in enumerate(self._all()):
                self._get(self.backend.call(worker, "remove", None, including_permanent=True))
                for level, specs in self.stack.for_stage(i % n):
                    self._get(self.backend.call(worker, "install", level, list(specs)))
        except Exception:
            pass  # a lost worker gets the whole stack when it comes back (see _restore)

    def remove(self, level: Optional[int], *, including_permanent: bool = False, direction: str = "both", clear_contexts: bool = False) -> None:
        """Remove one context level's specs (every level's when None) on every worker."""
        self.stack.remove(level, including_permanent=including_permanent, direction=direction)
        options = dict(including_permanent=including_permanent, direction=direction, clear_contexts=clear_contexts)
        self._get([self.backend.call(w, "remove", level, **options) for w in self._all()])

    def _restore(self) -> None:
        """Re-send the whole spec stack to every worker that restarted since we last looked."""
        pings = [self.backend.call(w, "ping") for row in self.workers for w in row]
        current = self._get(pings)
        flat = [w for row in self.workers for w in row]
        n = len(self.stage_names)
        for i, (old, new) in enumerate(zip(self.incarnations, current)):
            if old != new:
                for level, specs in self.stack.for_stage(i % n):
                    self._get(self.backend.call(flat[i], "install", level, list(specs)))
        self.incarnations = current

    def _wait_for_workers(self, timeout: float = 120.0) -> None:
        """Until every worker answers again (Ray restarts lost ones, on another node when
        theirs died); fails at once when one cannot come back (see unrecoverable)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._restore()
                return
            except Exception as error:
                if not self.backend.is_lost(error):
                    raise
                reason = self.backend.unrecoverable()
                if reason is not None:
                    raise WorkerError(f"a stage worker was lost and cannot be restarted: {reason}") from None
                if time.monotonic() > deadline:
                    raise WorkerError(
                        f"a stage worker was lost and did not come back within {timeout:.0f} s ({self.backend.lost_nodes()}): {error}"
                    ) from error
                time.sleep(0.5)

    # ------------------------------------------------------------------ runs

    def run(self, request: RunRequest) -> RunResult:
        """One request through the pipeline (its input: token ids on the CPU; with a key/value
        session, its mask covers the cached tokens too). A run whose worker was lost is run
        again, up to `retries` times, once the worker is back with the whole spec stack."""
        return self._with_retries(lambda: self._launch(request, tuple(range(self.replicas))).result())

    def _with_retries(self, attempt: Callable[[], Any]) -> Any:
        """attempt(), after every worker is known to hold the stack; again, up to `retries`
        times, when it failed because a worker was lost, once the worker is back."""
        tries = 0
        while True:
            try:
                self._restore()
                return attempt()
            except Exception as error:
                if not self.backend.is_lost(error) or tries >= self.retries:
                    raise
                tries += 1
                self.recoveries += 1
                self._wait_for_workers()

    def run_variants(self, requests: Sequence[RunRequest]) -> list[RunResult]:
        """The results of several requests, each with its own specs, spread over the replicas:
        each round gives every replica one whole request (the variants' specs select batch
        rows), its specs installed on that replica only and removed after. Requests that read
        a key/value session run on the first replica, whose stages hold it."""
        results: list[RunResult] = []
        width = 1 if any(r.kv_cache is not None for r in requests) else self.replicas
        for start in range(0, len(requests), width):
            round_ = [dataclasses.replace(r, whole_batch=True) for r in requests[start:start + width]]
            results += self._with_retries(lambda: self._round(round_))
        return results

    def _round(self, requests: Sequence[RunRequest], *, keep_base: Optional[str] = None) -> list[RunResult]:
        """One request per replica, at the same time; a failure undoes every run of the round."""
        runs: list[PipelineRun] = []
        try:
            for replica, request in enumerate(requests):
                runs.append(self._launch(request, (replica,), keep_base=keep_base))
            return [run.result() for run in runs]
        except BaseException:
            for run in runs:
                run.abort()
            raise

    def _launch(self, request: RunRequest, replicas: tuple[int, ...], *, keep_base: Optional[str] = None) -> PipelineRun:
        run_id = next(self._runs)
        kv = None
        if request.kv_cache is not None:
            kv, replicas = request.kv_cache.session_of_run(), (0,)
        elif request.resume is not None:  # every replica holds the base run
            kv = KVSession(request.resume.base.session, frozen=True, repeat=request.resume.repeat, held=request.resume.position)
        elif keep_base is not None:
            kv = KVSession(keep_base)
        per_stage, _ = self.stack.split(request.specs)
        route = Route(replicas, self._first_stage(request), self.microbatch_size)
        backward = request.needs_grad or self.stack.needs_grad()
        run = PipelineRun(
            self.backend, self.workers, request, run_id, route, stage_names=self.stage_names, level=RUN_LEVELS + run_id,
            per_stage=per_stage, backward=backward, kv=kv, keep_base=keep_base,
        )
        return run.launch()

    def keep_base(self, request: RunRequest, session: str) -> RunResult:
        """Run `request` (its specs read each layer's resid_pre) on every replica at once,
        each replica's stages keeping what the specs read and their keys and values as the
        base run `session` (see StageWorker.keep_base). Returns the first replica's result."""

        others = dataclasses.replace(request, return_type=None)  # the first replica's logits are the base run's

        def attempt() -> list[RunResult]:
            try:
                return self._round([request] + [others] * (self.replicas - 1), keep_base=session)
            except BaseException:
                self.end_session(session)
                raise

        return self._with_retries(attempt)[0]

    def _first_stage(self, request: RunRequest) -> int:
        """The stage a run enters at: the one holding the layer it resumes at, else the first."""
        if request.resume is None:
            return 0
        for stage in self.plan.stages:
            if request.resume.layer in stage.layers:
                return stage.index
        raise ValueError(f"resume at layer {request.resume.layer}: the model has layers 0-{self.plan.stages[-1].layers[-1]}")

    def kv_entries(self, session: str) -> dict[int, tuple[Tensor, Tensor]]:
        """A key/value session's keys and values, by layer, gathered from the first replica's stages."""
        merged: dict[int, tuple[Tensor, Tensor]] = {}
        for entries in self._get([self.backend.call(w, "kv_entries", session) for w in self.workers[0]]):
            merged.update(entries)
        return merged

    def end_session(self, session: str) -> None:
        """Make every stage forget a key/value session or base run (nothing if they have)."""
        try:
            self._get([self.backend.call(w, "end_session", session) for w in self._all()])
        except Exception:
            pass

    def placement(self) -> list[dict]:
        """Where each worker runs: replica, stage, and node (its address; "local" in this process)."""
        nodes = self.backend.placement()
        n = len(self.stage_names)
        return [{"replica": i // n, "stage": i % n, "node": node} for i, node in enumerate(nodes)]

    def stats(self) -> list[dict]:
        return self._get([self.backend.call(w, "stats") for row in self.workers for w in row])

    def shares(self, path: str) -> bool:
        """Whether every worker sees the local folder `path` as this process does: a file
        put there now must exist for each of them (workers on other machines see it only
        through a filesystem they share with this one)."""
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".shardlens-probe-{uuid.uuid4().hex}")
        with open(probe, "w"):
            pass
        try:
            return all(self._get([self.backend.call(w, "sees", probe) for row in self.workers for w in row]))
        finally:
            os.remove(probe)

    def shutdown(self) -> None:
        self.backend.shutdown()
