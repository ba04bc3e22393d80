"""A client's request as JSON, and a job's result as tensors: both directions of the wire.

The request a client posts to ``/v1/models/<model>/jobs``::

    {"kind": "run" | "variants" | "generate" | "base_run",
     "installed": [spec, ...],          # the client's installed specs, in the order it installed them
     "runs": [{"input": ..., "attention_mask": ..., "return_type": "logits", "metric": ...,
               "specs": [spec, ...], "grads": false, "sources": {...}, "whole_batch": false,
               "kv_cache": {"session": id, "frozen": false, "times": 1, "mask": ...} | null,
               "resume": {"base": id, "layer": 3, "position": 0, "repeat": 1} | null}],
     "options": {"max_new_tokens": 8, ...}}   # generate only

Values are `shardlens.hooks.codec` JSON (tensors as safetensors bytes). The server decodes
them without allow_code, so an sl.ops.Code is refused, and checks the fields, hook names,
each op's own check and the token limits before the job is queued (the size of its results
when they are ready).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from shardlens.errors import ServiceError
from shardlens.hooks.codec import decode, encode
from shardlens.hooks.dictionaries import WeightsRef
from shardlens.hooks.run import Resume, RunRequest, RunResult
from shardlens.hooks.specs import HookSpec
from shardlens.serve import batching
from shardlens.serve.host import Call, ModelHost

KINDS = ("run", "variants", "generate", "base_run")
CALL_FIELDS = {"kind", "installed", "runs", "options"}
RUN_FIELDS = {"input", "attention_mask", "return_type", "metric", "specs", "grads", "weight_grads", "sources", "whole_batch", "kv_cache", "resume"}
REFUSED_TYPES = ("WeightsRef",)  # decoding one reads a file or URI on the server


def _int(low: int) -> Any:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0


GENERATE_OPTIONS = {  # what each of generate's options must be
    "max_new_tokens": _int(1), "use_kv_cache": lambda v: isinstance(v, bool), "temperature": _number,
    "top_k": lambda v: v is None or _int(1)(v), "top_p": lambda v: v is None or (_number(v) and v <= 1),
    "stop_at_eos": lambda v: isinstance(v, bool), "seed": lambda v: v is None or _int(0)(v),
}


# ---------------------------------------------------------------------- client side


def run_json(request: RunRequest) -> dict:
    """A run as the service takes it (its key/value cache and base run by their ids)."""
    if request.write is not None or request.forward_kwargs:
        raise ValueError("a connected client writes datasets itself and takes no forward keyword arguments")
    data = {
        "input": encode(request.input), "attention_mask": encode(request.attention_mask), "return_type": request.return_type,
        "metric": encode(request.metric), "specs": [encode(inline(s)) for s in request.specs], "grads": request.grads,
        "weight_grads": request.weight_grads, "sources": encode(dict(request.sources)), "whole_batch": request.whole_batch,
    }
    if request.kv_cache is not None:
        cache = request.kv_cache
        data["kv_cache"] = {"session": cache.session, "frozen": cache.frozen, "times": cache.times, "mask": encode(cache.previous_attention_mask)}
    if request.resume is not None:
        resume = request.resume
        data["resume"] = {"base": resume.base.session, "layer": resume.layer, "position": resume.position, "repeat": resume.repeat}
    return data


def installed_json(specs: Sequence[HookSpec]) -> list:
    """Installed specs as one run carries them: in order, with no level of their own."""
    return [encode(dataclasses.replace(inline(s), level=None, permanent=False)) for s in specs]


def inline(spec: HookSpec) -> HookSpec:
    """The spec with its dictionary's weights read here and carried inline: the service
    reads no file a client names (a dictionary loaded from a path holds a WeightsRef)."""
    dictionary = getattr(spec.op, "dictionary", None)
    if not isinstance(getattr(dictionary, "weights", None), WeightsRef):
        return spec
    weights = _tensors_of(dictionary.weights)
    return dataclasses.replace(spec, op=dataclasses.replace(spec.op, dictionary=dataclasses.replace(dictionary, weights=weights)))


@functools.lru_cache(maxsize=4)
def _tensors_of(ref: WeightsRef) -> dict:
    """A dictionary file's tensors (checked against its sha256, if it has one), read once for
    every run that carries them."""
    return ref.tensors()


# ---------------------------------------------------------------------- server side


def decode_call(data: Any, host: ModelHost, owner: str) -> Call:
    """The Call a client's JSON asks for, checked against the host's model. A fault raises
    ServiceError(400) (404 for an unknown key/value cache or base run), or the ValueError,
    TypeError or HookNameError a Tracer would raise, which the service answers with 400 too
    (see host.as_service_error)."""
    if not isinstance(data, dict):
        raise ServiceError(400, f"a request is a JSON object with {sorted(CALL_FIELDS)}; got {type(data).__name__}", kind="bad_request")
    _known(data, CALL_FIELDS, "request")
    kind = data.get("kind")
    if kind not in KINDS:
        raise ServiceError(400, f"kind must be one of {KINDS}; got {kind!r}", kind="bad_request")
    runs = data.get("runs")
    if not isinstance(runs, list) or not runs or (kind != "variants" and len(runs) != 1):
        raise ServiceError(400, f"runs must be a list of {'one or more runs' if kind == 'variants' else 'one run'}; got {runs!r:.80}", kind="bad_request")
    installed = tuple(_spec(s) for s in _list(data.get("installed", []), "installed"))
    host.tracer.check_specs(installed)  # unknown names, bad ops: refused now, before anything is queued
    requests = tuple(_run(run, installed, host, owner, kind) for run in runs)
    tokens = [host.tracer.tokens_of(r.input, r.attention_mask)[0] for r in requests]
    for request in requests:
        host.tracer.check_specs(request.specs)
    options = _options(data.get("options", {}), kind)
    n_tokens = sum(t.numel() + t.shape[0] * options.get("max_new_tokens", 0) for t in tokens)  # generate's new tokens count too
    share = batching.share_key(requests[0], tokens[0], host.tracer.hook_names(), splits=host.splits_batches) if kind == "run" else None
    return Call(kind, requests, installed, options, n_tokens, share)


def _run(data: Any, installed: tuple, host: ModelHost, owner: str, kind: str) -> RunRequest:
    if not isinstance(data, dict):
        raise ServiceError(400, f"a run is a JSON object with {sorted(RUN_FIELDS)}; got {type(data).__name__}", kind="bad_request")
    _known(data, RUN_FIELDS, "run")
    if data.get("weight_grads"):
        raise ServiceError(400, "weight_grads=True: a shared service computes no weight gradients (they would stay on its workers)", kind="bad_request")
    specs = tuple(_spec(s) for s in _list(data.get("specs", []), "specs"))
    sources = decode(data.get("sources") or {})
    if not isinstance(sources, dict) or not all(isinstance(v, dict) for v in sources.values()):
        raise ServiceError(400, "sources must map names to caches ({name: {hook name: tensor}})", kind="bad_request")
    fields = {
        "attention_mask": decode(data.get("attention_mask")), "return_type": data.get("return_type", "logits"),
        "metric": decode(data.get("metric")), "specs": (installed if kind in ("run", "variants") else ()) + specs,
        "grads": _flag(data, "grads"), "sources": sources, "whole_batch": _flag(data, "whole_batch"),
    }
    if data.get("kv_cache") is not None:
        fields["kv_cache"] = _kv_cache(data["kv_cache"], host, owner)
    if data.get("resume") is not None:
        fields["resume"] = _resume(data["resume"], host, owner)
    return RunRequest(_input(decode(data.get("input"))), **fields)


def _flag(data: Mapping, name: str) -> bool:
    value = data.get(name, False)
    if not isinstance(value, bool):
        raise ServiceError(400, f"{name} must be true or false; got {value!r:.40}", kind="bad_request")
    return value


def _resume(data: Any, host: ModelHost, owner: str) -> Resume:
    """The Resume a run asks for, inside one of the owner's base runs."""
    shape = "{'base': id, 'layer': int, 'position': int, 'repeat': int}"
    if not isinstance(data, dict) or not isinstance(data.get("base"), str) or not all(
        isinstance(data.get(k, 0), int) and not isinstance(data.get(k, 0), bool) for k in ("layer", "position", "repeat")
    ) or "layer" not in data:
        raise ServiceError(400, f"resume must be {shape}; got {data!r:.80}", kind="bad_request")
    return Resume(host.session(owner, data["base"]), data["layer"], data.get("position", 0), data.get("repeat", 1))


def _kv_cache(data: Any, host: ModelHost, owner: str) -> Any:
    """The stages' key/value cache a run reads, as the client's handle describes it."""
    from shardlens.cluster.sessions import StageKeyValueCache

    shape = "{'session': id, 'frozen': bool, 'times': int, 'mask': tensor}"
    if not isinstance(data, dict) or not isinstance(data.get("session"), str) or not isinstance(data.get("frozen", False), bool) \
            or not isinstance(data.get("times", 1), int) or isinstance(data.get("times", 1), bool):
        raise ServiceError(400, f"kv_cache must be {shape}; got {data!r:.80}", kind="bad_request")
    handle = host.session(owner, data["session"])
    if not isinstance(handle, StageKeyValueCache):
        raise ServiceError(400, f"{data['session']!r} is a base run, not a key/value cache", kind="bad_request")
    mask = decode(data.get("mask"))
    if not isinstance(mask, Tensor) or mask.ndim != 2:
        got = f"shape {list(mask.shape)}" if isinstance(mask, Tensor) else type(mask).__name__
        raise ServiceError(400, f"kv_cache.mask must be the cache's attention mask so far, [batch, cached tokens]; got {got}", kind="bad_request")
    return StageKeyValueCache(handle.coordinator, handle.session, mask.long(), data.get("frozen", False), data.get("times", 1))


def _input(value: Any) -> Any:
    if isinstance(value, tuple):  # codec lists come back as tuples: a batch of texts
        return list(value)
    return value


def _spec(data: Any) -> HookSpec:
    """A client's spec, for this run only: decoded without allow_code (an sl.ops.Code is
    refused), never reading the server's files (a dictionary's weights come inline, not as
    a WeightsRef to a path or URI), and never permanent."""
    _refuse_types(data)
    spec = decode(data)
    if not isinstance(spec, HookSpec):
        raise ServiceError(400, f"a spec must be an encoded sl.HookSpec; got {type(spec).__name__}", kind="bad_request")
    return dataclasses.replace(spec, level=None, permanent=False)


def _refuse_types(data: Any) -> None:
    """Refuse, before decoding, values whose decoding would read the server's files."""
    if isinstance(data, list):
        for item in data:
            _refuse_types(item)
    elif isinstance(data, dict):
        if data.get("__type__") in REFUSED_TYPES:
            raise ServiceError(400, f"a spec holds a {data['__type__']}, which would make the service read a file or URI of its own: "
                                    "send a dictionary with its weights inline (a connected client does: sl.dictionaries.load(path) on your machine)", kind="bad_request")
        for value in data.values():
            _refuse_types(value)


def _options(data: Any, kind: str) -> dict:
    if not isinstance(data, dict):
        raise ServiceError(400, f"options must be a JSON object; got {data!r:.80}", kind="bad_request")
    if kind != "generate" and data:
        raise ServiceError(400, f"options are generate's; a {kind} request takes none, got {sorted(data)}", kind="bad_request")
    _known(data, set(GENERATE_OPTIONS), "generate options")
    if kind == "generate" and "max_new_tokens" not in data:
        raise ServiceError(400, "a generate request needs options.max_new_tokens", kind="bad_request")
    for name, value in data.items():
        if not GENERATE_OPTIONS[name](value):
            raise ServiceError(400, f"options.{name} got {value!r:.40}; see HookedModel.generate for what it takes", kind="bad_request")
    return dict(data)


def _known(data: Mapping, allowed: set, what: str) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ServiceError(400, f"unknown {what} field {unknown[0]!r}; known: {sorted(allowed)}", kind="bad_request")


def _list(value: Any, what: str) -> list:
    if not isinstance(value, list):
        raise ServiceError(400, f"{what} must be a list of specs; got {type(value).__name__}", kind="bad_request")
    return value


# ---------------------------------------------------------------------- results


def result_entries(kind: str, result: Any) -> tuple[list[tuple[str, Tensor]], dict]:
    """A job's result as named tensors and the meta that says how to put it back together."""
    entries: list[tuple[str, Tensor]] = []
    if kind in ("generate", "base_run"):
        meta = {"session": result.get("session")}
        for name, value in result.items():
            if isinstance(value, Tensor):
                entries.append((name, value))
            elif isinstance(value, dict):
                entries += [(f"{name}/{key}", tensor) for key, tensor in value.items()]
        return _sparse(entries, meta)
    meta = {"outputs": []}
    for i, run in enumerate(result):
        output = run.output
        shape = "none" if output is None else "pair" if isinstance(output, tuple) else "tensor"
        meta["outputs"].append(shape)
        outputs = output if isinstance(output, tuple) else () if output is None else (output,)
        entries += [(f"{i}/output/{j}", torch.as_tensor(value)) for j, value in enumerate(outputs)]
        entries += [(f"{i}/cache/{name}", value) for name, value in run.cache.items()]
        if run.attention_mask is not None:
            entries.append((f"{i}/mask", run.attention_mask))
    return _sparse(entries, meta)


def _sparse(entries: list[tuple[str, Tensor]], meta: dict) -> tuple[list[tuple[str, Tensor]], dict]:
    """Sparse tensors as their indices and values, their dense shapes in meta["sparse"]."""
    dense, sparse = [], {}
    for name, value in entries:
        if value.is_sparse:
            value = value.coalesce()
            sparse[name] = list(value.shape)
            dense += [(f"{name}#indices", value.indices()), (f"{name}#values", value.values())]
        else:
            dense.append((name, value))
    return dense, {**meta, "sparse": sparse}


def runs_from(entries: Mapping[str, Tensor], meta: Mapping[str, Any]) -> list[RunResult]:
    """A run or variants job's results, from what `result_entries` sent."""
    entries = dense_entries(entries, meta)
    results = []
    for i, shape in enumerate(meta["outputs"]):
        outputs = [entries[f"{i}/output/{j}"] for j in range({"none": 0, "tensor": 1, "pair": 2}[shape])]
        output = None if shape == "none" else outputs[0] if shape == "tensor" else tuple(outputs)
        prefix = f"{i}/cache/"
        cache = {name[len(prefix):]: value for name, value in entries.items() if name.startswith(prefix)}
        results.append(RunResult(output, cache, attention_mask=entries.get(f"{i}/mask")))
    return results


def dense_entries(entries: Mapping[str, Tensor], meta: Mapping[str, Any]) -> dict[str, Tensor]:
    """The entries with every sparse tensor put back together."""
    out = {name: value for name, value in entries.items() if "#" not in name}
    for name, shape in meta.get("sparse", {}).items():
        out[name] = torch.sparse_coo_tensor(entries[f"{name}#indices"], entries[f"{name}#values"], shape, check_invariants=True, is_coalesced=True)  # sent coalesced; checked: it came over the network
    return out

