"""The tracing service on Ray Serve: HTTP routes over one ModelHost per model.

Routes (every /v1 route needs ``Authorization: Bearer <token>``):

    GET    /healthz                               ok, and each model's queue
    GET    /metrics                               Prometheus text: the service's own and Ray Serve's
    GET    /v1/models                             the models this token may use
    GET    /v1/models/{model}                     hook names, config, tokenizer files
    POST   /v1/models/{model}/jobs?wait=s         queue a job (see serve.calls); 202 + its status,
                                                  or its result if it ends within s seconds
    GET    /v1/models/{model}/jobs/{id}?wait=s    its state, queue position and progress
    GET    /v1/models/{model}/jobs/{id}/result    its result as an Arrow IPC stream (waits for it)
    DELETE /v1/models/{model}/jobs/{id}           cancel it
    POST   /v1/models/{model}/kv_caches           a key/value cache on the stages: {"batch_size": n}
    DELETE /v1/models/{model}/sessions/{id}       free a key/value cache or base run

A refused request answers 4xx with {"error": {"status", "kind", "message"}} and changes
nothing on the server (a result over the token's cached_bytes is dropped as soon as it is
computed, and answered 413).

Start it with `shardlens serve CONFIG` (serve_forever), from Python with start(config), or
on KubeRay with a RayService whose application's import_path is ``shardlens.serve.app:build``.
"""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations (Request)
# from the functions Serve pickled, whose globals hold only the names their code uses.

import asyncio
import base64
import itertools
import json
import os
import signal
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from typing import Any, Optional

import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from ray import serve

from shardlens.errors import ServiceError
from shardlens.serve import calls
from shardlens.serve.access import Access
from shardlens.serve.config import ServiceConfig, load_config
from shardlens.serve.host import ModelHost, as_service_error
from shardlens.serve.wire import JOB_HEADER, encode_tensors

APP_NAME = "shardlens"
MAX_WAIT_S = 30.0  # the longest one status or result request waits for a job
MAX_BODY_BYTES = 256 << 20  # the largest request body (specs carrying tensors, inputs) the service reads

api = FastAPI(title="shardlens tracing service")


def _error(error: BaseException) -> JSONResponse:
    error = as_service_error(error)
    return JSONResponse({"error": {"status": error.status, "kind": error.kind, "message": error.message}}, status_code=error.status)


# Serve pickles the deployment class where it is defined: what it calls is defined above it.


async def _ended(job: Any, timeout: float) -> bool:
    """Whether the job ends within `timeout` seconds (waiting on the event loop, no thread)."""
    loop = asyncio.get_running_loop()
    ended = asyncio.Event()

    def wake() -> None:
        loop.call_soon_threadsafe(ended.set)

    job.when_ended(wake)
    try:
        await asyncio.wait_for(ended.wait(), timeout)
        return True
    except asyncio.TimeoutError:
        job.forget(wake)
        return job.ended.is_set()


def _arrow_response(pieces: Iterator[bytes], job_id: str) -> Response:
    """An Arrow IPC stream as the answer: one body when it is one piece (a small result: one
    hop through Serve's proxy), else streamed piece by piece."""
    headers, media_type = {JOB_HEADER: job_id}, "application/vnd.apache.arrow.stream"
    first = next(pieces)
    second = next(pieces, None)
    if second is None:
        return Response(first, media_type=media_type, headers=headers)
    return StreamingResponse(itertools.chain([first, second], pieces), media_type=media_type, headers=headers)


async def _body(request: Request) -> bytes:
    """The request's body, refused (413) past MAX_BODY_BYTES before it is all read."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise ServiceError(413, f"the request body is {declared} bytes; the service takes at most {MAX_BODY_BYTES}", kind="limit")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise ServiceError(413, f"the request body is over {MAX_BODY_BYTES} bytes, the most the service takes", kind="limit")
    return bytes(body)


def _json(body: bytes) -> Any:
    try:
        return json.loads(body or b"{}")
    except ValueError as error:
        raise ServiceError(400, f"the request body is not JSON: {error}", kind="bad_request") from None


def _model_info(host: ModelHost) -> dict:
    """What a client needs to check specs and tokenize text as the server does."""
    tracer = host.tracer
    files = {}
    with tempfile.TemporaryDirectory() as folder:
        tracer.config.save_pretrained(folder)
        if tracer.tokenizer is not None:
            tracer.tokenizer.save_pretrained(folder)
        for name in sorted(os.listdir(folder)):
            with open(os.path.join(folder, name), "rb") as file:
                files[name] = base64.b64encode(file.read()).decode("ascii")
    options = tracer.coordinator.point_options
    return {"name": host.name, "hook_names": tracer.hook_names(), "files": files, "dtype": tracer.plan.dtype, "n_layers": tracer.plan.n_layers,
            "stages": len(tracer.plan.stages), "replicas": tracer.coordinator.replicas, "max_batch": host.max_batch,
            "point_options": {k: getattr(options, k) for k in options.__dataclass_fields__}}


def _prometheus(hosts: dict[str, ModelHost], answers: dict[int, int]) -> str:
    """The service's own metrics in Prometheus' text format."""
    lines = []
    gauges = {"queued": "requests waiting", "running": "requests running", "sessions": "key/value caches and base runs kept"}
    for key, help_text in gauges.items():
        lines += [f"# HELP shardlens_serve_{key} {help_text}", f"# TYPE shardlens_serve_{key} gauge"]
        lines += [f'shardlens_serve_{key}{{model="{name}"}} {host.stats().get(key, 0)}' for name, host in hosts.items()]
    counters = {"done": "jobs done", "failed": "jobs failed", "runs": "runs done", "shared_runs": "pipeline runs shared by several requests"}
    for key, help_text in counters.items():
        lines += [f"# HELP shardlens_serve_{key}_total {help_text}", f"# TYPE shardlens_serve_{key}_total counter"]
        lines += [f'shardlens_serve_{key}_total{{model="{name}"}} {host.stats().get(key, 0)}' for name, host in hosts.items()]
    lines += ["# HELP shardlens_serve_answers_total /v1 answers by HTTP status", "# TYPE shardlens_serve_answers_total counter"]
    lines += [f'shardlens_serve_answers_total{{status="{status}"}} {n}' for status, n in sorted(answers.items())]
    return "\n".join(lines) + "\n"


def _ray_serve_metrics() -> str:
    """Ray Serve's own metrics (ray_serve_*), as each node's Ray metrics agent exports them."""
    lines = []
    for node in ray.nodes():
        port = node.get("MetricsExportPort")
        if not node.get("Alive") or not port:
            continue
        try:
            with urllib.request.urlopen(f"http://{node['NodeManagerAddress']}:{port}/metrics", timeout=2) as response:
                text = response.read().decode()
        except OSError as error:
            lines.append(f"# Ray metrics of node {node['NodeManagerAddress']} unavailable: {error}")
            continue
        lines += [line for line in text.splitlines() if "ray_serve_" in line]
    return "\n".join(lines) + ("\n" if lines else "")


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1024, health_check_period_s=10)
@serve.ingress(api)
class TracingService:
    """One Serve replica hosting every model of the config as a Tracer (see ModelHost)."""

    def __init__(self, config: ServiceConfig):
        from shardlens.tracer import Tracer

        self.config, self.access = config, Access(config)
        self.hosts: dict[str, ModelHost] = {}
        self.answers: dict[int, int] = {}  # HTTP statuses answered to /v1 requests, for /metrics
        for entry in config.models:
            tracer = Tracer.from_pretrained(
                entry.source, stages=entry.stages, replicas=entry.replicas, backend=entry.backend, dtype=entry.dtype,
                microbatch_size=entry.microbatch_size, device=entry.device,
            )
            self.hosts[entry.name] = ModelHost(entry.name, tracer, max_batch=entry.max_batch, max_queue=entry.max_queue)

    def __del__(self) -> None:
        for host in getattr(self, "hosts", {}).values():
            host.shutdown()
            host.tracer.shutdown()

    def check_health(self) -> None:
        """Serve's health check: every model's thread still runs."""
        dead = [name for name, host in self.hosts.items() if not host.thread.is_alive()]
        if dead:
            raise RuntimeError(f"the job threads of {dead} stopped")

    # ------------------------------------------------------------------ helpers

    def _host(self, request: Request, model: str) -> tuple[Any, ModelHost]:
        entry = self.access.authenticate(request.headers.get("authorization"))
        host = self.hosts.get(model)
        if host is None:
            usable = [name for name in self.hosts if entry.models is None or name in entry.models]
            raise ServiceError(404, f"no model {model!r}; this token may use {usable}", kind="not_found")
        self.access.check_model(entry, model)
        return entry, host

    def _count(self, status: int) -> None:
        self.answers[status] = self.answers.get(status, 0) + 1

    async def _answer(self, work: Any) -> Any:
        """Run a handler's blocking work in a thread; a failure becomes its HTTP answer."""
        try:
            response = await asyncio.to_thread(work)
        except Exception as error:
            return self._refused(error)
        self._count(response.status_code)
        return response

    def _refused(self, error: BaseException) -> JSONResponse:
        response = _error(error)
        self._count(response.status_code)
        return response

    # ------------------------------------------------------------------ operations

    @api.get("/healthz")
    def healthz(self, workers: bool = False) -> JSONResponse:
        """Each model's job thread and queue; with ?workers=true, each stage worker's stats
        too (pid, specs installed on it, sessions it keeps), asked of the workers now."""
        models = {name: {"alive": host.thread.is_alive(), **host.stats()} for name, host in self.hosts.items()}
        if workers:
            for name, host in self.hosts.items():
                try:
                    models[name]["workers"] = host.tracer.stats()
                except Exception as error:  # a worker lost and not back yet
                    models[name].update(alive=False, workers=f"{type(error).__name__}: {error}")
        ok = all(m["alive"] for m in models.values())
        return JSONResponse({"status": "ok" if ok else "failing", "models": models}, status_code=200 if ok else 503)

    @api.get("/metrics")
    def metrics(self) -> PlainTextResponse:
        return PlainTextResponse(_prometheus(self.hosts, self.answers) + _ray_serve_metrics(), media_type="text/plain; version=0.0.4")

    # ------------------------------------------------------------------ models

    @api.get("/v1/models")
    async def models(self, request: Request) -> Any:
        def work() -> JSONResponse:
            entry = self.access.authenticate(request.headers.get("authorization"))
            return JSONResponse({"models": [name for name in self.hosts if entry.models is None or name in entry.models]})

        return await self._answer(work)

    @api.get("/v1/models/{model}")
    async def model(self, request: Request, model: str) -> Any:
        def work() -> JSONResponse:
            _, host = self._host(request, model)
            return JSONResponse(_model_info(host))

        return await self._answer(work)

    # ------------------------------------------------------------------ jobs

    @api.post("/v1/models/{model}/jobs")
    async def submit(self, request: Request, model: str, wait: float = 0.0) -> Any:
        """Queue a job: 202 with its status; with ?wait=s, its result as result() gives it
        when it ends within s seconds (one round trip for a short run)."""
        try:
            entry, host = await asyncio.to_thread(self._host, request, model)  # the token first, then the body
            body = await _body(request)
        except Exception as error:
            return self._refused(error)

        def work() -> Any:
            call = calls.decode_call(_json(body), host, entry.name)
            host.check_room()  # a full queue refuses before the token's counts change
            admission = self.access.admit(entry, model=model, n_tokens=call.n_tokens)
            try:
                return host.submit(entry.name, call, admission.release, lambda n: self.access.check_cached_bytes(entry, n))
            except BaseException:
                admission.release()
                raise

        try:
            job = await asyncio.to_thread(work)
        except Exception as error:
            return self._refused(error)
        if wait <= 0:
            self._count(202)
            return JSONResponse(host.status(job), status_code=202)
        return await self._finished(request, host, job, wait)

    @api.get("/v1/models/{model}/jobs/{job_id}")
    async def status(self, request: Request, model: str, job_id: str, wait: float = 0.0) -> Any:
        """The job's status, once it ends or after `wait` seconds (at most MAX_WAIT_S)."""
        try:
            entry, host = await asyncio.to_thread(self._host, request, model)
            job = host.job(entry.name, job_id)
            if wait > 0:
                await _ended(job, min(wait, MAX_WAIT_S))
        except Exception as error:
            return self._refused(error)
        self._count(200)
        return JSONResponse(host.status(job))

    @api.delete("/v1/models/{model}/jobs/{job_id}")
    async def cancel(self, request: Request, model: str, job_id: str) -> Any:
        def work() -> JSONResponse:
            entry, host = self._host(request, model)
            job = host.job(entry.name, job_id)
            host.cancel(job)
            return JSONResponse(host.status(job))

        return await self._answer(work)

    @api.get("/v1/models/{model}/jobs/{job_id}/result")
    async def result(self, request: Request, model: str, job_id: str, wait: float = MAX_WAIT_S) -> Any:
        """The job's result (see _finished)."""
        try:
            entry, host = await asyncio.to_thread(self._host, request, model)
            job = host.job(entry.name, job_id)
        except Exception as error:
            return self._refused(error)
        return await self._finished(request, host, job, wait)

    async def _finished(self, request: Request, host: ModelHost, job: Any, wait: float) -> Any:
        """The job's result as an Arrow IPC stream once it ends, waiting up to `wait` seconds
        (at most MAX_WAIT_S): 202 with its status when it has not ended by then, its error
        when it failed. A client that goes away while it waits cancels its job."""
        deadline = time.monotonic() + min(wait, MAX_WAIT_S)
        try:
            while not await _ended(job, min(0.5, max(deadline - time.monotonic(), 0.0))):
                if await request.is_disconnected():
                    host.cancel(job)
                    return self._refused(ServiceError(499, "the client went away", kind="cancelled"))
                if time.monotonic() >= deadline:
                    self._count(202)
                    return JSONResponse(host.status(job), status_code=202)
        except asyncio.CancelledError:  # Serve cancels the handler of a client that went away
            host.cancel(job)
            raise
        try:
            entries, meta = calls.result_entries(job.call.kind, host.collect(job))
        except Exception as error:
            return self._refused(error)
        self._count(200)
        return _arrow_response(encode_tensors(entries, meta), job.id)

    # ------------------------------------------------------------------ sessions

    @api.post("/v1/models/{model}/kv_caches")
    async def open_kv_cache(self, request: Request, model: str) -> Any:
        body = await request.body()

        def work() -> JSONResponse:
            entry, host = self._host(request, model)
            data = _json(body)
            batch_size = data.get("batch_size") if isinstance(data, dict) else None
            if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
                raise ServiceError(400, f"batch_size must be a positive int; got {batch_size!r}", kind="bad_request")
            return JSONResponse({"session": host.open_kv_cache(entry.name, batch_size)}, status_code=201)

        return await self._answer(work)

    @api.delete("/v1/models/{model}/sessions/{session_id}")
    async def end_session(self, request: Request, model: str, session_id: str) -> Any:
        def work() -> JSONResponse:
            entry, host = self._host(request, model)
            host.end_session(entry.name, session_id)
            return JSONResponse({"session": session_id, "state": "freed"})

        return await self._answer(work)


# ---------------------------------------------------------------------- starting it


def build(args: dict) -> Any:
    """The Serve application of a service config (Ray Serve's builder: ``import_path:
    shardlens.serve.app:build`` with ``args: {config: path}``)."""
    config = args["config"] if isinstance(args.get("config"), ServiceConfig) else load_config(args["config"])
    return TracingService.bind(config)


def start(config: ServiceConfig, *, host: Optional[str] = None, port: Optional[int] = None) -> str:
    """Start the service on the Ray cluster of `config.address` (a local one when None) and
    return its URL; stop() ends it."""
    if not ray.is_initialized():
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(address=config.address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    host, port = host or config.host, port or config.port
    serve.start(http_options={"host": host, "port": port})
    serve.run(build({"config": config}), name=APP_NAME, route_prefix="/")
    return f"http://{host}:{port}"


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def stop() -> None:
    """Stop the service (its models' workers go with it) and Serve."""
    serve.delete(APP_NAME)
    serve.shutdown()


def serve_forever(config: ServiceConfig, *, host: Optional[str] = None, port: Optional[int] = None) -> int:
    """`shardlens serve`: start the service and keep it up until interrupted (Ctrl-C, or
    SIGTERM as systemd and containers stop a process); then stop it cleanly."""
    signal.signal(signal.SIGTERM, _interrupt)
    url = start(config, host=host, port=port)
    print(f"shardlens: serving {[m.name for m in config.models]} at {url} (Ctrl-C stops)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        stop()
    return 0
