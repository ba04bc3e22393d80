"""Running a campaign as resumable work units.

A work unit is one (experiment, data batch). Its result is written as Parquet parts with
deterministic names under a hidden temporary name, synced to disk and renamed when
complete. A sweep, atp, ig or top_contexts unit writes one part from the driver, and is
finished once that part exists (top_contexts.parquet is then merged from the parts; a run
first refuses top_contexts parts of other settings). An extract unit's activations do not
pass through the driver where the workers share the output folder with it: they write
them (Tracer.write_cache); otherwise the driver gathers and writes them. The unit is finished once its marker
`<experiment>/_done/b<batch>.json` (listing its parts) exists; a rerun first removes what
an interrupted run of the unit left. An activations unit hands its token rows to its
experiment's dataset writer, and is finished once its marker exists, written when the files
holding its rows are (see activations.py). So a campaign killed at any moment (or a machine that
crashed) and run again yields the dataset an uninterrupted run would.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import pyarrow as pa
import pyarrow.parquet as pq
import torch

import shardlens.progress
from shardlens.tables import ActivationCache, ParquetSink
from shardlens.tables.files import write_atomic
from shardlens.tracer import attribution, patching
from shardlens.tracer.campaign.data import batch_tensors, check_fields, load_rows
from shardlens.tracer.campaign.report import summarize
from shardlens.tracer.campaign.runner import batch_metric, spliced, start_tracer
from shardlens.tracer.campaign.schema import Campaign, load_campaign
from shardlens.tracer.campaign.status import record_start, unit_event
from shardlens.tracer.campaign import top_contexts
from shardlens.tracer.campaign.activations import ActivationDatasets
from shardlens.tracer.campaign.experiments import hook_points
from shardlens.tracer.campaign.verify import verify_before_run


@dataclass
class Unit:
    experiment: dict
    batch: int
    rows: list = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"part-b{self.batch:05d}"

    @property
    def part(self) -> str:
        return f"{self.name}.parquet"

    def marker(self, out: Path) -> Path:
        """The file whose existence says that this extract unit is finished."""
        return out / self.experiment["name"] / "_done" / f"b{self.batch:05d}.json"


def _unit_done(unit: Unit, out: Path) -> bool:
    if unit.experiment["kind"] in ("extract", "activations"):
        return unit.marker(out).exists()
    return (out / unit.experiment["name"] / unit.part).exists()


def _extract(unit: Unit, tracer: Any, campaign: Campaign, out: Path, *, hooks: Optional[list[str]], clean: torch.Tensor,
             workers_write: bool) -> None:
    """Write the unit's activations (from the workers when they share `out` with this
    process; else gathered here); then its marker says it is finished."""
    directory = out / unit.experiment["name"]
    # What an interrupted run of this unit left (parts named for another microbatch size
    # would not be replaced by this run's).
    for leftover in [*directory.glob(f"hook=*/{unit.part}"), *directory.glob(f"hook=*/{unit.name}-*.parquet")]:
        leftover.unlink()
    layout = unit.experiment.get("layout", "example")
    examples = torch.arange(len(unit.rows)) + unit.batch * campaign.data.get("batch_size", 16)
    metadata = {"campaign": campaign.name, "experiment": unit.experiment["name"]}
    if workers_write:
        _, parts = tracer.write_cache(
            clean, directory, names_filter=hooks, layout=layout, return_type=None, examples=examples, batch=unit.batch,
            name=unit.name, metadata=metadata,
        )
    else:
        _, cache = tracer.run_with_cache(clean, names_filter=hooks, return_type=None)
        with ParquetSink(directory, layout=layout, metadata=metadata) as sink:
            parts = sink.write(ActivationCache(dict(cache), examples=examples, batch=unit.batch), name=unit.name)
    listing = json.dumps(sorted(os.path.relpath(part, directory) for part in parts), indent=1)
    write_atomic(unit.marker(out), lambda temporary: temporary.write_text(listing))


def _run_unit(unit: Unit, tracer: Any, campaign: Campaign, out: Path, hooks: Optional[list[str]], workers_write: bool) -> None:
    experiment, tensors = unit.experiment, batch_tensors(campaign, unit.rows, tracer.tokenizer)
    directory = out / experiment["name"]
    kind = experiment["kind"]
    if kind == "extract":
        _extract(unit, tracer, campaign, out, hooks=hooks, clean=tensors["clean"], workers_write=workers_write)
        return
    if kind == "top_contexts":
        examples = torch.arange(len(unit.rows)) + unit.batch * campaign.data.get("batch_size", 16)
        top_contexts.run_unit(experiment, tracer, tensors["clean"], examples, directory / unit.part,
                              settings=top_contexts.part_settings(campaign, experiment), write_atomic=write_atomic)
        return
    metric = batch_metric(campaign, tensors)
    over = tuple(experiment.get("over", ["layer", "pos"]))
    common = dict(points=experiment["points"], metric=metric, over=over)
    if experiment.get("positions") is not None:
        common["positions"] = experiment["positions"]
    if kind == "sweep":
        result = patching.sweep(tracer, tensors["clean"], tensors["corrupt"], **common)
    elif kind == "atp":
        result = attribution.atp(tracer, tensors["clean"], tensors["corrupt"], **common)
    else:
        common.pop("positions", None)
        result = attribution.integrated_gradients(tracer, tensors["clean"], tensors["corrupt"], steps=experiment.get("steps", 16), **common)
    table = result.table
    table = table.append_column("batch", pa.array([unit.batch] * table.num_rows, pa.int32()))
    table = table.append_column("baseline", pa.array([result.baseline] * table.num_rows, pa.float64()))
    write_atomic(directory / unit.part, lambda temporary: pq.write_table(table, temporary, compression="zstd"))


class _ExtractWrites:
    """A "write" task (shardlens.progress) per extract experiment: the examples whose
    activations its units run now have written, from its first such unit to its last."""

    def __init__(self, units: list[Unit], todo: list[Unit]):
        self._total: Counter = Counter()
        self._left: Counter = Counter()
        for unit in (u for u in units if u.experiment["kind"] == "extract"):
            self._total[unit.experiment["name"]] += len(unit.rows)
        for unit in (u for u in todo if u.experiment["kind"] == "extract"):
            self._left[unit.experiment["name"]] += len(unit.rows)
        self._tasks: dict[str, shardlens.progress.Task] = {}

    @contextmanager
    def unit(self, unit: Unit) -> Iterator[None]:
        """Report the unit run inside the block once it has written its activations."""
        name = unit.experiment["name"]
        if unit.experiment["kind"] != "extract":
            yield
            return
        if name not in self._tasks:
            total = self._total[name]
            self._tasks[name] = shardlens.progress.task("write", f"{name}: activations", total=total, unit="example",
                                                        initial=total - self._left[name])
        yield
        self._tasks[name].advance(len(unit.rows))
        self._left[name] -= len(unit.rows)
        if not self._left[name]:
            self._tasks.pop(name).close()

    def abort(self) -> None:
        """End the tasks of experiments with units left (a unit failed)."""
        for task in self._tasks.values():
            task.close(ok=False)
        self._tasks.clear()


def run_campaign(path: os.PathLike, *, progress: bool = True, runner: Any = None) -> dict:
    """Run (or resume) a campaign; returns its summary.

    Its work units, the loading of its model's stages and the writing of its datasets are
    reported as tasks of shardlens.progress, in its mode (a bar each by default).

    Args:
        progress: False: report none of them, and print no verify table.
        runner: run the experiments on this runner (a HookedModel, or a Tracer you started),
            left running, instead of starting the campaign's model and cluster.
    """
    with nullcontext() if progress else shardlens.progress.using("quiet"):
        return _run_campaign(path, progress=progress, runner=runner)


def _run_campaign(path: os.PathLike, *, progress: bool, runner: Any) -> dict:
    campaign = load_campaign(path)
    rows = load_rows(campaign)
    check_fields(campaign, rows)
    batch_size = campaign.data.get("batch_size", 16)
    batches = [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]
    out = campaign.output_path
    out.mkdir(parents=True, exist_ok=True)
    record_start(out, campaign.name, {e["name"]: (e["kind"], len(batches)) for e in campaign.experiments},  # for `shardlens status`
                 model=campaign.model_source)
    with ExitStack() as cleanup:  # on the way out, also after a failure: in reverse order
        tracer = runner if runner is not None else start_tracer(campaign)
        if runner is None:
            cleanup.callback(tracer.shutdown)
        cleanup.enter_context(spliced(campaign, tracer))  # before the hook names are read: a splice makes points
        extract_hooks = {e["name"]: hook_points(e, tracer.hook_names()) for e in campaign.experiments if e["kind"] == "extract"}
        for experiment in (e for e in campaign.experiments if e["kind"] == "top_contexts"):
            top_contexts.check_parts(campaign, experiment, out / experiment["name"])  # before any unit adds to its parts
        activations = ActivationDatasets(campaign, out, batches, tracer)  # before todo: it marks the batches its datasets hold
        cleanup.callback(activations.abort)  # after a failure: keeps the finished files (nothing to do after close)
        units = [Unit(e, b, batch) for e in campaign.experiments for b, batch in enumerate(batches)]
        todo = [u for u in units if not _unit_done(u, out)]
        # Workers on other machines write extract parts only through a filesystem they share with this one.
        workers_write = bool(extract_hooks) and tracer.shares(out)
        if campaign.verify is not None and todo:
            verify_before_run(campaign, tracer, out, progress=progress)  # raises VerificationError: no unit runs
        start = time.perf_counter()
        writes = _ExtractWrites(units, todo)
        cleanup.callback(writes.abort)
        with shardlens.progress.task("campaign", campaign.name, total=len(units), unit="unit", initial=len(units) - len(todo)) as task:
            for unit in todo:
                with unit_event(out, unit.experiment["name"], unit.batch), writes.unit(unit):  # recorded, failures too; errors go on
                    if unit.experiment["kind"] == "activations":
                        activations.run(unit.experiment, unit.batch, tracer)
                    else:
                        _run_unit(unit, tracer, campaign, out, extract_hooks.get(unit.experiment["name"]), workers_write)
                task.advance()
            activations.close()
        for experiment in (e for e in campaign.experiments if e["kind"] == "top_contexts"):  # from all the parts, every run
            top_contexts.finish(experiment, out / experiment["name"], top_contexts.prompt_tokens(campaign, batches, tracer.tokenizer), write_atomic)
    summary = summarize(campaign, out, len(units), len(todo), time.perf_counter() - start)
    return summary
