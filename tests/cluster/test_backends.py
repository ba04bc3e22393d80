"""RayBackend's connection to a cluster, with a stand-in for the ray module."""

import pytest

from shardlens.cluster.backends import RayBackend
from shardlens.errors import WorkerError


class FlakyRay:
    """ray.init fails `failures` times the way a Ray Client head does when it cannot start
    the session's client server, then connects."""

    def __init__(self, failures: int):
        self.failures, self.inits, self.shutdowns = failures, 0, 0

    def init(self, **kwargs):
        self.inits += 1
        if self.inits <= self.failures:
            raise ConnectionAbortedError("Initialization failure from server: Starting Ray client server failed.")

    def shutdown(self):
        self.shutdowns += 1


def backend_with(ray) -> RayBackend:
    backend = RayBackend.__new__(RayBackend)
    backend.ray = ray
    return backend


def test_a_ray_client_connection_is_tried_again(monkeypatch):
    monkeypatch.setattr("time.sleep", lambda seconds: None)
    ray = FlakyRay(failures=2)
    backend_with(ray)._connect("ray://10.0.0.1:10001")
    assert ray.inits == 3 and ray.shutdowns == 2
    with pytest.raises(WorkerError, match=r"could not connect to the Ray cluster at ray://10.0.0.1:10001 \(3 attempts\)"):
        backend_with(FlakyRay(failures=3))._connect("ray://10.0.0.1:10001")
    plain = FlakyRay(failures=1)
    with pytest.raises(WorkerError, match=r"at 10.0.0.1:6379 \(1 attempt\)"):  # only Ray Client sessions are retried
        backend_with(plain)._connect("10.0.0.1:6379")
    assert plain.inits == 1
