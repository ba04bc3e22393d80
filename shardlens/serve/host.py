"""ModelHost: one model of the service: its Tracer, its queue of jobs, the key/value caches
and base runs its clients keep, and the one thread that runs its jobs.

Isolation: a job's specs go into its runs' own requests (a run installs them at its own
level on the workers and removes them when it ends or fails), or, for generation and base
runs, into a hooks() block around the job; the thread runs one job (or one shared batch of
runs) at a time, so no two clients' specs are ever installed together, except as the rows
of a shared batch (see serve.batching), where each client's specs act on its own rows.

Fairness: the queue takes jobs from the clients' tokens in turn, so a client with many
queued jobs does not hold back one with a single job.
"""

from __future__ import annotations

import collections
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

from torch import Tensor

from shardlens.errors import HookNameError, RemoteHookError, ServiceError, WorkerError
from shardlens.hooks.run import RunRequest, RunResult
from shardlens.hooks.specs import HookSpec
from shardlens.serve import batching

IDLE_S = 60.0  # a queued job nobody has asked about for this long is cancelled (its client went away)
RESULT_TTL_S = 300.0  # a finished job's result is kept this long for its client to fetch
SESSION_TTL_S = 600.0  # a key/value cache or base run unused this long is freed
MAX_SESSIONS = 8  # key/value caches and base runs one token may keep at once
STATES = ("queued", "running", "done", "failed", "cancelled")


@dataclass(frozen=True)
class Call:
    """What one client request asks of a model, decoded and checked.

    Attributes:
        kind: "run" (one run), "variants" (several, each with its own specs), "generate" or
            "base_run".
        runs: the runs (generate and base_run: one, holding the input and attention mask);
            their specs include the client's installed ones, first.
        installed: the client's installed specs (generate and base_run act inside them).
        options: generate's max_new_tokens, use_kv_cache and sampling options.
        n_tokens: token ids in the call (what limits count).
        share_key: what a "run" call has in common with others whose runs can share its
            pipeline run (None: it runs alone; see serve.batching).
    """

    kind: str
    runs: tuple[RunRequest, ...]
    installed: tuple[HookSpec, ...] = ()
    options: Mapping[str, Any] = field(default_factory=dict)
    n_tokens: int = 0
    share_key: Optional[tuple] = None


class Job:
    """A call waiting, running or done; its client polls it, fetches its result, or cancels it.

    Args:
        owner: the name of the token that sent it.
        call: what it asks.
        release: frees its admission; called once, when it ends.
        check_bytes: refuses (raises ServiceError) a result of that many bytes.
    """

    def __init__(self, owner: str, call: Call, release: Callable[[], None], check_bytes: Callable[[int], None] = lambda n: None):
        self.id, self.owner, self.call, self._release, self.check_bytes = uuid.uuid4().hex, owner, call, release, check_bytes
        self.state, self.done_runs, self.error = "queued", 0, None
        self._callbacks: list[Callable[[], None]] = []
        self.result: Any = None
        self.created = self.seen = time.monotonic()
        self.finished: Optional[float] = None
        self.ended = threading.Event()

    @property
    def total_runs(self) -> int:
        return len(self.call.runs)

    def finish(self, state: str, *, result: Any = None, error: Optional[ServiceError] = None) -> None:
        if self.state in ("done", "failed", "cancelled"):
            return
        self.state, self.result, self.error, self.finished = state, result, error, time.monotonic()
        self._release()
        self.ended.set()
        for callback in self._callbacks:
            callback()

    def when_ended(self, callback: Callable[[], None]) -> None:
        """Call callback() (from the thread that ends the job) once it ends; now if it has."""
        self.seen = time.monotonic()
        if self.ended.is_set():
            callback()
            return
        self._callbacks.append(callback)
        if self.ended.is_set() and callback in self._callbacks:  # it ended as we added it
            self.forget(callback)
            callback()

    def forget(self, callback: Callable[[], None]) -> None:
        """Not call a callback given to when_ended after all."""
        try:
            self._callbacks.remove(callback)
        except ValueError:
            pass

    def wait(self, timeout: float) -> bool:
        """Until the job ends (True) or `timeout` seconds pass (False)."""
        self.seen = time.monotonic()
        return self.ended.wait(timeout)


class FairQueue:
    """Jobs by owner; pop() takes the owners in turn, each owner's jobs in order."""

    def __init__(self) -> None:
        self.by_owner: "collections.OrderedDict[str, collections.deque[Job]]" = collections.OrderedDict()

    def __len__(self) -> int:
        return sum(len(jobs) for jobs in self.by_owner.values())

    def push(self, job: Job) -> None:
        self.by_owner.setdefault(job.owner, collections.deque()).append(job)

    def pop(self) -> Optional[Job]:
        """The next owner's first job; that owner goes to the back of the turn."""
        for owner, jobs in list(self.by_owner.items()):
            job = jobs.popleft()
            self.by_owner.move_to_end(owner)
            if not jobs:
                del self.by_owner[owner]
            return job
        return None

    def take(self, accept: Callable[[Job], bool], limit: int) -> list[Job]:
        """Up to `limit` more jobs that `accept` takes, each owner's first jobs in turn."""
        taken: list[Job] = []
        while len(taken) < limit:
            found = False
            for owner, jobs in list(self.by_owner.items()):
                if len(taken) < limit and jobs and accept(jobs[0]):
                    taken.append(jobs.popleft())
                    found = True
                    if jobs:
                        self.by_owner.move_to_end(owner)  # served now: to the back of the turn
                    else:
                        del self.by_owner[owner]
            if not found:
                return taken
        return taken

    def remove(self, job: Job) -> bool:
        jobs = self.by_owner.get(job.owner)
        if jobs is None or job not in jobs:
            return False
        jobs.remove(job)
        if not jobs:
            del self.by_owner[job.owner]
        return True

    def position(self, job: Job) -> Optional[int]:
        """How many jobs run before `job` (None: it is not queued)."""
        owners = list(self.by_owner)
        if job.owner not in self.by_owner or job not in self.by_owner[job.owner]:
            return None
        index = list(self.by_owner[job.owner]).index(job)
        turn = owners.index(job.owner)
        # owners before it in the turn run index + 1 jobs each, owners after it index jobs each
        return index + sum(min(len(self.by_owner[o]), index + (i < turn)) for i, o in enumerate(owners) if o != job.owner)


@dataclass
class Session:
    """A key/value cache or base run a client keeps on the stages."""

    owner: str
    handle: Any  # StageKeyValueCache or StageBaseRun
    used: float = field(default_factory=time.monotonic)


class ModelHost:
    """One model of the service: runs its clients' jobs on its Tracer, one at a time.

    Args:
        name: the model's name in the service.
        tracer: its Tracer (any runner with the Tracer's primitives).
        max_batch: runs of different jobs merged into one pipeline run at most.
        max_queue: jobs waiting at most (more: 429).
        batch_wait_s: how long a run that could share a pipeline run waits for more runs to
            share it, while other clients are sending runs.
    """

    def __init__(self, name: str, tracer: Any, *, max_batch: int = 8, max_queue: int = 256, batch_wait_s: float = 0.005):
        self.name, self.tracer, self.max_batch, self.max_queue, self.batch_wait_s = name, tracer, max_batch, max_queue, batch_wait_s
        self.last_submit: dict[str, float] = {}  # owner -> when it last submitted a job
        self.queue = FairQueue()
        self.jobs: dict[str, Job] = {}
        self.sessions: dict[str, Session] = {}
        self.closing: list[Any] = []  # sessions to free on the stages, by the job thread (the only one that calls the Tracer)
        self.lock = threading.Condition()
        self.counts = collections.Counter()  # jobs by final state, runs, shared pipeline runs
        self.running = True
        self.thread = threading.Thread(target=self._loop, name=f"shardlens-serve-{name}", daemon=True)
        self.thread.start()

    @property
    def splits_batches(self) -> bool:
        """Whether the Tracer splits a run's batch into microbatches (see batching.share_key)."""
        coordinator = self.tracer.coordinator
        return coordinator.replicas > 1 or coordinator.microbatch_size is not None

    # ------------------------------------------------------------------ clients' side

    def check_room(self) -> None:
        """Refuse a job now when the queue is full (ServiceError 429)."""
        if len(self.queue) >= self.max_queue:
            raise ServiceError(429, f"model {self.name!r} has {len(self.queue)} requests waiting, its limit (max_queue); try again later", kind="limit")

    def submit(self, owner: str, call: Call, release: Callable[[], None], check_bytes: Callable[[int], None] = lambda n: None) -> Job:
        """Queue a checked call; `release` frees its admission when it ends, `check_bytes`
        refuses its result by size."""
        with self.lock:
            self.check_room()
            job = Job(owner, call, release, check_bytes)
            self.jobs[job.id] = job
            self.last_submit[owner] = time.monotonic()
            self.queue.push(job)
            self.lock.notify_all()
        return job

    def job(self, owner: str, job_id: str) -> Job:
        """The owner's job `job_id` (another owner's is as unknown as a made-up one)."""
        job = self._owned(self.jobs, owner, job_id, f"no job {job_id!r} of this token on model {self.name!r} "
                          f"(finished results are kept {RESULT_TTL_S:.0f} s)")
        job.seen = time.monotonic()
        return job

    def status(self, job: Job) -> dict:
        with self.lock:
            position = self.queue.position(job)
        status = {"job": job.id, "state": job.state, "position": position, "progress": [job.done_runs, job.total_runs]}
        if job.error is not None:
            status["error"] = {"status": job.error.status, "kind": job.error.kind, "message": job.error.message}
        return status

    def cancel(self, job: Job) -> None:
        """A queued job leaves the queue; a running one's result is dropped when its run ends."""
        with self.lock:
            if self.queue.remove(job) or job.state == "running":
                job.finish("cancelled", error=ServiceError(409, f"job {job.id} was cancelled", kind="cancelled"))

    def collect(self, job: Job) -> Any:
        """A finished job's result, which the host then forgets."""
        with self.lock:
            self.jobs.pop(job.id, None)
        if job.state != "done":
            raise job.error or ServiceError(409, f"job {job.id} is {job.state}", kind=job.state)
        return job.result

    def session(self, owner: str, session_id: str) -> Any:
        """The owner's key/value cache or base run `session_id`."""
        session = self._owned(self.sessions, owner, session_id, f"no key/value cache or base run {session_id!r} of this token on "
                              f"model {self.name!r} (unused ones are freed after {SESSION_TTL_S:.0f} s)")
        session.used = time.monotonic()
        return session.handle

    def _owned(self, table: dict, owner: str, key: str, unknown: str) -> Any:
        """table[key] when `owner` owns it; else a 404 saying `unknown` (another owner's entry
        is as unknown as a made-up one)."""
        with self.lock:
            entry = table.get(key)
        if entry is None or entry.owner != owner:
            raise ServiceError(404, unknown, kind="not_found")
        return entry

    def open_kv_cache(self, owner: str, batch_size: int) -> str:
        """A new key/value cache on the stages for `owner`; returns its id."""
        with self.lock:
            self._check_sessions(owner)
            handle = self.tracer.init_kv_cache(batch_size)  # a handle only: the stages make it on its first run
            self.sessions[handle.session] = Session(owner, handle)
        return handle.session

    def end_session(self, owner: str, session_id: str) -> None:
        """Forget the owner's session; the job thread frees it on the stages before its next job."""
        self.session(owner, session_id)
        with self.lock:
            session = self.sessions.pop(session_id, None)  # None: another request ended it just now
            if session is not None:
                self.closing.append(session.handle)
                self.lock.notify_all()

    def _check_sessions(self, owner: str) -> None:
        with self.lock:  # re-entrant: a Condition's lock is an RLock
            held = sum(s.owner == owner for s in self.sessions.values())
        if held >= MAX_SESSIONS:
            raise ServiceError(429, f"this token keeps {held} key/value caches and base runs on model {self.name!r}, the most it may; close some", kind="limit")

    def stats(self) -> dict:
        with self.lock:
            return {"queued": len(self.queue), "running": sum(j.state == "running" for j in self.jobs.values()),
                    "sessions": len(self.sessions), "recoveries": getattr(self.tracer.coordinator, "recoveries", 0), **self.counts}

    def shutdown(self) -> None:
        with self.lock:
            self.running = False
            self.lock.notify_all()
        self.thread.join(timeout=30)
        self.closing += [session.handle for session in self.sessions.values()]
        self.sessions.clear()
        self._close_sessions()

    # ------------------------------------------------------------------ the thread

    def _loop(self) -> None:
        while True:
            self._close_sessions()
            with self.lock:
                self._tidy()
                while self.running and not self.queue and not self.closing:
                    self.lock.wait(timeout=5.0)
                    self._tidy()
                if not self.running:
                    return
                if not self.queue:
                    continue
                (job,) = self._running([self.queue.pop()])
                shared = self._sharing(job)
            if shared:
                self._run_shared([job] + shared)
            else:
                self._run(job)

    def _close_sessions(self) -> None:
        """Free on the stages the sessions that ended (outside the lock: these are worker calls)."""
        with self.lock:
            closing, self.closing = self.closing, []
        for handle in closing:
            handle.close()

    def _sharing(self, job: Job) -> list[Job]:
        """More queued jobs whose run can share `job`'s pipeline run (see serve.batching).
        While other clients are sending runs, it waits up to batch_wait_s for more of them
        (called with the lock held; waiting lets submit() in)."""
        key = _share_key(job)
        if key is None or self.max_batch < 2:
            return []
        accept = lambda other: _share_key(other) == key  # noqa: E731
        shared = self._running(self.queue.take(accept, self.max_batch - 1))
        deadline = time.monotonic() + self.batch_wait_s
        while len(shared) < self.max_batch - 1 and self._others_sending(job.owner) and time.monotonic() < deadline:
            self.lock.wait(deadline - time.monotonic())
            shared += self._running(self.queue.take(accept, self.max_batch - 1 - len(shared)))
        return [other for other in shared if other.state == "running"]  # less those cancelled while it waited

    @staticmethod
    def _running(jobs: list[Job]) -> list[Job]:
        """Jobs taken off the queue to run: from now a cancel drops their results."""
        for job in jobs:
            job.state = "running"
        return jobs

    def _others_sending(self, owner: str) -> bool:
        """Whether an owner other than `owner` submitted a job in the last second."""
        now = time.monotonic()
        return any(other != owner and now - when < 1.0 for other, when in self.last_submit.items())

    def _tidy(self) -> None:
        """Cancel queued jobs whose client went away, drop results nobody fetched, free idle sessions."""
        now = time.monotonic()
        for job in list(self.jobs.values()):
            if job.state == "queued" and now - job.seen > IDLE_S:
                self.queue.remove(job)
                job.finish("cancelled", error=ServiceError(409, f"job {job.id} was cancelled: its client stopped asking for it", kind="cancelled"))
            if job.finished is not None and now - job.finished > RESULT_TTL_S:
                self.jobs.pop(job.id, None)
        for session_id, session in list(self.sessions.items()):
            if now - session.used > SESSION_TTL_S:
                self.closing.append(self.sessions.pop(session_id).handle)

    def _run_shared(self, jobs: list[Job]) -> None:
        """The jobs' runs as one pipeline run; when it fails, each job runs alone, so that one
        client's failing spec fails only its own job."""
        try:
            requests = [job.call.runs[0] for job in jobs]
            placed = [self.tracer.tokens_of(r.input, r.attention_mask) for r in requests]
            masks = [m for _, m in placed]
            request, rows = batching.merged(requests, [t for t, _ in placed], masks, jobs[0].call.share_key)
            parts = batching.split(self.tracer.run(request), rows, masks)
        except Exception:
            for job in jobs:
                self._run(job)
            return
        self.counts["shared_runs"] += 1
        for job, part in zip(jobs, parts):
            job.done_runs = 1
            self._done(job, [part])

    def _run(self, job: Job) -> None:
        try:
            result = self._execute(job)
        except Exception as error:
            self._failed(job, error)
            return
        self._done(job, result)

    def _execute(self, job: Job) -> Any:
        call = job.call
        if call.kind == "run":
            result = [self.tracer.run(call.runs[0])]
            job.done_runs = 1
            return result
        if call.kind == "variants":
            results: list[RunResult] = []
            width = self.tracer.coordinator.replicas
            for start in range(0, len(call.runs), width):
                if job.state == "cancelled":
                    return None
                results += self.tracer.run_variants(call.runs[start:start + width])
                job.done_runs = len(results)
            return results
        with self.tracer.hooks(fwd_hooks=list(call.installed)):
            if call.kind == "generate":
                return self._generate(call)
            return self._base_run(job, call)

    def _generate(self, call: Call) -> dict:
        run, store = call.runs[0], {}
        tokens = self.tracer.generate(run.input, attention_mask=run.attention_mask, store=store, **call.options)
        return {"tokens": tokens, "store": store}

    def _base_run(self, job: Job, call: Call) -> dict:
        self._check_sessions(job.owner)
        run = call.runs[0]
        base = self.tracer.base_run(run.input, attention_mask=run.attention_mask)
        with self.lock:
            self.sessions[base.session] = Session(job.owner, base)
        return {"session": base.session, "logits": base.logits, "tokens": base.tokens, "attention_mask": base.attention_mask}

    def _done(self, job: Job, result: Any) -> None:
        """A job's result, kept for its client; refused (413) when it is larger than the
        client may get, and dropped when the job was cancelled."""
        try:
            job.check_bytes(result_bytes(result))
        except ServiceError as error:
            self._drop(result)
            self._failed(job, error)
            return
        with self.lock:
            if job.state == "cancelled":
                self._drop(result)
                return
            job.finish("done", result=result)
            self.counts["done"] += 1
            self.counts["runs"] += job.total_runs

    def _drop(self, result: Any) -> None:
        """Free what a job that will not be collected made (a base run)."""
        if isinstance(result, dict) and "session" in result:
            with self.lock:
                session = self.sessions.pop(result["session"], None)
                if session is not None:
                    self.closing.append(session.handle)

    def _failed(self, job: Job, error: Exception) -> None:
        with self.lock:
            if job.state == "cancelled":
                return
            job.finish("failed", error=as_service_error(error))
            self.counts["failed"] += 1


def result_bytes(result: Any) -> int:
    """The bytes of the tensors in a job's result (RunResults' outputs and caches, or the
    tensors of a generate or base run)."""
    if isinstance(result, Tensor):
        if result.is_sparse:
            coalesced = result.coalesce()
            return result_bytes(coalesced.indices()) + result_bytes(coalesced.values())
        return result.numel() * result.element_size()
    if isinstance(result, RunResult):
        return result_bytes(result.output) + result_bytes(list(result.cache.values()))
    if isinstance(result, dict):
        return result_bytes(list(result.values()))
    if isinstance(result, (list, tuple)):
        return sum(result_bytes(item) for item in result)
    return 0


def _share_key(job: Job) -> Optional[tuple]:
    return job.call.share_key if job.call.kind == "run" else None


def as_service_error(error: BaseException) -> ServiceError:
    """The HTTP answer to an exception raised while checking or running a request: 4xx where
    the request is at fault (a bad spec, a hook that raised on its inputs), 503 where a worker
    was lost, 500 otherwise."""
    if isinstance(error, ServiceError):
        return error
    if isinstance(error, (HookNameError, RemoteHookError, ValueError, TypeError, KeyError, IndexError)):
        message = str(error) if not isinstance(error, KeyError) or isinstance(error, HookNameError) else str(error.args[0] if error.args else error)
        return ServiceError(400, message, kind=type(error).__name__)
    if isinstance(error, WorkerError):
        return ServiceError(503, str(error), kind="WorkerError")
    return ServiceError(500, f"{type(error).__name__}: {error}", kind="internal")
