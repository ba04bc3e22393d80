"""A connected client: the hook API of a HookedModel and a Tracer, run by a shared service.

`sl.connect(url, model=..., token=...)` returns a `Client`. Its hooks(), add_hook,
reset_hooks and list_hooks keep the installed specs here, checked against the model's hook
names as a Tracer checks them; each run sends them with its own specs, and the service runs
them for that run only. Results come back as Arrow IPC (see serve.wire); nothing is pickled.

Example:
    >>> model = sl.connect("http://127.0.0.1:8000", model="induction", token=os.environ["SHARDLENS_TOKEN"])
    >>> logits, cache = model.run_with_cache(tokens, names_filter="blocks.*.hook_resid_post")
"""

from __future__ import annotations

import base64
import dataclasses
import http.client
import json
import os
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Sequence
from typing import Any, Optional, Union

import torch
from torch import Tensor

from shardlens.cluster.stack import SpecStack
from shardlens.errors import ServiceError
from shardlens.hooks.architectures import architecture_for
from shardlens.hooks.generation import KeyValueCache
from shardlens.hooks.hook_api import HookAPI, HookList, Scope
from shardlens.hooks.ops import Op
from shardlens.hooks.run import BaseRun, RunRequest, RunResult
from shardlens.hooks.specs import HookSpec
from shardlens.hooks.taps import PointOptions
from shardlens.serve import calls
from shardlens.serve.wire import JOB_HEADER, decode_tensors

WAIT_S = 30.0  # a run's request waits this long for its result before the client polls for it
IDLE_CONNECTION_S = 30.0  # a connection idle this long is opened anew (servers close idle ones)


def connect(url: str, *, model: str, token: str, timeout: float = 600.0) -> "Client":
    """A client of the model `model` of the tracing service at `url`, with the bearer `token`.

    Args:
        url: the service's address ("http://127.0.0.1:8000"; https through a reverse proxy).
        model: the model's name in the service's config.
        token: a bearer token the service knows (`shardlens token NAME` makes one).
        timeout: the longest a run may take, queue included, before its job is cancelled.
    """
    return Client(url, model=model, token=token, timeout=timeout)


class Client(HookAPI):
    """The hook API over a tracing service (see connect). Hooks are sl.HookSpec values or
    (name, op) pairs: the service runs no Python code, so a function as a hook is refused."""

    backward_in_run = True

    def __init__(self, url: str, *, model: str, token: str, timeout: float = 600.0):
        if not isinstance(token, str) or not token:
            raise ValueError("token must be the bearer token the service gave you (a non-empty string)")
        self.url, self.model, self.timeout = url.rstrip("/"), model, timeout
        self._address = urllib.parse.urlsplit(self.url)
        if self._address.scheme not in ("http", "https") or not self._address.hostname:
            raise ValueError(f"url must be the service's http:// or https:// address; got {url!r}")
        self._root = self._address.path.rstrip("/")  # a service behind a proxy may live under a path
        self._local = threading.local()  # each thread's kept-alive connection
        self._headers = {"Authorization": f"Bearer {token}"}
        info = self._json("GET", f"/v1/models/{urllib.parse.quote(model)}")
        self.config, self.tokenizer = _model_files(info["files"])
        self.architecture = architecture_for(self.config)
        self.dtype, self.max_batch, self.n_layers = info["dtype"], info["max_batch"], info["n_layers"]
        self.point_options = PointOptions(**info["point_options"])
        self.stack = SpecStack([info["hook_names"]])
        self.context_level = 0

    def __repr__(self) -> str:
        return f"Client({self.url!r}, model={self.model!r})"

    # ------------------------------------------------------------------ HTTP

    def _call(self, method: str, path: str, body: Optional[dict] = None, *, timeout: Optional[float] = None) -> Any:
        """The response to one request, on this thread's kept-alive connection (read it whole
        before the next call); an error answer raises its ServiceError."""
        data = None if body is None else json.dumps(body).encode()
        headers = {**self._headers, **({"Content-Type": "application/json"} if data is not None else {})}
        connection = self._connection(timeout or 60.0)
        try:
            connection.request(method, self._root + path, body=data, headers=headers)
            response = connection.getresponse()
        except (OSError, http.client.HTTPException) as error:
            connection.close()
            self._local.connection = None
            raise ServiceError(503, f"cannot reach the service at {self.url}: {error}", kind="unreachable") from None
        self._local.used = time.monotonic()
        if response.status >= 400:
            with response:
                raise _service_error(response.status, response.reason, response.read())
        return response

    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        """This thread's connection to the service: kept alive between calls, opened anew
        when it has been idle long enough for the server to have closed it."""
        connection = getattr(self._local, "connection", None)
        if connection is not None and time.monotonic() - self._local.used > IDLE_CONNECTION_S:
            connection.close()
            connection = None
        if connection is None:
            kind = http.client.HTTPSConnection if self._address.scheme == "https" else http.client.HTTPConnection
            connection = self._local.connection = kind(self._address.hostname, self._address.port, timeout=timeout)
            self._local.used = time.monotonic()
        connection.timeout = timeout
        if connection.sock is not None:
            connection.sock.settimeout(timeout)
        return connection

    def _json(self, method: str, path: str, body: Optional[dict] = None, **options: Any) -> Any:
        with self._call(method, path, body, **options) as response:
            return json.loads(response.read())

    def _model_path(self, *parts: str) -> str:
        return "/".join([f"/v1/models/{urllib.parse.quote(self.model)}", *parts])

    # ------------------------------------------------------------------ jobs

    def submit(self, kind: str, requests: Sequence[RunRequest], *, options: Optional[dict] = None, wait: float = 0.0) -> "RemoteJob":
        """Queue a job (kind "run", "variants", "generate" or "base_run") with the specs
        installed now; returns its handle (status, cancel, result). With `wait`, the service
        answers with the result itself when the job ends within `wait` seconds."""
        installed = [spec for entry in self.stack.entries for spec in entry.specs]
        body = {"kind": kind, "installed": calls.installed_json(installed), "runs": [calls.run_json(r) for r in requests]}
        if options:
            body["options"] = options
        response = self._call("POST", self._model_path(f"jobs?wait={wait}"), body, timeout=wait + 60)
        with response:
            if response.status == 200:
                entries, meta = decode_tensors(response)
                response.read()  # the rest of the body, so that the connection can be used again
                return RemoteJob(self, response.headers[JOB_HEADER], kind, done=(calls.dense_entries(entries, meta), meta))
            return RemoteJob(self, json.loads(response.read())["job"], kind)

    # ------------------------------------------------------------------ the runner's primitives

    def hook_names(self) -> list[str]:
        return self.stack.hook_names

    def _as_op(self, hook: Any) -> Op:
        if isinstance(hook, Op):
            return hook
        raise ValueError(
            "a plain Python function as a hook would have to run on the service, which runs no client code: "
            "use sl.HookSpec / sl.ops (declarative ops) with a connected client"
        )

    def install(self, level: Optional[int], specs: Sequence[HookSpec], scope: Scope = Scope()) -> None:
        """Check specs against the model's hook points (and each op's own check) and keep them
        here; every run sends them along."""
        per_stage, known = self.stack.split(specs, check=self.check_ops)
        self.stack.push(level, specs, per_stage, known)

    def remove(self, level: Optional[int], *, including_permanent: bool = False, direction: str = "both", clear_contexts: bool = False) -> None:
        self.stack.remove(level, including_permanent=including_permanent, direction=direction)

    def installed(self) -> list[tuple[str, HookSpec]]:
        return self.stack.installed()

    def run(self, request: RunRequest) -> RunResult:
        return self._runs("run", [request])[0]

    def run_variants(self, requests: Sequence[RunRequest]) -> list[RunResult]:
        """Several requests, each with its own specs, as one job."""
        return self._runs("variants", [dataclasses.replace(r, whole_batch=True) for r in requests])

    def _runs(self, kind: str, requests: Sequence[RunRequest]) -> list[RunResult]:
        for request in requests:
            self._check_request(request)
        sent = [dataclasses.replace(r, write=None) for r in requests]
        results = self.submit(kind, sent, wait=WAIT_S).result(timeout=self.timeout)
        for request, result in zip(requests, results):
            if request.kv_cache is not None and not request.kv_cache.frozen:
                tokens, mask = self.tokens_of(request.input, request.attention_mask)
                request.kv_cache.previous_attention_mask = request.kv_cache.extended_mask(torch.ones_like(tokens) if mask is None else mask)
        return [self._written(request, result) for request, result in zip(requests, results)]

    def _check_request(self, request: RunRequest) -> None:
        """Refuse here what the service would refuse, with the message a Tracer gives."""
        if request.forward_kwargs:
            raise TypeError(f"a connected client's run takes input, return_type, attention_mask, metric and past_kv_cache; got {sorted(request.forward_kwargs)}")
        if request.weight_grads:
            raise ValueError("weight_grads=True: a shared service computes no weight gradients (they would stay on its workers)")
        if request.kv_cache is not None and (not isinstance(request.kv_cache, RemoteKeyValueCache) or request.kv_cache.client is not self):
            raise TypeError(f"past_kv_cache must be a cache of this client (client.init_kv_cache()); got {type(request.kv_cache).__name__}")
        tokens, mask = self.tokens_of(request.input, request.attention_mask)  # bad input fails here, as on a Tracer
        if request.resume is not None:
            base = request.resume.base
            if not isinstance(base, RemoteBaseRun) or base.client is not self:
                raise TypeError(f"Resume.base must be a base run of this client (client.base_run(tokens)); got {type(base).__name__}")
            request.resume.check(tokens, self.n_layers, request, mask)

    def _written(self, request: RunRequest, result: RunResult) -> RunResult:
        """A run with a dataset destination: what it read is written here, as a Tracer's stages would."""
        if request.write is None:
            return result
        parts = request.write.write(dict(result.cache), result.attention_mask)
        return dataclasses.replace(result, cache={}, parts=tuple(parts))

    def shares(self, path: Union[str, os.PathLike]) -> bool:
        """Always: a client writes the datasets of its runs itself."""
        return True

    def _lens_config_args(self) -> tuple[Any, dict]:
        options = dict(device="cpu", dtype=getattr(torch, self.dtype), n_devices=1, options=self.point_options)
        return self.config, options

    def _dataset_metadata(self) -> dict:
        return {"model": f"{self.url}#{self.model}", "dtype": self.dtype}

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.call_with(args, kwargs)

    # ------------------------------------------------------------------ sessions

    def _new_kv_cache(self, batch_size: int) -> "RemoteKeyValueCache":
        session = self._json("POST", self._model_path("kv_caches"), {"batch_size": batch_size})["session"]
        return RemoteKeyValueCache(self, session, torch.zeros(batch_size, 0, dtype=torch.long))

    def _keep_base(self, tokens: Tensor, mask: Optional[Tensor]) -> "RemoteBaseRun":
        entries, meta = self.submit("base_run", [RunRequest(tokens, attention_mask=mask)], wait=WAIT_S).fetch(timeout=self.timeout)
        return RemoteBaseRun(self, meta["session"], tokens, mask, entries["logits"])

    def end_session(self, session: str) -> None:
        """Free a key/value cache or base run on the service (nothing if it is gone)."""
        try:
            self._json("DELETE", self._model_path("sessions", session))
        except ServiceError as error:
            if error.status != 404:
                raise

    # ------------------------------------------------------------------ generation

    def generate(
        self, input: Any, *, max_new_tokens: int, use_kv_cache: bool = True, fwd_hooks: HookList = (),
        attention_mask: Optional[Tensor] = None, store: Optional[dict] = None, **sampling: Any,
    ) -> Tensor:
        """HookedModel.generate, run whole on the service (one request, not one per token)."""
        tokens, mask = self.tokens_of(input, attention_mask)
        options = {"max_new_tokens": max_new_tokens, "use_kv_cache": use_kv_cache, **sampling}
        with self.hooks(fwd_hooks=fwd_hooks):
            job = self.submit("generate", [RunRequest(tokens, attention_mask=mask)], options=options, wait=WAIT_S)
            entries, _ = job.fetch(timeout=self.timeout)
            steps: dict[int, dict] = {}
            for key, value in entries.items():
                if key.startswith("store/"):
                    name, step = key.removeprefix("store/").rsplit(".step", 1)
                    steps.setdefault(int(step), {})[name] = value
            for step in sorted(steps):  # what each step read goes where a step in this process would put it
                left = self.routed(RunResult(None, steps[step]))
                if store is not None:
                    store.update({f"{name}.step{step}": value for name, value in left.items()})
        return entries["tokens"]


class RemoteJob:
    """A job queued on the service: its state, queue position and progress; cancel; result."""

    def __init__(self, client: Client, job_id: str, kind: str, *, done: Optional[tuple[dict, dict]] = None):
        self.client, self.id, self.kind, self._done = client, job_id, kind, done

    def status(self, *, wait: float = 0.0) -> dict:
        """{"state": queued | running | done | failed | cancelled, "position": jobs before it
        in the queue (None once it runs), "progress": [runs done, runs]}; waits up to `wait`
        seconds for it to end."""
        return self.client._json("GET", self.client._model_path("jobs", f"{self.id}?wait={wait}"), timeout=wait + 60)

    def cancel(self) -> dict:
        return self.client._json("DELETE", self.client._model_path("jobs", self.id))

    def fetch(self, *, timeout: float = 600.0) -> tuple[dict, dict]:
        """The result's tensors and meta (see serve.calls.result_entries), once the job ends."""
        if self._done is not None:
            return self._done
        deadline = time.monotonic() + timeout
        try:
            while True:
                response = self.client._call("GET", self.client._model_path("jobs", self.id, "result"), timeout=90)
                with response:
                    if response.status == 200:
                        entries, meta = decode_tensors(response)
                        response.read()  # the rest of the body, so that the connection can be used again
                        return calls.dense_entries(entries, meta), meta
                    response.read()
                if time.monotonic() > deadline:
                    raise ServiceError(504, f"job {self.id} did not end within {timeout:.0f} s; it was cancelled", kind="timeout")
        except BaseException:
            self._abandon()
            raise

    def result(self, *, timeout: float = 600.0) -> list[RunResult]:
        """A run or variants job's results."""
        entries, meta = self.fetch(timeout=timeout)
        return calls.runs_from(entries, meta)

    def _abandon(self) -> None:
        try:
            self.cancel()
        except Exception:
            pass


class RemoteKeyValueCache(KeyValueCache):
    """A key/value cache kept on the service's stages; this handle holds the attention mask
    so far, the frozen flag and the repeat count (as a Tracer's StageKeyValueCache does)."""

    def __init__(self, client: Client, session: str, previous_attention_mask: Tensor, frozen: bool = False, times: int = 1):
        super().__init__(None, previous_attention_mask, frozen)
        self.client, self.session, self.times = client, session, times

    def repeat(self, times: int) -> "RemoteKeyValueCache":
        """A frozen view whose batch is this batch repeated `times` times."""
        if not isinstance(times, int) or times < 1:
            raise ValueError(f"times must be a positive int; got {times!r}")
        return RemoteKeyValueCache(self.client, self.session, self.previous_attention_mask.repeat(times, 1), True, self.times * times)

    @property
    def entries(self) -> list:
        raise TypeError("a connected client's key/value cache stays on the service's stages")

    def for_run(self) -> Any:
        raise TypeError("a connected client's key/value cache lives on the service: pass it as past_kv_cache= to the client")

    def close(self) -> None:
        self.client.end_session(self.session)


class RemoteBaseRun(BaseRun):
    """A base run kept on the service's stages (see BaseRun); close() frees it there."""

    def __init__(self, client: Client, session: str, tokens: Tensor, attention_mask: Optional[Tensor], logits: Tensor):
        super().__init__(tokens, attention_mask, logits)
        self.client, self.session = client, session

    def close(self) -> None:
        self.client.end_session(self.session)


def _model_files(files: dict) -> tuple[Any, Any]:
    """The model's config and tokenizer (None when it has none) from the files the service sent."""
    from transformers import AutoConfig, AutoTokenizer

    with tempfile.TemporaryDirectory() as folder:
        for name, data in files.items():
            with open(os.path.join(folder, os.path.basename(name)), "wb") as file:
                file.write(base64.b64decode(data))
        config = AutoConfig.from_pretrained(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder) if set(files) - {"config.json", "generation_config.json"} else None
    return config, tokenizer


def _service_error(status: int, reason: str, body: bytes) -> ServiceError:
    """The ServiceError of an HTTP error answer. A request the service refused as a
    ValueError, TypeError, KeyError or IndexError (a bad spec, a resume it cannot take, a
    hook that raised on its inputs) is also an instance of that type, as the same mistake is
    on a Tracer."""
    try:
        detail = json.loads(body)["error"]
        status, message, kind = int(detail["status"]), str(detail["message"]), str(detail["kind"])
    except (ValueError, KeyError, TypeError):
        return ServiceError(status, f"{reason}: {body[:200]!r}", kind="http")
    return _TYPED.get(kind, ServiceError)(status, message, kind=kind)


class _ServiceValueError(ServiceError, ValueError):
    pass


class _ServiceTypeError(ServiceError, TypeError):
    pass


class _ServiceIndexError(ServiceError, IndexError):
    pass


class _ServiceKeyError(ServiceError, KeyError):
    def __str__(self) -> str:
        return ServiceError.__str__(self)


_TYPED = {"ValueError": _ServiceValueError, "TypeError": _ServiceTypeError, "KeyError": _ServiceKeyError,
          "HookNameError": _ServiceKeyError, "IndexError": _ServiceIndexError, "RemoteHookError": ServiceError}
