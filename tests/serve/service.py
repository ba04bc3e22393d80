"""Helpers of the service tests: starting the tracing service (Ray Serve) on the test
session's Ray, and comparing run results."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator

import torch

from shardlens.serve.config import ModelEntry, ServiceConfig, TokenEntry, hash_token


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def running(config: ServiceConfig) -> Iterator[str]:
    """The service of `config`, on a free port of 127.0.0.1, until the block ends; yields its URL."""
    from shardlens.serve import app

    url = app.start(config, port=free_port())
    try:
        yield url
    finally:
        app.stop()


def config_of(source, *, tokens: dict, **model: object) -> ServiceConfig:
    """A config hosting the checkpoint at `source` as model "tiny", with tokens by name:
    {name: (token, Limits or None)}."""
    entries = tuple(TokenEntry(name, hash_token(token), **({"limits": limits} if limits else {})) for name, (token, limits) in tokens.items())
    return ServiceConfig(models=(ModelEntry("tiny", str(source), **model),), tokens=entries)


def assert_same_result(got, expected, atol: float = 1e-5) -> None:
    """Two RunResults hold the same output, cache entries and attention mask."""
    torch.testing.assert_close(got.output, expected.output, atol=atol, rtol=0)
    assert sorted(got.cache) == sorted(expected.cache)
    for name in expected.cache:
        torch.testing.assert_close(got.cache[name], expected.cache[name], atol=atol, rtol=0)
    if expected.attention_mask is None:
        assert got.attention_mask is None
    else:
        assert torch.equal(got.attention_mask.cpu(), expected.attention_mask.cpu())
