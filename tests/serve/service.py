"""Starting the tracing service (Ray Serve) for a test module, on the test session's Ray."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator

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
