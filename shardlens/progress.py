"""Progress of long tasks (a campaign's work units, loading a model's stages, writing a
dataset), reported one way for the whole process. This module imports nothing of shardlens.

Modes (process-wide: `configure(mode)`; `using(mode)` for a block, which other threads'
tasks follow too while it lasts; the `shardlens` command sets it from its --quiet and --json
options):

- "bar" (the default, as transformers shows its loading and download bars): a tqdm bar per
  task on stderr with its description, done/total, unit, rate and time left.
- "quiet": nothing.
- "json": one JSON object per line on stderr per event, for schedulers and log collectors;
  stdout stays the command's own output. Events:
  {"event": "start" | "progress" | "end", "task": "campaign" | "load" | "write",
   "desc": "...", "done": 3, "total": 8, "unit": "unit" | "stage" | "row" | "example",
   "rate": 1.5, "eta_s": 3.3, "elapsed_s": 2.0, "time": "2025-01-31T02:00:00.000Z"}
  `rate` is units per second of this run (null before any), `eta_s` the seconds left at that
  rate (null while unknown), `total` null where unknown; "end" also has "ok" (false when the
  task's block raised). Progress events come at most once per `interval` seconds, except
  the one that reaches the total. With `JsonLines` in place of stderr, any other line
  written there is an event too: {"event": "log", "message": "...", "time": ...}.

Example:
    >>> with progress.task("load", "loading 2 stages", total=2, unit="stage") as task:
    ...     for stage in stages:
    ...         build(stage)
    ...         task.advance()
"""

from __future__ import annotations

import io
import json
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any, Optional, TextIO

MODES = ("bar", "quiet", "json")

_settings: dict[str, Any] = {"mode": "bar", "stream": None, "interval": 0.5}


def configure(mode: str, *, stream: Optional[TextIO] = None, interval: float = 0.5) -> None:
    """Report every task from now on in `mode` ("bar", "quiet" or "json").

    Args:
        stream: where bars and JSON lines go (default: sys.stderr at the time of writing).
        interval: the fewest seconds between two JSON progress events of a task.
    """
    if mode not in MODES:
        raise ValueError(f"progress mode must be one of {', '.join(MODES)}; got {mode!r}")
    if interval < 0:
        raise ValueError(f"interval must be >= 0 seconds; got {interval}")
    _settings.update(mode=mode, stream=stream, interval=interval)


def mode() -> str:
    """The mode tasks are reported in now."""
    return _settings["mode"]


@contextmanager
def using(mode: str, *, stream: Optional[TextIO] = None, interval: float = 0.5) -> Iterator[None]:
    """configure(mode, ...) for the block, then back to the settings before it."""
    before = dict(_settings)
    configure(mode, stream=stream, interval=interval)
    try:
        yield
    finally:
        _settings.update(before)


def task(kind: str, desc: str, *, total: Optional[int], unit: str, initial: int = 0) -> Task:
    """Start reporting a task in the current mode; advance() it, then close() it (or use it
    as a context manager).

    Args:
        kind: what the task is ("campaign", "load", "write"): the JSON events' "task".
        desc: what a person reads ("loading 2 stages", the campaign's name).
        total: the units the task has in all (None: unknown).
        unit: the word for one unit ("unit", "stage", "row", "example").
        initial: units already done before this run (a resumed campaign's finished units).
    """
    return Task(kind, desc, total=total, unit=unit, initial=initial)


class JsonLines(io.TextIOBase):
    """A text stream that keeps another one JSON lines: a line that is a JSON object passes
    as it is, any other line becomes {"event": "log", "message": line, "time": ...}. The
    `shardlens --json` command puts one in place of sys.stderr, so that what libraries print
    there (Ray's and transformers' log handlers, Python's warnings) keeps stderr one JSON
    object per line; `close()` ends that, and later writes pass through unchanged."""

    def __init__(self, stream: TextIO):
        super().__init__()
        self.stream, self.active, self._partial = stream, True, ""
        self._lock = threading.Lock()

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        with self._lock:
            if not self.active:
                return self.stream.write(text)
            *lines, self._partial = (self._partial + text).split("\n")
            for line in lines:
                self._line(line)
            return len(text)

    def _line(self, line: str) -> None:
        if not line.strip():
            return
        try:
            is_event = isinstance(json.loads(line), dict)
        except ValueError:
            is_event = False
        self.stream.write((line if is_event else json.dumps({"event": "log", "message": line, "time": _now()})) + "\n")

    def flush(self) -> None:
        self.stream.flush()

    def close(self) -> None:
        """Write what is left of a last unfinished line, and pass writes through from now on."""
        with self._lock:
            if self.active and self._partial:
                self._line(self._partial)
            self.active, self._partial = False, ""
        self.stream.flush()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _significant(value: float) -> float:
    return float(f"{value:.4g}")


class Task:
    """One task being reported: units done of a total. Made by `task()`; safe to advance
    from several threads."""

    def __init__(self, kind: str, desc: str, *, total: Optional[int], unit: str, initial: int = 0):
        if (total is not None and total < 0) or initial < 0:
            raise ValueError(f"a task needs total >= 0 (or None) and initial >= 0; got total={total}, initial={initial}")
        self.kind, self.desc, self.total, self.unit = kind, desc, total, unit
        self.initial = self.done = initial
        self.mode, self._interval = _settings["mode"], _settings["interval"]
        self._stream = _settings["stream"]
        self._start = self._last = time.monotonic()
        self._lock = threading.Lock()
        self._closed = False
        self._bar = None
        if self.mode == "bar":
            from tqdm.auto import tqdm

            # leave=None: a bar opened under another (a dataset's under its campaign's) goes when done
            self._bar = tqdm(total=total, initial=initial, unit=unit, desc=desc, file=self._stream or sys.stderr, leave=None)
        self._emit("start")

    def advance(self, n: int = 1) -> None:
        """n more units done."""
        with self._lock:
            self.done += n
            if self._bar is not None:
                self._bar.update(n)
            now = time.monotonic()
            if now - self._last >= self._interval or self.done == self.total:
                self._last = now
                self._emit("progress")

    def close(self, *, ok: bool = True) -> None:
        """End the task (a second close does nothing); `ok=False`: it stopped on an error."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._bar is not None:
                self._bar.close()
            self._emit("end", ok=ok)

    def __enter__(self) -> Task:
        return self

    def __exit__(self, kind: Any, error: Any, traceback: Any) -> None:
        self.close(ok=kind is None)

    def event(self, name: str) -> dict:
        """The JSON event `name` ("start", "progress", "end") would write now."""
        elapsed = time.monotonic() - self._start
        rate = (self.done - self.initial) / elapsed if elapsed > 0 and self.done > self.initial else None
        left = None if self.total is None else max(self.total - self.done, 0)
        eta = 0.0 if left == 0 else (round(left / rate, 1) if rate and left is not None else None)
        return {
            "event": name, "task": self.kind, "desc": self.desc, "done": self.done, "total": self.total, "unit": self.unit,
            "rate": None if rate is None else _significant(rate), "eta_s": eta, "elapsed_s": round(elapsed, 3), "time": _now(),
        }

    def _emit(self, name: str, **extra: Any) -> None:
        if self.mode != "json":
            return
        stream = self._stream or sys.stderr
        stream.write(json.dumps({**self.event(name), **extra}) + "\n")
        stream.flush()
