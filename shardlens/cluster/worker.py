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
from dataclasses import fields, replace
from typing import Any, Optional, Union

import torch
from torch import Tensor

from shardlens.errors import RemoteHookError, WorkerError
from shardlens.hooks.ops import RunContext
from shardlens.hooks.specs import HookSpec
from shardlens.sharding import ShardPlan, StageIO, build_stage


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
    ):
        if threads:
            torch.set_num_threads(threads)
        self.index, self.replica, self.allow_code = index, replica, allow_code
        self.stage = build_stage(source, ShardPlan.from_json(plan_json), index, device=device)
        self.device = next(self.stage.parameters()).device
        self.incarnation = uuid.uuid4().hex  # changes when a restarted actor rebuilds
        self._ctx = RunContext(self.stage, cache={})  # each batch gets its own store (see forward)
        self._results: dict[str, dict[str, Tensor]] = {}
        self._graphs: dict[str, Any] = {}
        self._kv_caches: dict[str, Any] = {}  # generation sessions: this stage's past keys and values
        self._times = {"forward_s": 0.0, "backward_s": 0.0, "forwards": 0}

    def ping(self) -> str:
        """This worker's incarnation: a new value after a restart."""
        return self.incarnation

    def hook_names(self) -> list[str]:
        return self.stage.hook_names()

    # ------------------------------------------------------------------ specs

    def install(self, level: Optional[int], specs: list[str]) -> None:
        """Install specs (JSON) at a context level (None: permanent or level-less)."""
        for text in specs:
            spec = HookSpec.from_json(text, allow_code=self.allow_code)
            self.stage._install_spec(spec, self._ctx, level=level)

    def pop(self, level: int) -> None:
        """Remove the hooks of one context level."""
        self.stage.reset_hooks(clear_contexts=False, including_permanent=False, level=level)

    def reset(self, including_permanent: bool = False) -> None:
        self.stage.reset_hooks(including_permanent=including_permanent)

    def list_hooks(self) -> dict[str, int]:
        return {name: len(handles) for name, handles in self.stage.list_hooks().items()}

    # ------------------------------------------------------------------ running

    def forward(
        self, batch_id: str, io: StageIO, *, keep_graph: bool = False, sources: Optional[dict] = None, kv_cache: Optional[str] = None,
    ) -> StageIO:
        """Run one (micro)batch through the stage; keep the graph for backward if asked. With
        `kv_cache` (a session id), the stage keeps its layers' keys and values across calls."""
        start = time.perf_counter()
        self._ctx.cache = self._results.setdefault(batch_id, {})
        self._ctx.sources = sources or {}
        io = _to(io, self.device)
        cache = None
        if kv_cache is not None:
            from transformers import DynamicCache

            cache = self._kv_caches.setdefault(kv_cache, DynamicCache(config=self.stage.config))
        with torch.set_grad_enabled(keep_graph):
            out = self._guard(batch_id, lambda: self.stage(io, cache))
        if keep_graph:
            self._graphs[batch_id], self.stage._pending = self.stage._pending, None
        self._times["forward_s"] += time.perf_counter() - start
        self._times["forwards"] += 1
        return _to(out, "cpu", detach=True)

    def backward(self, batch_id: str, grad: Optional[Tensor]) -> Optional[Tensor]:
        """Backpropagate the batch's graph from `grad` (None or a scalar weight on the last
        stage's loss); returns the gradient of the stage's input hidden states (CPU)."""
        start = time.perf_counter()
        if batch_id not in self._graphs:
            raise WorkerError(f"stage {self.index}, replica {self.replica}: no graph kept for batch {batch_id}")
        self._ctx.cache = self._results.setdefault(batch_id, {})
        self.stage._pending = self._graphs.pop(batch_id)
        grad_in = self._guard(batch_id, lambda: self.stage.backward(None if grad is None else grad.to(self.device)))
        self._times["backward_s"] += time.perf_counter() - start
        return None if grad_in is None else grad_in.detach().cpu()

    def take(self, batch_id: str) -> dict[str, Tensor]:
        """What the stage's reading specs stored for a batch (CPU tensors); forgets them."""
        return {name: t.detach().cpu() for name, t in self._results.pop(batch_id, {}).items()}

    def drop(self, batch_id: str) -> None:
        self._results.pop(batch_id, None)
        self._graphs.pop(batch_id, None)
        self._kv_caches.pop(batch_id, None)

    def stats(self) -> dict[str, Any]:
        memory = {"max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
        if self.device.type == "cuda":
            memory["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated(self.device)
        return {"stage": self.index, "replica": self.replica, "pid": os.getpid(), **memory, **self._times,
                "pending_graphs": len(self._graphs), "pending_results": len(self._results)}

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


def _to(io: StageIO, device: Union[str, torch.device], *, detach: bool = False) -> StageIO:
    changes = {}
    for f in fields(io):
        value = getattr(io, f.name)
        if isinstance(value, Tensor):
            value = value.detach() if detach else value
            changes[f.name] = value.to(device)
    return replace(io, **changes)
