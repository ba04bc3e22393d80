"""Coordinator: R replicas x N stages of workers, the spec stack, and the pipeline runs.

The coordinator's spec stack is the truth: each worker gets the specs that match its hook
points, with their context level; a worker found restarted (its incarnation changed) is
re-sent the whole stack before it runs anything.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from shardlens.cluster.worker import unpack
from shardlens.errors import WorkerError
from shardlens.hooks.metrics import Metric
from shardlens.hooks.ops import FwdBwd, Splice, SPLICE_POINTS
from shardlens.hooks.specs import HookSpec
from shardlens.hooks.taps import PointOptions
from shardlens.sharding import ShardPlan, StageIO
from shardlens.tables.parquet import delete_parts


@dataclass(frozen=True)
class StackEntry:
    """Specs installed at one context level (None: permanent or level-less), as each
    stage received them: per_stage[s] is a list of spec JSON texts."""

    level: Optional[int]
    specs: tuple
    per_stage: tuple


@dataclass(frozen=True)
class KVSession:
    """A key/value session kept on the first replica's stages: its id, whether a run may
    extend it, and how many times a run repeats its batch (frozen sessions only)."""

    session: str
    frozen: bool = False
    repeat: int = 1
    held: int = 0  # tokens the session holds before this run


@dataclass(frozen=True)
class Destination:
    """Where a run's workers write what they cache, instead of handing it to the driver:
    the Parquet dataset at `path` (every worker must reach it: a local path on one machine,
    shared storage or an object store URI across nodes), in `layout`, as the dataset rows
    `examples` (one per example of the batch) of `batch`, with `metadata` in every part.
    With `name`, a microbatch's parts are named `<name>-<its first row>`, so that a batch
    written again replaces its parts."""

    path: str
    layout: str
    examples: Tensor
    batch: int = 0
    metadata: Optional[dict] = None
    name: Optional[str] = None

    def part_name(self, chunk: slice) -> Optional[str]:
        return None if self.name is None else f"{self.name}-{chunk.start:05d}"


def needs_backward(spec: HookSpec) -> bool:
    return spec.dir == "bwd" or (isinstance(spec.op, FwdBwd) and bool(spec.op.bwd))


class Coordinator:
    """Runs batches through R replicas of an N-stage pipeline of StageWorkers."""

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
        n = len(plan.stages)
        specs = [
            dict(source=str(source), plan_json=plan.to_json(), index=s, replica=r, device=device, threads=worker_threads,
                 allow_code=allow_code, point_options=dataclasses.asdict(point_options))
            for r in range(replicas) for s in range(n)
        ]
        needs = [{**plan.stages[s].resources, "memory": plan.stages[s].host_bytes} for r in range(replicas) for s in range(n)]
        flat = backend.make_workers(specs, needs)
        self.workers = [flat[r * n:(r + 1) * n] for r in range(replicas)]
        self.stage_names: list[list[str]] = self._get([backend.call(w, "hook_names") for w in self.workers[0]])
        self.incarnations = self._get([backend.call(w, "ping") for row in self.workers for w in row])
        self.stack: list[StackEntry] = []
        self._runs = itertools.count()
        self.recoveries = 0  # runs retried after a worker was lost

    def _get(self, handles: Any) -> Any:
        return self.backend.get(handles)

    @property
    def hook_names(self) -> list[str]:
        return [name for names in self.stage_names for name in names]

    # ------------------------------------------------------------------ the spec stack

    def push(self, level: Optional[int], specs: Sequence[HookSpec]) -> None:
        """Validate specs against every stage's hook points, then send each stage its share."""
        per_stage, known = self._split(specs)
        self._install(level, per_stage, self.workers)
        self.stack.append(StackEntry(level, tuple(specs), tuple(tuple(p) for p in per_stage)))
        self.stage_names = known

    def _split(self, specs: Sequence[HookSpec]) -> tuple[list[list[str]], list[list[str]]]:
        """Each stage's share of the specs (as JSON), and the stages' hook names after them
        (a Splice adds points). Unknown names fail here, before anything is sent."""
        per_stage: list[list[str]] = [[] for _ in self.stage_names]
        known = [list(names) for names in self.stage_names]
        for spec in specs:
            names = spec.resolve(self._all(known))
            for s, stage_names in enumerate(known):
                mine = [n for n in names if n in stage_names]
                if mine:
                    per_stage[s].append(dataclasses.replace(spec, points=tuple(mine)).to_json(allow_code=self.allow_code))
                    if isinstance(spec.op, Splice):
                        stage_names += [f"{n}.{sub}" for n in mine for sub in SPLICE_POINTS]
        return per_stage, known

    @staticmethod
    def _all(known: list[list[str]]) -> list[str]:
        return [name for names in known for name in names]

    def _install(self, level: Optional[int], per_stage: list[list[str]], rows: list[list[Any]]) -> None:
        handles = [
            self.backend.call(row[s], "install", level, specs)
            for row in rows for s, specs in enumerate(per_stage) if specs
        ]
        try:
            self._get(handles)
        except BaseException:
            if level is not None:
                self._get([self.backend.call(w, "pop", level) for row in rows for w in row])
            raise

    def run_variants(self, variants: Sequence[tuple[Tensor, Optional[Tensor], Sequence[HookSpec]]]) -> list[Tensor]:
        """The logits of several whole-batch runs, each with its own specs, spread over the
        replicas: each round gives every replica one variant, installed on that replica only
        at a level of its own and removed after. Used by sweeps, whose patches select rows."""
        self._restore()
        logits: list[Tensor] = []
        level = 1_000_000 + next(self._runs)  # above any hooks() level, so it never collides
        for start in range(0, len(variants), self.replicas):
            round_ = variants[start:start + self.replicas]
            rows = [[row] for row in self.workers[:len(round_)]]
            try:
                for (_, _, specs), row in zip(round_, rows):
                    self._install(level, self._split(specs)[0], row)
                ends = []
                for (tokens, mask, _), (workers,) in zip(round_, rows):
                    io: Any = StageIO(input_ids=tokens, attention_mask=mask)
                    for worker in workers:
                        io = self.backend.call(worker, "forward", f"variant.{level}.{start}", io)
                    ends.append(io)
                logits += [unpack(out.logits).clone() for out in self._get(ends)]
            finally:
                self._get_quietly([self.backend.call(w, "pop", level) for (row,) in rows for w in row])
                self._get_quietly([self.backend.call(w, "drop", f"variant.{level}.{start}") for (row,) in rows for w in row])
        return logits

    def pop(self, level: int) -> None:
        """Remove one context level on every worker (and from the stack)."""
        self.stack = [e for e in self.stack if e.level != level]
        self._get([self.backend.call(w, "pop", level) for row in self.workers for w in row])

    def reset(self, including_permanent: bool = False) -> None:
        self.stack = [e for e in self.stack if not including_permanent and all(s.permanent for s in e.specs)]
        self._get([self.backend.call(w, "reset", including_permanent) for row in self.workers for w in row])

    def needs_backward(self) -> bool:
        return any(needs_backward(spec) for entry in self.stack for spec in entry.specs)

    def _restore(self) -> None:
        """Re-send the whole spec stack to every worker that restarted since we last looked."""
        pings = [self.backend.call(w, "ping") for row in self.workers for w in row]
        current = self._get(pings)
        flat = [w for row in self.workers for w in row]
        n = len(self.stage_names)
        for i, (old, new) in enumerate(zip(self.incarnations, current)):
            if old != new:
                worker, stage = flat[i], i % n
                for entry in self.stack:
                    if entry.per_stage[stage]:
                        self._get(self.backend.call(worker, "install", entry.level, list(entry.per_stage[stage])))
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

    def run(
        self,
        tokens: Tensor,
        *,
        attention_mask: Optional[Tensor] = None,
        backward: bool = False,
        sources: Optional[dict] = None,
        metric: Optional[Metric] = None,
        split: bool = True,
        kv: Optional[KVSession] = None,
        write: Optional[Destination] = None,
        keep_logits: bool = True,
    ) -> tuple[Optional[Tensor], Tensor, Any]:
        """One batch through the pipeline: (logits, loss or metric, what the specs stored).
        With keep_logits=False the last stages send no logits back (the first value is None).

        The batch is split into microbatches, spread over the replicas (split=False keeps
        it whole: specs that select batch rows need the whole batch); with backward=True the
        batch's mean next-token loss, or `metric`, is backpropagated stage by stage. With
        `kv`, the batch holds only new tokens, runs whole on the first replica (whose stages
        hold the session's keys and values) and `attention_mask` covers the cached tokens too.
        With `write`, each worker writes what it stored for each microbatch straight into that
        Parquet dataset, in the background while it runs on, and the third value is the list
        of parts written once all are on disk; the parts of a run that fails are deleted (a
        retried run writes its own).
        """
        attempt = 0
        while True:
            try:
                self._restore()
                return self._run_once(tokens, attention_mask, backward, sources or {}, metric, split, kv, write, keep_logits)
            except Exception as error:
                if not self.backend.is_lost(error) or attempt >= self.retries:
                    raise
                attempt += 1
                self.recoveries += 1
                self._wait_for_workers()

    def _microbatches(self, n: int, split: bool) -> list[slice]:
        if not split:
            return [slice(0, n)]
        size = self.microbatch_size or -(-n // self.replicas)
        return [slice(start, min(start + size, n)) for start in range(0, n, size)]

    def _run_once(
        self, tokens: Tensor, mask: Optional[Tensor], backward: bool, sources: dict, metric: Optional[Metric], split: bool,
        kv: Optional[KVSession] = None, write: Optional[Destination] = None, keep_logits: bool = True,
    ) -> tuple:
        run = next(self._runs)
        chunks = self._microbatches(tokens.shape[0], split and kv is None)
        jobs = [(f"{run}.{m}", 0 if kv else (run + m) % self.replicas, chunk) for m, chunk in enumerate(chunks)]
        takes: list = []
        try:
            outs = self._get(self._forward(jobs, tokens, mask, backward, sources, metric, takes, kv, write, keep_logits))
            if metric is None:
                loss_weights = _loss_weights(tokens, mask, chunks)
            else:  # a metric is a mean over examples
                loss_weights = [(c.stop - c.start) / tokens.shape[0] for c in chunks]
            if backward:  # gradients are stored during backward: take only after it
                self._backward(jobs, loss_weights)
                for batch_id, r, chunk in jobs:
                    takes.extend(self._collect(w, batch_id, chunk, mask, write) for w in self.workers[r])
            taken = self._get(takes)
            if write is not None:
                self._get(self._finish_writes(jobs, write))
        except BaseException:
            written = self._get_each_quietly(takes)
            if write is not None:
                # Wait for the writes in flight first, so that no part appears after the delete.
                self._get_each_quietly(self._finish_writes(jobs, write))
                delete_parts(write.path, [part for parts in written if parts for part in parts])
            self._get_quietly([self.backend.call(w, "drop", bid) for bid, r, _ in jobs for w in self.workers[r]])
            if kv is not None and not kv.frozen:  # the stages before the failure have grown the session
                self._get_quietly([self.backend.call(w, "kv_truncate", kv.session, kv.held) for w in self.workers[0]])
            raise
        logits = torch.cat([unpack(o.logits) for o in outs]) if keep_logits else None
        loss = sum(w * o.loss for w, o in zip(loss_weights, outs))
        if write is not None:
            return logits, loss, [part for parts in taken for part in parts]
        return logits, loss, _merge(taken, len(jobs), len(self.stage_names))

    def _forward(
        self, jobs: list, tokens: Tensor, mask: Optional[Tensor], backward: bool, sources: dict, metric: Optional[Metric],
        takes: list, kv: Optional[KVSession] = None, write: Optional[Destination] = None, keep_logits: bool = True,
    ) -> list:
        """Sends every microbatch through its replica's stages; returns the handles of the last
        stages' outputs. Without backward, it also appends to `takes` each stage's take (or
        write) for the microbatch, queued right behind its forward, so that results stream
        out while later microbatches compute (and leave the workers' memory as early as they
        can)."""
        session = {} if kv is None else dict(kv_cache=kv.session, kv_frozen=kv.frozen, kv_repeat=kv.repeat)
        last = []
        for batch_id, r, chunk in jobs:
            io: Any = StageIO(
                input_ids=tokens[chunk], attention_mask=None if mask is None else mask[chunk], labels=tokens[chunk],
                metric=None if metric is None else metric.rows(chunk),
            )
            for s, worker in enumerate(self.workers[r]):
                stage_sources = _sources_for(sources, self.stage_names[s], chunk)
                io = self.backend.call(
                    worker, "forward", batch_id, io, keep_graph=backward, sources=stage_sources, keep_logits=keep_logits, **session
                )
                if not backward:
                    takes.append(self._collect(worker, batch_id, chunk, mask, write))
            last.append(io)
        return last

    def _collect(self, worker: Any, batch_id: str, chunk: slice, mask: Optional[Tensor], write: Optional[Destination]) -> Any:
        """The call that gets one worker's results for a microbatch: take them, or write them."""
        if write is None:
            return self.backend.call(worker, "take", batch_id)
        return self.backend.call(
            worker, "write", batch_id, write.path, layout=write.layout, examples=write.examples[chunk],
            attention_mask=None if mask is None else mask[chunk], batch=write.batch, metadata=write.metadata,
            name=write.part_name(chunk),
        )

    def _finish_writes(self, jobs: list, write: Destination) -> list:
        """The calls that wait for the parts the run's workers are still writing."""
        replicas = sorted({r for _, r, _ in jobs})
        return [self.backend.call(w, "finish_writes", write.path) for r in replicas for w in self.workers[r]]

    def _backward(self, jobs: list, weights: list[float]) -> None:
        ends = []
        for (batch_id, r, _), weight in zip(jobs, weights):
            grad: Any = torch.tensor(weight)
            for worker in reversed(self.workers[r]):
                grad = self.backend.call(worker, "backward", batch_id, grad)
            ends.append(grad)
        self._get(ends)

    def _get_quietly(self, handles: list) -> None:
        try:
            self._get(handles)
        except Exception:
            pass

    def _get_each_quietly(self, handles: list) -> list:
        """Each handle's value, None for those that failed."""
        values = []
        for handle in handles:
            try:
                values.append(self._get(handle))
            except Exception:
                values.append(None)
        return values

    def step(self, tokens: Tensor, attention_mask: Tensor, session: str) -> Tensor:
        """One generation step on the first replica: the new tokens through every stage, each
        stage keeping its own layers' keys and values for `session`; returns the logits.
        `attention_mask` covers the cached and the new tokens."""
        io: Any = StageIO(input_ids=tokens, attention_mask=attention_mask)
        for worker in self.workers[0]:
            io = self.backend.call(worker, "forward", session, io, kv_cache=session)
        return unpack(self._get(io).logits).clone()

    def take(self, session: str) -> dict[str, Tensor]:
        """What the first replica's reading specs stored under `session` (and forget it)."""
        merged: dict[str, Tensor] = {}
        for result in self._get([self.backend.call(w, "take", session) for w in self.workers[0]]):
            merged.update({name: unpack(packed).clone() for name, packed in result.items()})
        return merged

    def kv_entries(self, session: str) -> dict[int, tuple[Tensor, Tensor]]:
        """A key/value session's keys and values, by layer, gathered from the first replica's stages."""
        merged: dict[int, tuple[Tensor, Tensor]] = {}
        for entries in self._get([self.backend.call(w, "kv_entries", session) for w in self.workers[0]]):
            merged.update(entries)
        return merged

    def end_session(self, session: str) -> None:
        self._get_quietly([self.backend.call(w, "drop", session) for w in self.workers[0]])

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


def _loss_weights(tokens: Tensor, mask: Optional[Tensor], chunks: list[slice]) -> list[float]:
    """Each microbatch's share of the batch's predicted tokens, so that the weighted sum of
    microbatch losses is the batch's mean next-token loss."""
    if mask is None:
        counts = [(c.stop - c.start) * (tokens.shape[1] - 1) for c in chunks]
    else:
        valid = (mask[:, :-1].bool() & mask[:, 1:].bool()).sum(-1)
        counts = [int(valid[c].sum()) for c in chunks]
    total = sum(counts)
    if total == 0:  # nothing to predict (one-token inputs): the loss is a mean of empty sums
        return [1.0 / len(chunks)] * len(chunks)
    return [count / total for count in counts]


def _sources_for(sources: dict, names: list[str], chunk: slice) -> dict:
    return {
        key: {name: tensor[chunk] for name, tensor in cache.items() if name in names}
        for key, cache in sources.items()
    }


def _merge(taken: list[dict], n_jobs: int, n_stages: int) -> dict[str, Tensor]:
    """Per-microbatch, per-stage packed results -> one new tensor per entry, microbatches
    concatenated (the one copy of each value the driver makes)."""
    per_job = [dict() for _ in range(n_jobs)]
    for i, result in enumerate(taken):
        per_job[i // n_stages].update(result)
    names = per_job[0].keys() if per_job else []
    return {name: torch.cat([unpack(job[name]) for job in per_job]) for name in names}
