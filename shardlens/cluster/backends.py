"""Backends: where stage workers live. "local" in this process; "ray" as Ray actors.

Both offer the same three things: make a worker, call a method (returning a handle), and get
the values of handles. A Ray handle is an ObjectRef, and a call may take another call's
ObjectRef as an argument: Ray passes the value from worker to worker without the driver.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any, Optional

from shardlens.cluster.worker import StageWorker
from shardlens.errors import WorkerError
from shardlens.sharding.plan import BUILT_IN_RESOURCES


class _Done:
    """A local call's result (or the exception it raised), to be read by get()."""

    __slots__ = ("value", "error")

    def __init__(self, value: Any = None, error: Optional[BaseException] = None):
        self.value, self.error = value, error


class LocalBackend:
    """Workers as plain objects in this process; calls run at once."""

    name = "local"

    def __init__(self) -> None:
        self.count = 0

    def make_workers(self, arguments: list[dict], needs: Optional[list[dict]] = None, *,
                     on_built: Optional[Callable[[], None]] = None) -> list[Any]:
        """One StageWorker per entry of `arguments` (its constructor keywords), built one after
        another; on_built() after each. `needs` (cluster resources) do not apply here."""
        workers = []
        for kwargs in arguments:
            workers.append(StageWorker(**kwargs))
            if on_built is not None:
                on_built()
        self.count += len(workers)
        return workers

    def placement(self) -> list[str]:
        """Where each worker runs: this process."""
        return ["local"] * self.count

    def unrecoverable(self) -> Optional[str]:
        return None

    def lost_nodes(self) -> str:
        return "no node lost"

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
    """Workers as Ray actors in one placement group (a bundle per worker, holding its CPUs,
    GPUs, the host memory its weights take, and its stage's custom resources), restarted by
    Ray when they die. Bundles are spread over the cluster's nodes (Ray's SPREAD strategy:
    different nodes where possible, each where its resources fit, the least loaded first).
    When a node dies, Ray places its bundles again on nodes that can hold them and restarts
    the actors there. Starts a local Ray instance when none is running and no address is
    given; shuts down only what it started."""

    name = "ray"

    def __init__(self, address: Optional[str] = None, *, gpus_per_worker: float = 0.0, max_restarts: int = 3):
        import ray

        self.ray = ray
        self.started = False
        if not ray.is_initialized():
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            self._connect(address)
            self.started = address is None
        self.gpus, self.max_restarts = gpus_per_worker, max_restarts
        self.group = None
        self.actors: list[Any] = []
        self.labels: list[str] = []  # "stage s, replica r" of each actor, for messages
        self.needs: list[dict] = []  # each actor's custom resources
        self.nodes_used: dict[str, str] = {}  # node id -> "address (custom resources)" of nodes that held our bundles

    def _connect(self, address: Optional[str], attempts: int = 3) -> None:
        """ray.init; a Ray Client address ("ray://...") is tried again when the head's client
        server fails to start the session's own server process, which happens now and then."""
        for attempt in range(1, attempts + 1):
            try:
                self.ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
                return
            except ConnectionError as error:  # ConnectionAbortedError: "Starting Ray client server failed"
                self.ray.shutdown()
                if not (address or "").startswith("ray://") or attempt == attempts:
                    raise WorkerError(f"could not connect to the Ray cluster at {address} ({attempt} attempt{'s' * (attempt > 1)}): {error}") from error
                time.sleep(2.0)

    def make_workers(self, arguments: list[dict], needs: Optional[list[dict]] = None, *,
                     on_built: Optional[Callable[[], None]] = None) -> list[Any]:
        """One actor per entry of `arguments` (StageWorker keywords). needs[i]: the worker's
        custom resources, and "memory", the bytes of host memory its weights take. With
        `on_built`, waits until every actor has built its stage (or failed to: its error comes
        with its first call), calling on_built() as each one does."""
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        needs = [dict(n) for n in needs] if needs is not None else [{} for _ in arguments]
        self.labels = [f"stage {kwargs.get('index')}, replica {kwargs.get('replica', 0)}" for kwargs in arguments]
        self.needs = [{k: v for k, v in n.items() if k != "memory"} for n in needs]
        self._check_offered()
        cpus = min(1.0, self.ray.cluster_resources().get("CPU", 1.0) / len(arguments))
        bundles = []
        for need in needs:
            memory = int(need.pop("memory", 0))
            bundles.append({"CPU": cpus, **({"GPU": self.gpus} if self.gpus else {}), **({"memory": memory} if memory else {}), **need})
        self.group = placement_group(bundles, strategy="SPREAD")
        try:
            self.ray.get(self.group.ready(), timeout=300)
        except self.ray.exceptions.GetTimeoutError:
            raise WorkerError(f"the cluster could not place the workers' bundles within 300 s: {bundles}") from None
        self._note_nodes(self._bundle_nodes(), self.ray.nodes())
        actor_class = self.ray.remote(StageWorker)
        for i, kwargs in enumerate(arguments):
            options = dict(
                num_cpus=cpus, num_gpus=self.gpus, max_restarts=self.max_restarts, max_task_retries=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=i),
            )
            if bundles[i].get("memory"):
                options["memory"] = bundles[i]["memory"]
            options["resources"] = dict(self.needs[i])
            self.actors.append(actor_class.options(**options).remote(**kwargs))
        if on_built is not None:
            self._wait_built(self.actors[-len(arguments):], on_built)
        return list(self.actors)

    def _wait_built(self, actors: list[Any], on_built: Callable[[], None]) -> None:
        """on_built() as each actor's constructor returns (a call is answered only after it);
        at the first actor that failed to build, stop: its error comes with its first call."""
        pending = [actor.ping.remote() for actor in actors]
        while pending:
            ready, pending = self.ray.wait(pending, num_returns=1)
            try:
                self.ray.get(ready)
            except Exception:  # noqa: BLE001  raised again, as the coordinator words it, by the worker's first call
                return
            on_built()

    def _check_offered(self) -> None:
        """Refuse custom resources that no node of the cluster offers (else the placement waits forever)."""
        offered = self.ray.cluster_resources()
        for label, need in zip(self.labels, self.needs):
            missing = _missing(offered, need)
            if missing:
                custom = _custom(offered)
                raise WorkerError(f"{label} needs {missing}, which the cluster does not offer; its custom resources are {custom}")

    def _bundle_nodes(self) -> dict[int, str]:
        from ray.util.placement_group import placement_group_table

        return {int(k): v for k, v in placement_group_table(self.group).get("bundles_to_node_id", {}).items()}

    def _note_nodes(self, where: dict[int, str], nodes: list[dict]) -> None:
        """Remember the nodes that hold our bundles (`where`: bundle -> node id), described
        while they are alive (`nodes`: ray.nodes())."""
        held = set(where.values()) - set(self.nodes_used)
        for node in nodes:
            if node["NodeID"] in held:
                custom = _custom(node["Resources"])
                self.nodes_used[node["NodeID"]] = f"{node['NodeManagerAddress']} ({', '.join(custom) or 'no custom resources'})"

    def placement(self) -> list[str]:
        """The address of the node each worker's bundle is on now."""
        nodes, where = self.ray.nodes(), self._bundle_nodes()
        self._note_nodes(where, nodes)
        ips = {node["NodeID"]: node["NodeManagerAddress"] for node in nodes}
        return [ips.get(where.get(i, ""), "unplaced") for i in range(len(self.actors))]

    def unrecoverable(self) -> Optional[str]:
        """Why a lost worker cannot come back (a custom resource it needs is on no live
        node), naming the nodes of ours that were lost; None while it might."""
        alive = [n for n in self.ray.nodes() if n["Alive"]]
        for label, need in zip(self.labels, self.needs):
            if need and all(_missing(n["Resources"], need) for n in alive):
                return f"{label} needs {need}, which no live node offers; {self.lost_nodes()}"
        return None

    def lost_nodes(self) -> str:
        """The nodes that held our workers and are dead now, with their custom resources."""
        dead = {n["NodeID"] for n in self.ray.nodes() if not n["Alive"]}
        lost = [text for node, text in self.nodes_used.items() if node in dead]
        return ("lost node " + "; ".join(lost)) if lost else "no node of ours was lost"

    def call(self, worker: Any, method: str, *args: Any, **kwargs: Any) -> Any:
        return getattr(worker, method).remote(*args, **kwargs)

    def get(self, handles: Any) -> Any:
        try:
            return self.ray.get(handles)
        except self.ray.exceptions.RayTaskError as error:
            cause = getattr(error, "cause", None)
            raise (cause if isinstance(cause, BaseException) else error) from None

    def is_lost(self, error: BaseException) -> bool:
        lost = (self.ray.exceptions.RayActorError, self.ray.exceptions.ActorUnavailableError, self.ray.exceptions.ObjectLostError)
        return isinstance(error, lost)

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


def _missing(resources: dict, need: dict) -> dict:
    """What of `need` (resource -> amount) `resources` lacks."""
    return {k: v for k, v in need.items() if resources.get(k, 0) < v}


def _custom(resources: dict) -> list[str]:
    """The custom resources among a node's or cluster's resources."""
    return sorted(k for k in resources if k not in BUILT_IN_RESOURCES and not k.startswith("node:"))


def make_backend(name: str, address: Optional[str], gpus_per_worker: float = 0.0) -> Any:
    if name == "local":
        if address is not None:
            raise ValueError("backend='local' runs in this process: it takes no address")
        return LocalBackend()
    if name == "ray":
        return RayBackend(address, gpus_per_worker=gpus_per_worker)
    raise ValueError(f"backend must be 'ray' or 'local'; got {name!r}")


__all__ = ["LocalBackend", "RayBackend", "WorkerError", "make_backend"]
