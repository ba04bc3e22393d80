"""StageWorker: one stage of one replica, with its hook specs by context level.

A plain class, so that it runs in this process (the "local" backend) exactly as it runs as
a Ray actor (`ray.remote(StageWorker)`). Everything that crosses its boundary is a value:
specs as JSON, StageIO and tensors on the CPU.
"""

from __future__ import annotations

import os
import resource
import time
import uuid
from contextlib import nullcontext
from dataclasses import fields, replace
from typing import Any, Optional, Union

import torch
from torch import Tensor

from shardlens.errors import RemoteHookError, WorkerError
from shardlens.hooks.generation import full_cache, prefix_copy, truncate_hf_cache
from shardlens.hooks.ops import RunContext
from shardlens.hooks.run import Destination
from shardlens.hooks.specs import HookSpec
from shardlens.hooks.taps import PointOptions
from shardlens.sharding import ShardPlan, StageIO, build_stage
from shardlens.sharding.stage import Graph
from shardlens.tables.cache import ActivationCache
from shardlens.tables.dtypes import from_numpy, to_numpy
from shardlens.tables.parquet import ParquetSink


class StageWorker:
    """Builds stage `index` of a plan and runs batches through it.

    Args:
        source: the checkpoint folder.
        plan_json: the ShardPlan, as JSON.
        index: the stage it holds.
        replica: which pipeline it belongs to (for error messages).
        device: put the whole stage there instead of following the plan's device map.
        threads: torch threads for this worker (None: leave torch's default).
        allow_code: accept specs holding sl.ops.Code (pickled Python).
        point_options: TransformerLens' optional hook points to add (sl.PointOptions fields).
    """

    def __init__(
        self,
        source: str,
        plan_json: str,
        index: int,
        *,
        replica: int = 0,
        device: Optional[str] = None,
        threads: Optional[int] = None,
        allow_code: bool = False,
        point_options: Optional[dict] = None,
    ):
        if threads:
            torch.set_num_threads(threads)
        self.index, self.replica, self.allow_code = index, replica, allow_code
        self.stage = build_stage(source, ShardPlan.from_json(plan_json), index, device=device, point_options=PointOptions(**(point_options or {})))
        self.device = next(self.stage.parameters()).device
        self.incarnation = uuid.uuid4().hex  # changes when a restarted actor rebuilds
        self._contexts: dict[str, RunContext] = {}  # each batch's own: what its specs read and store
        self._graphs: dict[str, Graph] = {}
        self._kv_caches: dict[str, Any] = {}  # key/value sessions: this stage's past keys and values
        self._bases: dict[str, dict[str, Tensor]] = {}  # base runs (sessions too): what their specs read here
        self._sinks: dict[str, ParquetSink] = {}  # dataset path -> the sink of the run writing there
        self._times = {"forward_s": 0.0, "backward_s": 0.0, "forwards": 0, "tokens": 0}  # tokens: batch x new positions run

    def ping(self) -> str:
        """This worker's incarnation: a new value after a restart."""
        return self.incarnation

    def sees(self, path: str) -> bool:
        """Whether a file at `path` exists on this worker's machine."""
        return os.path.exists(path)

    def hook_names(self) -> list[str]:
        return self.stage.hook_names()

    # ------------------------------------------------------------------ specs

    def install(self, level: Optional[int], specs: list[str]) -> None:
        """Install specs (JSON) at a context level (None: permanent or level-less); they act
        in the context of the batch they run in."""
        self.stage.install(level, [HookSpec.from_json(text, allow_code=self.allow_code) for text in specs])

    def remove(self, level: Optional[int], *, including_permanent: bool = False, direction: str = "both", clear_contexts: bool = False) -> None:
        """Remove the specs of one context level (of every level when None)."""
        self.stage.remove(level, including_permanent=including_permanent, direction=direction, clear_contexts=clear_contexts)

    def list_hooks(self) -> dict[str, list[HookSpec]]:
        """The specs installed on this stage, by hook point."""
        return self.stage.list_hooks()

    # ------------------------------------------------------------------ running

    def forward(
        self, batch_id: str, io: StageIO, *, keep_graph: bool = False, sources: Optional[dict] = None,
        kv: Optional[Any] = None, keep_logits: bool = True, weight_grads: bool = False,
    ) -> StageIO:
        """Run one (micro)batch through the stage; keep the graph for backward if asked.
        Returns the StageIO for the next stage, on the CPU; a last stage's logits are packed
        (see `pack`: they go to the driver), or left out with keep_logits=False (when only the
        loss or metric is wanted: logits are the largest thing a run can send back).

        With `kv` (a KVSession) the stage keeps its layers' keys and values across calls, `io`
        holds only the new tokens and its attention mask covers the cached ones too. A frozen
        session is not extended: the run gets a copy, its batch repeated `kv.repeat` times.
        A batch that enters at a layer without hidden states starts inside the session's base
        run (see `keep_base`): from its resid_pre there, at the positions after the `kv.held` it
        attends to. The batch gets a context of its own: what its specs store, and the
        `sources` they read.
        A kept graph records gradients of activations only, unless `weight_grads` (see
        HookedRootModule.activation_grads_only)."""
        start = time.perf_counter()
        ctx = self._contexts[batch_id] = RunContext(self.stage, {}, sources or {})
        io = _to(io, self.device)
        if kv is not None and io.start_layer is not None and io.hidden is None:
            io = replace(io, hidden=self._base_hidden(kv, io.start_layer))
        cache = None if kv is None else self._session_cache(kv, io)
        frozen = self.stage.activation_grads_only() if keep_graph and not weight_grads else nullcontext()
        with torch.set_grad_enabled(keep_graph), self.stage.running(ctx), frozen:
            out = self._guard(batch_id, lambda: self.stage(io, cache))
        if keep_graph:
            self._graphs[batch_id] = self.stage.detach_graph()
        self._times["forward_s"] += time.perf_counter() - start
        self._times["forwards"] += 1
        self._times["tokens"] += (io.input_ids if io.input_ids is not None else io.hidden).shape[:2].numel()
        if out.logits is not None and not keep_logits:
            out = replace(out, logits=None)
        out = _to(out, "cpu", detach=True)
        return out if out.logits is None else replace(out, logits=pack(out.logits))  # for the driver: see pack

    def _session_cache(self, kv: Any, io: StageIO) -> Any:
        """The transformers cache one run of a key/value session reads: the session's own
        (which the run extends), or for a frozen session a copy of its first `kv.held` tokens
        (of the layers the run runs), its batch repeated `kv.repeat` times; None for a frozen
        session's empty prefix."""
        if kv.session not in self._kv_caches:
            self._kv_caches[kv.session] = full_cache(self.stage.config)
        cache = self._kv_caches[kv.session]
        held = kv.held if kv.frozen else cache.get_seq_length(self._layers[0])
        if kv.frozen and held == 0:
            return None
        new = (io.input_ids if io.input_ids is not None else io.hidden).shape[1]
        if io.attention_mask is None or io.attention_mask.shape[1] != held + new or held > cache.get_seq_length(self._layers[0]):
            covered = None if io.attention_mask is None else io.attention_mask.shape[1]
            raise WorkerError(
                f"stage {self.index}, replica {self.replica}: key/value session {kv.session} holds "
                f"{cache.get_seq_length(self._layers[0])} tokens, so a run of {new} new tokens after {held} of them needs an "
                f"attention mask over {held + new}; got {covered}. A worker that restarted has lost its sessions: build the cache again"
            )
        if not kv.frozen:
            return cache
        layers = [layer for layer in self._layers if io.start_layer is None or layer >= io.start_layer]
        return prefix_copy(cache, held, kv.repeat, config=self.stage.config, layers=layers)

    def _base_hidden(self, kv: Any, layer: int) -> Tensor:
        """The base run's resid_pre entering `layer`, from position kv.held on, repeated."""
        name = f"blocks.{layer}.hook_resid_pre"
        kept = self._bases.get(kv.session, {})
        if name not in kept:
            raise WorkerError(
                f"stage {self.index}, replica {self.replica} holds no base run {kv.session} entering layer {layer}: "
                "a worker that restarted has lost it; make the base run again"
            )
        return kept[name][:, kv.held:].repeat(kv.repeat, 1, 1)  # [batch * repeat, pos - held, d_model]

    def keep_base(self, batch_id: str, session: str) -> None:
        """Keep what the stage's reading specs stored for a batch as part of a base run (with
        the session's keys and values) until end_session."""
        self._bases.setdefault(session, {}).update(self._results(batch_id))

    def kv_truncate(self, session: str, length: int) -> None:
        """Cut a key/value session back to its first `length` tokens (undoing a failed run)."""
        cache = self._kv_caches.get(session)
        if cache is None:
            return
        truncate_hf_cache(cache, length, self._layers)

    @property
    def _layers(self) -> list[int]:
        """The (global) indices of the stage's layers, in order."""
        return sorted(int(layer) for layer in self.stage.blocks)

    def kv_entries(self, session: str) -> dict[int, tuple[Tensor, Tensor]]:
        """This stage's past keys and values of a session, by layer, each [batch, pos, n_kv_heads, d_head] (CPU)."""
        cache = self._kv_caches.get(session)
        if cache is None:
            raise WorkerError(f"stage {self.index}, replica {self.replica} holds no key/value session {session}")
        return {layer: (cache.layers[layer].keys.transpose(1, 2).cpu(), cache.layers[layer].values.transpose(1, 2).cpu()) for layer in self._layers}

    def backward(self, batch_id: str, grad: Optional[Tensor]) -> Optional[Tensor]:
        """Backpropagate the batch's graph from `grad` (None or a scalar weight on the last
        stage's loss); returns the gradient of the stage's input hidden states (CPU)."""
        start = time.perf_counter()
        if batch_id not in self._graphs:
            raise WorkerError(f"stage {self.index}, replica {self.replica}: no graph kept for batch {batch_id}")
        graph = self._graphs.pop(batch_id)
        with self.stage.running(self._contexts[batch_id]):
            grad_in = self._guard(batch_id, lambda: self.stage.backward(None if grad is None else grad.to(self.device), graph))
        self._times["backward_s"] += time.perf_counter() - start
        return None if grad_in is None else grad_in.detach().cpu()

    def _results(self, batch_id: str) -> dict[str, Tensor]:
        """What the stage's reading specs stored for a batch; the batch's context is forgotten."""
        ctx = self._contexts.pop(batch_id, None)
        return {} if ctx is None else ctx.cache

    def take(self, batch_id: str) -> dict[str, "Packed"]:
        """What the stage's reading specs stored for a batch, packed (see `pack`); forgets them."""
        return {name: pack(t) for name, t in self._results(batch_id).items()}

    def write(self, batch_id: str, destination: Destination, start: int, attention_mask: Optional[Tensor]) -> list[str]:
        """Queue what the stage's reading specs stored for a batch for the destination's
        Parquet dataset, one part per hook point (see ParquetSink); `destination.examples` are
        the batch's rows in it, `start` its first row in the run's batch (which names the
        parts). Forgets the results; returns the paths the parts will have. They are written
        in the background while the stage runs its next microbatch; finish_writes(path) waits
        for them. Raises the failure of an earlier write of the run."""
        results = self._results(batch_id)
        if not results:
            return []
        # On the host first: the sink holds the cache until its parts are on disk, and
        # device memory should not wait for that.
        results = {entry: tensor.cpu() for entry, tensor in results.items()}
        cache = ActivationCache(results, attention_mask=attention_mask, examples=destination.examples, batch=destination.batch)
        path = destination.path
        if path not in self._sinks:
            self._sinks[path] = destination.sink()
        return self._sinks[path].write(cache, name=destination.part_name(start))

    def finish_writes(self, path: str) -> list[str]:
        """Wait until every part queued for `path` is published, and close that sink; returns
        the parts. A failed write raises ParquetWriteError (none of its parts stay)."""
        sink = self._sinks.pop(path, None)
        if sink is None:
            return []
        sink.close()
        return sink.parts

    def drop(self, batch_id: str) -> None:
        """Forget a batch: what its specs stored, and its graph."""
        self._contexts.pop(batch_id, None)
        self._graphs.pop(batch_id, None)

    def end_session(self, session: str) -> None:
        """Forget a key/value session's keys and values (and a base run's hidden states)."""
        self._kv_caches.pop(session, None)
        self._bases.pop(session, None)

    def stats(self) -> dict[str, Any]:
        memory = {"max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
        if self.device.type == "cuda":
            memory["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated(self.device)
        with_grad = sum(p.grad is not None for p in self.stage.parameters())
        return {"stage": self.index, "replica": self.replica, "pid": os.getpid(), **memory, **self._times, "parameters_with_grad": with_grad,
                "pending_graphs": len(self._graphs), "pending_results": len(self._contexts),
                "sessions": len(set(self._kv_caches) | set(self._bases)),
                "installed_specs": sum(len(specs) for specs in self.stage.list_hooks().values())}

    def _guard(self, batch_id: str, run: Any) -> Any:
        try:
            return run()
        except torch.OutOfMemoryError as error:
            self.drop(batch_id)
            raise WorkerError(
                f"stage {self.index}, replica {self.replica} ran out of memory on batch {batch_id}: {error}. "
                "Use a smaller microbatch_size, or more stages"
            ) from None
        except Exception as error:
            hook = getattr(error, "shardlens_hook", None)
            if hook is None:
                raise
            self.drop(batch_id)
            raise RemoteHookError(hook, self.index, self.replica, batch_id, f"{type(error).__name__}: {error}") from None


Packed = tuple  # (torch dtype name, numpy array of the tensor's bytes); a sparse entry: ("sparse", (indices, packed values, shape))


def pack(tensor: Tensor) -> Packed:
    """A CPU tensor as a numpy array (and its torch dtype): Ray moves numpy arrays between
    processes without pickling their bytes, and the receiver reads them in place from the
    object store, where a pickled tensor would be copied twice. bf16, which numpy lacks,
    travels as its 16-bit patterns. A sparse COO tensor travels as its indices and values."""
    if tensor.is_sparse:
        tensor = tensor.detach().cpu().coalesce()
        return "sparse", (tensor.indices().numpy(), pack(tensor.values()), tuple(tensor.shape))
    tensor = tensor.detach().cpu().contiguous()
    return str(tensor.dtype).removeprefix("torch."), to_numpy(tensor)


def unpack(packed: Packed) -> Tensor:
    """The tensor of `pack`. It may share the object store's read-only memory: copy it
    (torch.cat, clone) before handing it to anyone who could write to it."""
    import warnings

    dtype, array = packed
    if dtype == "sparse":
        indices, values, shape = array
        return torch.sparse_coo_tensor(unpack(("int64", indices)), unpack(values), shape, is_coalesced=True, check_invariants=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return from_numpy(array, dtype)


def _to(io: StageIO, device: Union[str, torch.device], *, detach: bool = False) -> StageIO:
    changes = {}
    for f in fields(io):
        value = getattr(io, f.name)
        if isinstance(value, Tensor):
            value = value.detach() if detach else value
            changes[f.name] = value.to(device)
    return replace(io, **changes)
