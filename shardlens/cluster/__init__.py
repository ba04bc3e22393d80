"""Cluster: stage workers on Ray actors or in this process, and the coordinator."""

from shardlens.cluster.backends import LocalBackend, RayBackend, make_backend
from shardlens.cluster.coordinator import Coordinator
from shardlens.cluster.worker import StageWorker

__all__ = ["Coordinator", "LocalBackend", "RayBackend", "StageWorker", "make_backend"]
