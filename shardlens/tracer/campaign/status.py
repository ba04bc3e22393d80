"""Where a campaign stands, read from its output folder alone.

A run leaves two records beside its results: `campaign.json` (the campaign's name and, per
experiment, its kind and number of work units; written when a run starts) and
`events.jsonl` (one JSON line per run started, verification, and unit finished or failed,
appended as they happen). `status` reads them and the finished units' parts and markers,
and nothing else, so it works from any machine that sees the folder, while the campaign
runs or after. Whether a unit is finished is decided as a rerun decides it (its part, or
for extract units its marker, exists); the events only add times and errors.

Example:
    >>> print(status("results/induction").describe())
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

RECORD = "campaign.json"
EVENTS = "events.jsonl"
SUMMARY = "summary.json"
_PART = re.compile(r"part-b(\d+)\.parquet")
_MARKER = re.compile(r"b(\d+)\.json")


# ---------------------------------------------------------------------- writing (run_campaign)

def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def append_event(out: Path, event: str, **fields: Any) -> None:
    """Append one event line to out/events.jsonl. Records only: not synced to disk, as the
    results are; a line lost in a crash costs a time, never a result."""
    line = json.dumps({"event": event, "time": _now(), **fields})
    with open(out / EVENTS, "a") as log:
        log.write(line + "\n")


def record_start(out: Path, name: str, experiments: dict[str, tuple[str, int]], *, model: str) -> None:
    """Write out/campaign.json (the name, the model source as resolved from the campaign file's
    folder, experiment name -> (kind, units)) and a "run" event."""
    record = {"name": name, "model": model, "experiments": {e: {"kind": kind, "units": units} for e, (kind, units) in experiments.items()}}
    temporary = out / f".{RECORD}.tmp"
    temporary.write_text(json.dumps(record, indent=1))
    os.replace(temporary, out / RECORD)
    append_event(out, "run", host=socket.gethostname(), pid=os.getpid())


@contextmanager
def unit_event(out: Path, experiment: str, batch: int) -> Iterator[None]:
    """Record the unit run inside the block: "done" with its seconds, or "failed" with the
    error's type and message (the error itself goes on)."""
    start = time.perf_counter()
    try:
        yield
    except Exception as error:
        with suppress(OSError):  # a record that cannot be written must not hide the error
            append_event(out, "failed", experiment=experiment, batch=batch, seconds=round(time.perf_counter() - start, 3),
                         error=type(error).__name__, message=str(error).strip())
        raise
    append_event(out, "done", experiment=experiment, batch=batch, seconds=round(time.perf_counter() - start, 3))


# ---------------------------------------------------------------------- reading

@dataclass(frozen=True)
class ExperimentStatus:
    """One experiment's work units: done (their parts or markers exist), of total (None
    where the folder has no campaign.json), and the mean seconds of a unit (None: no times)."""

    name: str
    kind: Optional[str]
    done: int
    total: Optional[int]
    seconds_per_unit: Optional[float] = None

    @property
    def left(self) -> Optional[int]:
        return None if self.total is None else max(self.total - self.done, 0)


@dataclass(frozen=True)
class UnitFailure:
    """A unit whose last run failed and that is not finished since."""

    experiment: str
    batch: int
    error: str
    message: str
    time: str


@dataclass(frozen=True)
class CampaignStatus:
    """A campaign's progress as its output folder shows it.

    Attributes:
        rate: units per second of work, over the units with recorded times.
        eta_seconds: each experiment's units left times its mean seconds per unit (the
            overall mean where it has none).
        finished: summary.json exists and no unit is left.
        state: "finished"; "failed" (the last event is a unit that failed and is not
            finished since, or a verification that failed); else "unfinished" (running, or
            stopped: files cannot tell which).
        verification: the last check of the cluster against one process ("ok at <time>:
            ..." or "failed at <time>: ..."), where a run made one.
        unknown: what the folder does not say (older runs left no records).
    """

    path: str
    name: Optional[str]
    experiments: tuple
    failures: tuple
    rate: Optional[float]
    eta_seconds: Optional[float]
    finished: bool
    state: str
    started: Optional[str]
    last_event: Optional[str]
    verification: Optional[str]
    unknown: tuple

    @property
    def done(self) -> int:
        return sum(e.done for e in self.experiments)

    @property
    def left(self) -> Optional[int]:
        lefts = [e.left for e in self.experiments]
        return None if None in lefts else sum(lefts)

    def to_dict(self) -> dict:
        data = asdict(self)
        data.update(done=self.done, left=self.left)
        for experiment, given in zip(data["experiments"], self.experiments):
            experiment["left"] = given.left
        return data

    def describe(self) -> str:
        """A few lines: the state and counts, a table per experiment, failures, notes."""
        lines = [self._headline()]
        width = max([len("experiment"), *(len(e.name) for e in self.experiments)])
        kinds = max([8, *(len(e.kind or "?") for e in self.experiments)])
        lines.append(f"  {'experiment':<{width}}  {'kind':<{kinds}} {'done':>6} {'left':>6}  {'s/unit':>7}")
        for e in self.experiments:
            per_unit = "-" if e.seconds_per_unit is None else f"{e.seconds_per_unit:.3g}"
            lines.append(f"  {e.name:<{width}}  {e.kind or '?':<{kinds}} {e.done:>6} {'?' if e.left is None else e.left:>6}  {per_unit:>7}")
        if self.verification:
            lines.append(f"verify: {self.verification}")
        for f in self.failures:
            lines.append(f"failed: {f.experiment} batch {f.batch} at {f.time}: {f.error}: {f.message}")
        lines.extend(f"unknown: {note}" for note in self.unknown)
        return "\n".join(lines)

    def _headline(self) -> str:
        total = "?" if self.left is None else str(self.done + self.left)
        text = f"{self.name or self.path}: {self.state}, {self.done} of {total} units done"
        if self.rate is not None:
            text += f", {self.rate:.3g} units/s"
        if self.eta_seconds is not None and not self.finished:
            text += f", about {_duration(self.eta_seconds)} left"
        if self.last_event is not None:
            text += f"; last event {self.last_event}"
        return text


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours} h {rest // 60} min" if hours else f"{rest // 60} min {rest % 60} s" if rest >= 60 else f"{rest} s"


def status(path: os.PathLike) -> CampaignStatus:
    """Read a campaign's progress from its output folder (see the module docstring)."""
    out = Path(path)
    if not out.is_dir():
        raise FileNotFoundError(f"no campaign output folder at {out} (give output.path of the campaign file)")
    record, events, unknown = _read(out)
    kinds = {name: info.get("kind") for name, info in record.get("experiments", {}).items()}
    totals = {name: info.get("units") for name, info in record.get("experiments", {}).items()}
    names = list(kinds) or _found_experiments(out)
    batches = {name: _finished(out / name, kinds.get(name)) for name in names}
    times = _unit_seconds(events)
    experiments = tuple(
        ExperimentStatus(name, kinds.get(name) or ("extract" if (out / name / "_done").is_dir() else None), len(batches[name]),
                         totals.get(name), _mean(times.get(name)))
        for name in names
    )
    every = [s for seconds in times.values() for s in seconds]
    rate = len(every) / sum(every) if every and sum(every) > 0 else None
    complete = (out / SUMMARY).exists() and not any(e.left for e in experiments)
    last = events[-1] if events else {"event": None}
    failed = (last["event"] == "failed" and last["batch"] not in batches.get(last["experiment"], set())
              or last["event"] == "verify" and not last["ok"])
    return CampaignStatus(
        path=str(out), name=record.get("name"), experiments=experiments, failures=_failures(events, batches), rate=rate,
        eta_seconds=_eta(experiments, _mean(every)), finished=complete,
        state="finished" if complete else "failed" if failed else "unfinished",
        started=next((e["time"] for e in reversed(events) if e["event"] == "run"), None),
        last_event=events[-1]["time"] if events else None, verification=_verification(events), unknown=tuple(unknown),
    )


def _read(out: Path) -> tuple[dict, list[dict], list[str]]:
    """campaign.json, the events, and notes on what is missing."""
    unknown = []
    record = {}
    if (out / RECORD).exists():
        record = json.loads((out / RECORD).read_text())
    else:
        unknown.append(f"no {RECORD} (a run before shardlens recorded one): the experiments' kinds and numbers of units, so what is left, are unknown")
    events = []
    if (out / EVENTS).exists():
        for line in (out / EVENTS).read_text().splitlines():
            try:
                events.append(json.loads(line))
            except ValueError:
                continue  # a line being written now, or cut by a crash
    else:
        unknown.append(f"no {EVENTS}: times, rate, time left and failures are unknown")
    return record, events, unknown


def _found_experiments(out: Path) -> list[str]:
    """Without campaign.json: the folders that hold units' parts or markers."""
    return sorted(p.name for p in out.iterdir() if p.is_dir() and (any(p.glob("part-b*.parquet")) or (p / "_done").is_dir()))


def _finished(directory: Path, kind: Optional[str]) -> set[int]:
    """The batches of an experiment's finished units: markers for extract units (their parts
    may be an interrupted run's), parts for the others."""
    if kind in ("extract", "activations") or (kind is None and (directory / "_done").is_dir()):
        pattern, files = _MARKER, (directory / "_done").glob("b*.json")
    else:
        pattern, files = _PART, directory.glob("part-b*.parquet")
    return {int(m.group(1)) for m in (pattern.fullmatch(f.name) for f in files) if m}


def _unit_seconds(events: list[dict]) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {}
    for event in events:
        if event["event"] == "done":
            times.setdefault(event["experiment"], []).append(float(event["seconds"]))
    return times


def _mean(values: Optional[list[float]]) -> Optional[float]:
    return sum(values) / len(values) if values else None


def _failures(events: list[dict], finished: dict[str, set[int]]) -> tuple:
    """The last failure of each unit that is not finished since, in the order they happened."""
    last: dict[tuple[str, int], dict] = {}
    for event in events:
        if event["event"] == "failed":
            last.pop((event["experiment"], event["batch"]), None)
            last[(event["experiment"], event["batch"])] = event
    return tuple(
        UnitFailure(e["experiment"], e["batch"], e["error"], e["message"], e["time"])
        for (experiment, batch), e in last.items() if batch not in finished.get(experiment, set())
    )


def _eta(experiments: tuple, overall: Optional[float]) -> Optional[float]:
    if overall is None or any(e.left is None for e in experiments):
        return None
    return sum(e.left * (e.seconds_per_unit or overall) for e in experiments)


def _verification(events: list[dict]) -> Optional[str]:
    checks = [e for e in events if e["event"] == "verify"]
    if not checks:
        return None
    last = checks[-1]
    return f"{'ok' if last['ok'] else 'failed'} at {last['time']}: {last['message']}"
