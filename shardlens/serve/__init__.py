"""A shared tracing service: models hosted as Tracers on Ray Serve, used over HTTP with the
same hook API (see `connect`). Requests are declarative specs, never code; results come
back as Arrow IPC.

`shardlens serve CONFIG` starts it (see serve.config for the file, serve.app for the
routes); `sl.connect(url, model=..., token=...)` is the client.
"""

from shardlens.serve.client import Client, RemoteBaseRun, RemoteJob, RemoteKeyValueCache, connect

__all__ = ["Client", "RemoteBaseRun", "RemoteJob", "RemoteKeyValueCache", "connect"]
