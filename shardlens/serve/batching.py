"""Many clients' runs as one pipeline run: which runs can share a batch, and how.

Runs of the same model that read the same hook points the same way and differ only in
what they write can run as one batch: their inputs are stacked, each run's writing specs
act on its own rows only (their `batch` selector), the reading specs act once on the whole
batch, and each run gets its own rows of the output and of what was read. Writing ops act
row by row (Ablate("mean") takes the mean over the selected rows: the run's own), so every
run computes what it would alone (up to the float rounding of a larger batch).

A run may share a batch when it is a plain forward pass (no gradients, key/value cache,
resume, sources or dataset destination), returns logits or nothing, and each of its specs
is Cache or one of the simple writing ops over the whole batch (see share_key for which
runs share with which).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor

from shardlens.hooks.ops import Ablate, Add, Cache, Patch, Scale
from shardlens.hooks.run import RunRequest, RunResult
from shardlens.hooks.specs import HookSpec

WRITING = (Ablate, Add, Patch, Scale)


def share_key(request: RunRequest, tokens: Tensor, names: Sequence[str], *, splits: bool = False) -> Optional[tuple]:
    """What a run must have in common with others to share their batch (None: it runs alone).
    `tokens` are its token ids [batch, pos]; `names` the model's hook names; `splits`: the
    runner splits a batch into microbatches (replicas or a microbatch size), where a writing
    op whose effect depends on the batch (Ablate("mean"), values shaped [batch, ...]) acts
    on each microbatch alone: such a run shares only when it asked for its whole batch.

    Runs that read where they do not write share with any runs that read the same way. A
    run that reads at a hook point where it also writes shares only with runs whose specs
    have the same order, op types and points (they may differ in the ops' values): there,
    each read must come after the same writes in every run.
    """
    if request.kv_cache is not None or request.resume is not None or request.write is not None or request.sources:
        return None
    if request.needs_grad or request.weight_grads or request.metric is not None or request.return_type not in ("logits", None):
        return None
    if splits and not request.whole_batch and any(not isinstance(spec.op, Cache) for spec in request.specs):
        return None
    signature, written, read = [], set(), set()
    for spec in request.specs:
        op = spec.op
        if spec.dir != "fwd" or getattr(op, "batch", None) is not None or type(op) not in (Cache, *WRITING):
            return None
        points = tuple(spec.resolve(names))
        if isinstance(op, Cache):
            if op.sparse or op.top_k is not None:
                return None
            signature.append(("read", dataclasses.replace(spec, level=None, permanent=False).to_json()))
            read.update(points)
        else:
            signature.append(("write", type(op).__name__, points, spec.prepend))
            written.update(points)
    if read & written:
        return (tuple(tokens.shape[1:]), request.return_type, "ordered", tuple(signature))
    return (tuple(tokens.shape[1:]), request.return_type, "free", tuple(s for s in signature if s[0] == "read"))


def merged(requests: Sequence[RunRequest], tokens: Sequence[Tensor], masks: Sequence[Optional[Tensor]], key: tuple) -> tuple[RunRequest, list[slice]]:
    """One request running all of `requests` (which share `key`) as one batch, and the rows
    of each. `tokens` and `masks` are theirs as token ids and attention masks."""
    rows, start = [], 0
    for t in tokens:
        rows.append(slice(start, start + t.shape[0]))
        start += t.shape[0]
    if key[2] == "ordered":  # spec by spec: one read for all, or each run's write on its own rows
        specs = [column[0] if isinstance(column[0].op, Cache) else None for column in zip(*(r.specs for r in requests))]
        specs = [spec for k, column in enumerate(zip(*(r.specs for r in requests)))
                 for spec in ([specs[k]] if specs[k] is not None else [_on_rows(s, own) for s, own in zip(column, rows)])]
    else:  # the reads (the same in every run) once, and every run's writes on its own rows
        specs = [s for s in requests[0].specs if isinstance(s.op, Cache)]
        specs += [_on_rows(s, own) for request, own in zip(requests, rows) for s in request.specs if not isinstance(s.op, Cache)]
    mask = None
    if any(m is not None for m in masks):
        mask = torch.cat([torch.ones_like(t) if m is None else m.to(t.dtype) for t, m in zip(tokens, masks)])
    whole = any(not isinstance(spec.op, Cache) for spec in specs)  # row selectors need the batch on one pipeline
    request = RunRequest(torch.cat(list(tokens)), attention_mask=mask, return_type=requests[0].return_type, specs=tuple(specs), whole_batch=whole)
    return request, rows


def _on_rows(spec: HookSpec, rows: slice) -> HookSpec:
    return dataclasses.replace(spec, op=dataclasses.replace(spec.op, batch=rows))


def split(result: RunResult, rows: Sequence[slice], masks: Sequence[Optional[Tensor]]) -> list[RunResult]:
    """Each run's own rows of a shared run's result."""
    parts = []
    for own, mask in zip(rows, masks):
        output = None if result.output is None else result.output[own]
        cache = {name: value[own] for name, value in result.cache.items()}  # batch is every entry's first axis
        parts.append(RunResult(output, cache, attention_mask=mask))
    return parts
