"""Named exceptions, one per broken rule; every subsystem raises these (this module imports nothing of shardlens)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def closest_names(name: str, known: Iterable[str], n: int = 5) -> list[str]:
    """The known names most similar to `name`, best first (at most n)."""
    known = list(known)
    close = difflib.get_close_matches(name, known, n=n, cutoff=0.5)
    return close or difflib.get_close_matches(name, known, n=n, cutoff=0.0)


class HookNameError(KeyError):
    """A hook name (or glob) that matches no hook point of the model.

    A KeyError, so code that catches a missing key from a dict of hook points still works.
    `.name` is the offending name; `.closest` the most similar existing names.
    """

    def __init__(self, name: str, known: Iterable[str], *, what: str = "hook point named"):
        self.name = name
        self.closest = closest_names(name, known)
        hint = ", ".join(repr(c) for c in self.closest) if self.closest else "(the model has none)"
        self.message = f"no {what} {name!r}; closest existing names: {hint}"
        super().__init__(self.message)

    def __str__(self) -> str:
        # KeyError.__str__ would repr() the message and wrap it in quotes.
        return self.message


class ModelSourceError(ValueError):
    """A model source that is neither a checkpoint folder nor a Hugging Face hub id that loads:
    what the source is, and what was expected."""


class ShardPlanError(ValueError):
    """A shard plan that cannot be made or used: the rule broken and the values that broke it."""


class RemoteHookError(RuntimeError):
    """A hook that raised on a worker: names the hook point, stage, replica and batch."""

    def __init__(self, hook: str, stage: int, replica: int, batch: str, message: str):
        self.hook, self.stage, self.replica, self.batch, self.message = hook, stage, replica, batch, message
        super().__init__(f"hook at {hook} raised on stage {stage}, replica {replica}, batch {batch}: {message}")

    def __reduce__(self):
        return (type(self), (self.hook, self.stage, self.replica, self.batch, self.message))


class WorkerError(RuntimeError):
    """A stage worker failed outside any hook (lost, out of memory, …): what and where."""


class ParquetWriteError(OSError):
    """Writes of a ParquetSink that failed: which, and why. None of their parts were kept.

    An OSError, as the failure of a buffered file's write is. `.unwritten` holds the data
    of every write the sink did not carry out, in the order they were given, so nothing
    computed is lost; `.writes` numbers them (the sink's first write is 1). The cause is
    the first failure's exception.
    """

    def __init__(self, message: str, *, writes: tuple = (), unwritten: tuple = ()):
        super().__init__(message)
        self.message, self.writes, self.unwritten = message, tuple(writes), tuple(unwritten)

    def __str__(self) -> str:
        if self.unwritten:
            return f"{self.message} The data that was not written is on this error's .unwritten."
        return self.message

    def __reduce__(self):
        # The unwritten data stays in the process that has it; what failed travels.
        return (type(self), (self.message,), {"writes": self.writes})


class DatasetError(ValueError):
    """A dataset that cannot be written, resumed, verified or read: an activation dataset
    (shardlens.tables.datasets), or a folder that is no shardlens Parquet dataset; names the
    value or the file at fault and what would be valid."""


class ServiceError(Exception):
    """A request the tracing service refused or could not run: the HTTP status it answered
    (4xx: the request is at fault and changed nothing on the server), the kind of error
    (the server-side exception's name, or "unauthorized", "limit", ...) and what is wrong."""

    def __init__(self, status: int, message: str, *, kind: str = "error"):
        self.status, self.kind, self.message = status, kind, message
        super().__init__(f"{message} (HTTP {status}, {kind})")

    def __reduce__(self):
        return (type(self), (self.status, self.message), {"kind": self.kind})
