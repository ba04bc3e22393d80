"""Backends: where stage workers live. "local" in this process; "ray" as Ray actors.

Both offer the same three things: make a worker, call a method (returning a handle), and get
the values of handles. A Ray handle is an ObjectRef, and a call may take another call's
ObjectRef as an argument: Ray passes the value from worker to worker without the driver.
"""

from __future__ import annotations

import os
from typing import Any, Optional

from shardlens.cluster.worker import StageWorker
from shardlens.errors import WorkerError


class _Done:
    """A local call's result (or the exception it raised), to be read by get()."""

    __slots__ = ("value", "error")

    def __init__(self, value: Any = None, error: Optional[BaseException] = None):
        self.value, self.error = value, error


class LocalBackend:
    """Workers as plain objects in this process; calls run at once."""

    name = "local"

    def make_workers(self, specs: list[dict]) -> list[Any]:
        return [StageWorker(**spec) for spec in specs]

    def call(self, worker: Any, method: str, *args: Any, **kwargs: Any) -> _Done:
        args = tuple(self._value(a) for a in args)
        kwargs = {k: self._value(v) for k, v in kwargs.items()}
        try:
            return _Done(getattr(worker, method)(*args, **kwargs))
        except Exception as error:  # delivered by get(), as Ray delivers a task's error
            return _Done(error=error)

    @staticmethod
    def _value(value: Any) -> Any:
        if isinstance(value, _Done):
            if value.error is not None:
                raise value.error
            return value.value
        return value

    def get(self, handles: Any) -> Any:
        if isinstance(handles, list):
            return [self._value(h) for h in handles]
        return self._value(handles)

    def is_lost(self, error: BaseException) -> bool:
        return False

    def kill(self, workers: list[Any]) -> None:
        pass

    def shutdown(self) -> None:
        pass


class RayBackend:
    """Workers as Ray actors in a placement group (one bundle per worker), restarted by Ray
    when they die. Starts a local Ray instance when none is running and no address is given;
    shuts down only what it started."""

    name = "ray"

    def __init__(self, address: Optional[str] = None, *, gpus_per_worker: float = 0.0, max_restarts: int = 3):
        import ray

        self.ray = ray
        self.started = False
        if not ray.is_initialized():
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
            self.started = address is None
        self.gpus, self.max_restarts = gpus_per_worker, max_restarts
        self.group = None
        self.actors: list[Any] = []

    def make_workers(self, specs: list[dict]) -> list[Any]:
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        cpus = min(1.0, self.ray.cluster_resources().get("CPU", 1.0) / len(specs))
        bundle = {"CPU": cpus, **({"GPU": self.gpus} if self.gpus else {})}
        self.group = placement_group([dict(bundle) for _ in specs], strategy="PACK")
        self.ray.get(self.group.ready(), timeout=300)
        actor_class = self.ray.remote(StageWorker)
        for i, spec in enumerate(specs):
            options = dict(
                num_cpus=cpus, num_gpus=self.gpus, max_restarts=self.max_restarts, max_task_retries=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=i),
            )
            self.actors.append(actor_class.options(**options).remote(**spec))
        return list(self.actors)

    def call(self, worker: Any, method: str, *args: Any, **kwargs: Any) -> Any:
        return getattr(worker, method).remote(*args, **kwargs)

    def get(self, handles: Any) -> Any:
        try:
            return self.ray.get(handles)
        except self.ray.exceptions.RayTaskError as error:
            cause = getattr(error, "cause", None)
            raise (cause if isinstance(cause, BaseException) else error) from None

    def is_lost(self, error: BaseException) -> bool:
        return isinstance(error, (self.ray.exceptions.RayActorError, self.ray.exceptions.ActorUnavailableError))

    def kill(self, workers: list[Any]) -> None:
        for worker in workers:
            self.ray.kill(worker, no_restart=True)

    def shutdown(self) -> None:
        self.kill(self.actors)
        self.actors = []
        if self.group is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self.group)
            self.group = None
        if self.started:
            self.ray.shutdown()
            self.started = False


def make_backend(name: str, address: Optional[str], gpus_per_worker: float = 0.0) -> Any:
    if name == "local":
        if address is not None:
            raise ValueError("backend='local' runs in this process: it takes no address")
        return LocalBackend()
    if name == "ray":
        return RayBackend(address, gpus_per_worker=gpus_per_worker)
    raise ValueError(f"backend must be 'ray' or 'local'; got {name!r}")


__all__ = ["LocalBackend", "RayBackend", "WorkerError", "make_backend"]
