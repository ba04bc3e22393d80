"""PipelineRun: one request through R replicas of an N-stage pipeline of workers.

The batch is split into microbatches spread over the replicas (or kept whole). Stage i's
output handle goes straight to stage i+1, so the driver never holds hidden states. With
gradients wanted, the last stage's loss (or metric) is backpropagated stage by stage in
reverse. Each stage's results are taken (or written to a dataset) right behind its forward
when there is no backward, so that they leave the workers while later microbatches compute.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from shardlens.cluster.sessions import KVSession
from shardlens.cluster.worker import unpack
from shardlens.hooks.run import Resume, RunRequest, RunResult, output_of
from shardlens.sharding import StageIO
from shardlens.tables.parquet import delete_parts


@dataclass(frozen=True)
class Job:
    """One microbatch: its batch id on the workers, its replica, and its rows of the batch."""

    batch_id: str
    replica: int
    rows: slice


@dataclass(frozen=True)
class Route:
    """Where a run goes: the replicas it may use, the stage it enters at (a run resumed at a
    layer enters at the stage that holds it), and its microbatch size (None: the batch split
    evenly over the replicas)."""

    replicas: tuple[int, ...]
    first_stage: int = 0
    microbatch_size: Optional[int] = None


class PipelineRun:
    """One request (tokens on the CPU; with a key/value session, its mask covers the cached
    tokens too) through the pipeline: `launch()` sends it on its way, `result()` waits.

    Args:
        backend: the backend the workers run on (call / get).
        workers: workers[r][s] is replica r's stage s.
        request: what to run.
        run_id: unique per run; names the microbatches on the workers.
        route: which replicas, from which stage.
        stage_names: each stage's hook names (a stage gets only its own share of `sources`).
        level: the context level the request's own specs are installed at, and per_stage
            their JSON for each stage (see SpecStack.split).
        backward: backpropagate after the forward pass.
        kv: the key/value session the run reads (and, unless frozen, extends); a resumed
            run's is its base run's.
        keep_base: keep what the specs read on the workers, as the base run of this session,
            instead of taking it.
    """

    def __init__(
        self, backend: Any, workers: list[list[Any]], request: RunRequest, run_id: int, route: Route, *,
        stage_names: Sequence[Sequence[str]], level: int, per_stage: tuple, backward: bool, kv: Optional[KVSession] = None,
        keep_base: Optional[str] = None,
    ):
        self.backend, self.request, self.route, self.kv, self.keep_base = backend, request, route, kv, keep_base
        self.stage_names = [set(names) for names in stage_names[route.first_stage:]]
        self.level, self.per_stage, self.backward = level, per_stage, backward
        self.tokens: Tensor = request.input
        self.mask: Optional[Tensor] = request.attention_mask
        chunks = self._microbatches(self.tokens.shape[0], request.whole_batch or kv is not None)
        self.jobs = [Job(f"{run_id}.{m}", route.replicas[(run_id + m) % len(route.replicas)], chunk) for m, chunk in enumerate(chunks)]
        self.rows = {job.replica: workers[job.replica][route.first_stage:] for job in self.jobs}
        self.takes: list = []
        self.ends: list = []
        self.finished = False

    def _microbatches(self, n: int, whole: bool) -> list[slice]:
        if whole:
            return [slice(0, n)]
        size = self.route.microbatch_size or -(-n // len(self.route.replicas))
        return [slice(start, min(start + size, n)) for start in range(0, n, size)]

    def _get(self, handles: Any) -> Any:
        return self.backend.get(handles)

    # ------------------------------------------------------------------ forward

    def launch(self) -> "PipelineRun":
        """Install the request's own specs on its replicas and send every microbatch through
        its replica's stages (nothing waits for the results)."""
        try:
            self._install()
            for job in self.jobs:
                self.ends.append(self._forward(job))
        except BaseException:  # a backend that runs calls at once fails here
            self.abort()
            raise
        return self

    def _install(self) -> None:
        handles = [
            self.backend.call(row[s], "install", self.level, list(specs))
            for row in self.rows.values() for s, specs in enumerate(self.per_stage[self.route.first_stage:]) if specs
        ]
        self._get(handles)

    def _forward(self, job: Job) -> Any:
        request, chunk = self.request, job.rows
        io: Any = StageIO(
            input_ids=self.tokens[chunk], attention_mask=None if self.mask is None else self.mask[chunk], labels=self.tokens[chunk],
            metric=None if request.metric is None else request.metric.rows(chunk),
        )
        first = request.logits_from(self.tokens.shape[1], self.mask, backward=self.backward) if self.kv is None or request.resume else 0
        if request.resume is not None:
            io = _resumed(io, request.resume)
            first = max(first - request.resume.position, 0)
        io = dataclasses.replace(io, logits_from=first)
        keep_logits = request.return_type in ("logits", "both")
        for worker, stage_names in zip(self.rows[job.replica], self.stage_names):
            sources = _sources_for(request.sources, stage_names, chunk)
            io = self.backend.call(
                worker, "forward", job.batch_id, io, keep_graph=self.backward, sources=sources, kv=self.kv, keep_logits=keep_logits,
                weight_grads=request.weight_grads,
            )
            if not self.backward:
                self.takes.append(self._collect(worker, job))
        return io

    def _collect(self, worker: Any, job: Job) -> Any:
        """The call that gets one worker's results for a microbatch: take them, or write them."""
        write = self.request.write
        if self.keep_base is not None:
            return self.backend.call(worker, "keep_base", job.batch_id, self.keep_base)
        if write is None:
            return self.backend.call(worker, "take", job.batch_id)
        destination = dataclasses.replace(write, examples=write.rows(self.tokens.shape[0])[job.rows])
        mask = None if self.mask is None else self.mask[job.rows]
        return self.backend.call(worker, "write", job.batch_id, destination, job.rows.start, mask)

    # ------------------------------------------------------------------ the rest

    def result(self) -> RunResult:
        """Wait for the run: backward (when asked), results taken or written; on failure,
        nothing of the run is left on the workers or in the dataset."""
        try:
            outs = self._get(self.ends)
            weights = self._loss_weights()
            if self.backward:  # gradients are stored during backward: take only after it
                self._backward(weights)
                self.takes.extend(self._collect(w, job) for job in self.jobs for w in self.rows[job.replica])
            taken = self._get(self.takes)
            if self.request.write is not None:
                self._get(self._finish_writes())
        except BaseException:
            self.abort()
            raise
        self.finished = True
        self._remove_specs()
        keep_logits = self.request.return_type in ("logits", "both")
        logits = torch.cat([unpack(o.logits) for o in outs]) if keep_logits else None
        loss = sum(w * o.loss for w, o in zip(weights, outs)) if outs[0].loss is not None else None
        output = output_of(self.request.return_type, logits, loss)
        if self.request.write is not None:
            return RunResult(output, parts=tuple(part for parts in taken for part in parts))
        if self.keep_base is not None:
            return RunResult(output)
        return RunResult(output, _merge(taken, len(self.jobs), len(self.stage_names)))

    def _loss_weights(self) -> list[float]:
        """Each microbatch's share of the batch's loss: of its predicted tokens for the mean
        next-token loss; of its examples for a metric (a mean over examples)."""
        chunks = [job.rows for job in self.jobs]
        if self.request.metric is not None:
            return [(c.stop - c.start) / self.tokens.shape[0] for c in chunks]
        return _loss_weights(self.tokens, self.mask, chunks)

    def _backward(self, weights: list[float]) -> None:
        ends = []
        for job, weight in zip(self.jobs, weights):
            grad: Any = torch.tensor(weight)
            for worker in reversed(self.rows[job.replica]):
                grad = self.backend.call(worker, "backward", job.batch_id, grad)
            ends.append(grad)
        self._get(ends)

    def _finish_writes(self) -> list:
        """The calls that wait for the parts the run's workers are still writing."""
        return [self.backend.call(w, "finish_writes", self.request.write.path) for row in self.rows.values() for w in row]

    def abort(self) -> None:
        """Undo an unfinished run: its batches, its parts, its growth of a key/value session
        and its own specs leave the workers (quietly: the run has already failed)."""
        if self.finished:
            return
        self.finished = True
        written = self._get_each_quietly(self.takes)
        if self.request.write is not None:
            # Wait for the writes in flight first, so that no part appears after the delete.
            self._get_each_quietly(self._finish_writes())
            delete_parts(self.request.write.path, [part for parts in written if parts for part in parts])
        if self.kv is not None and not self.kv.frozen:  # the stages before the failure have grown the session
            self._get_quietly([self.backend.call(w, "kv_truncate", self.kv.session, self.kv.held) for row in self.rows.values() for w in row])
        self._get_quietly([self.backend.call(w, "drop", job.batch_id) for job in self.jobs for w in self.rows[job.replica]])
        self._remove_specs()

    def _remove_specs(self) -> None:
        """Remove the run's own specs from every worker it used."""
        if any(self.per_stage):
            self._get_quietly([self.backend.call(w, "remove", self.level) for row in self.rows.values() for w in row])

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


def _loss_weights(tokens: Tensor, mask: Optional[Tensor], chunks: Sequence[slice]) -> list[float]:
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


def _resumed(io: StageIO, resume: Resume) -> StageIO:
    """A microbatch entering inside its base run: no token ids or hidden states (the stage
    that holds the layer has the base run's), the position ids and labels of the positions
    it runs, and a mask over the base run's positions before them too."""
    tokens = io.input_ids
    positions, mask = resume.entry(tokens, io.attention_mask)
    return dataclasses.replace(
        io, input_ids=None, hidden=None, start_layer=resume.layer, attention_mask=mask, labels=tokens[:, resume.position:], position_ids=positions,
    )


def _sources_for(sources: Any, names: set[str], chunk: slice) -> dict:
    return {key: {name: tensor[chunk] for name, tensor in cache.items() if name in names} for key, cache in sources.items()}


def _merge(taken: list[dict], n_jobs: int, n_stages: int) -> dict[str, Tensor]:
    """Per-microbatch, per-stage packed results -> one new tensor per entry, microbatches
    concatenated (the one copy of each value the driver makes; a sparse entry coalesced, as
    one process stores it)."""
    per_job: list[dict] = [dict() for _ in range(n_jobs)]
    for i, result in enumerate(taken):
        per_job[i // n_stages].update(result)
    names = per_job[0].keys() if per_job else []
    merged = {name: torch.cat([unpack(job[name]) for job in per_job]) for name in names}
    return {name: t.coalesce() if t.is_sparse else t for name, t in merged.items()}
