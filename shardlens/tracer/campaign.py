"""Campaigns: a YAML file of experiments over prompt data, run as resumable work units.

A work unit is one (experiment, data batch). Its result is written as Parquet parts with
deterministic names under a hidden temporary name, synced to disk and renamed when
complete. A sweep, atp or ig unit writes one part from the driver, and is finished once
that part exists. An extract unit's activations do not pass through the driver where the
workers share the output folder with it: they write them (Tracer.write_cache); otherwise
the driver gathers and writes them. The unit is finished once its marker
`<experiment>/_done/b<batch>.json` (listing its parts) exists; a rerun first removes what
an interrupted run of the unit left. So a campaign killed at any moment (or a machine that
crashed) and run again yields the dataset an uninterrupted run would. After the last
unit: summary.json, summary.md and (with output.plots) plots/<experiment>.png. The schema
is in the README.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.parquet as pq
import torch
import yaml

from shardlens.tables.parquet import flush_to_disk

SCHEMA: dict[str, dict[str, Any]] = {
    "": {"name": str, "model": dict, "cluster": dict, "data": dict, "metric": dict, "experiments": list, "output": dict, "schedule": str},
    "model": {"source": str, "dtype": str},
    "cluster": {"backend": str, "address": (str, type(None)), "stages": int, "replicas": int, "microbatch_size": (int, type(None)), "max_memory": (dict, type(None)),
                "stage_resources": (list, type(None))},
    "data": {"path": str, "clean": str, "corrupt": str, "answer": str, "wrong": str, "batch_size": int, "limit": (int, type(None))},
    "metric": {"kind": str},
    "experiment": {"name": str, "kind": str, "points": (str, list), "over": list, "steps": int, "layout": str, "positions": list},
    "output": {"path": str, "plots": bool},
}
REQUIRED = {"": ("name", "model", "data", "experiments", "output"), "model": ("source",), "data": ("path",),
            "experiment": ("name", "kind", "points"), "output": ("path",)}
CHOICES = {("model", "dtype"): ("float32", "bfloat16", "float16"), ("cluster", "backend"): ("ray", "local"),
           ("metric", "kind"): ("logit_diff", "prob", "log_prob", "loss"), ("experiment", "kind"): ("sweep", "atp", "ig", "extract"),
           ("experiment", "layout"): ("example", "token")}


class CampaignError(ValueError):
    """A campaign file that breaks the schema: names the file, the line and the key."""


class _Loader(yaml.SafeLoader):
    """A YAML loader whose mappings remember the line of each key."""


class _Lines(dict):
    lines: dict


def _mapping(loader: _Loader, node: yaml.MappingNode) -> _Lines:
    result = _Lines(loader.construct_mapping(node, deep=True))
    result.lines = {k.value: k.start_mark.line + 1 for k, _ in node.value}
    result.line = node.start_mark.line + 1
    return result


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


@dataclass(frozen=True)
class Campaign:
    """A parsed, validated campaign file."""

    path: Path
    name: str
    model: dict
    cluster: dict
    data: dict
    metric: dict
    experiments: tuple
    output: dict
    schedule: Optional[str] = None

    @property
    def output_path(self) -> Path:
        out = Path(self.output["path"])
        return out if out.is_absolute() else self.path.parent / out

    @property
    def data_path(self) -> Path:
        data = Path(self.data["path"])
        return data if data.is_absolute() else self.path.parent / data


def _check(section: str, values: Any, file: str, line: int) -> None:
    where = f"{file}:{line}"
    if not isinstance(values, dict):
        raise CampaignError(f"{where}: {section or 'the campaign'} must be a mapping")
    lines = getattr(values, "lines", {})
    for key, value in values.items():
        at = f"{file}:{lines.get(key, line)}"
        if key not in SCHEMA[section]:
            raise CampaignError(f"{at}: unknown key {key!r} in {section or 'the campaign'}; known: {', '.join(SCHEMA[section])}")
        expected = SCHEMA[section][key]
        if not isinstance(value, expected) or (isinstance(value, bool) and expected is int):
            names = " or ".join(t.__name__ for t in (expected if isinstance(expected, tuple) else (expected,)))
            raise CampaignError(f"{at}: {section + '.' if section else ''}{key} must be {names}; got {value!r}")
        choices = CHOICES.get((section, key))
        if choices and value not in choices:
            raise CampaignError(f"{at}: {section}.{key} must be one of {', '.join(choices)}; got {value!r}")
    for key in REQUIRED.get(section, ()):
        if key not in values:
            raise CampaignError(f"{where}: {section or 'the campaign'} lacks {key!r}")


def load_campaign(path: os.PathLike) -> Campaign:
    """Parse and validate a campaign file; errors name the line."""
    path = Path(path)
    try:
        raw = yaml.load(path.read_text(), Loader=_Loader)
    except yaml.YAMLError as error:
        raise CampaignError(f"{path}: not valid YAML: {error}") from None
    except OSError as error:
        raise CampaignError(f"{path}: cannot read: {error.strerror}") from None
    file = str(path)
    _check("", raw, file, 1)
    for section in ("model", "cluster", "data", "metric", "output"):
        if section in raw:
            _check(section, raw[section], file, raw.lines[section])
    names = set()
    for experiment in raw["experiments"]:
        _check("experiment", experiment, file, getattr(experiment, "line", raw.lines["experiments"]))
        if experiment["name"] in names:
            raise CampaignError(f"{file}:{experiment.line}: two experiments are named {experiment['name']!r}")
        names.add(experiment["name"])
    return Campaign(
        path=path, name=raw["name"], model=dict(raw["model"]), cluster=dict(raw.get("cluster", {})), data=dict(raw["data"]),
        metric=dict(raw.get("metric", {"kind": "logit_diff"})), experiments=tuple(dict(e) for e in raw["experiments"]),
        output=dict(raw["output"]), schedule=raw.get("schedule"),
    )


# ---------------------------------------------------------------- data


def load_rows(campaign: Campaign) -> list[dict]:
    path = campaign.data_path
    if not path.exists():
        raise CampaignError(f"{campaign.path}: data.path {path} does not exist")
    if path.suffix == ".parquet":
        rows = pq.read_table(path).to_pylist()
    else:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    limit = campaign.data.get("limit")
    return rows[:limit] if limit else rows


def _ids(value: Any, tokenizer: Any, what: str) -> list[int]:
    if isinstance(value, str):
        if tokenizer is None:
            raise CampaignError(f"{what} is text but the model has no tokenizer: give token ids")
        return tokenizer(value, add_special_tokens=False)["input_ids"]
    if isinstance(value, int):
        return [value]
    return list(value)


def batch_tensors(campaign: Campaign, rows: list[dict], tokenizer: Any) -> dict[str, torch.Tensor]:
    """Token ids of one data batch: clean, corrupt [batch, pos], answer and wrong [batch]."""
    column = lambda key: campaign.data.get(key, key)  # noqa: E731
    out: dict[str, Any] = {}
    for key in ("clean", "corrupt"):
        if column(key) in rows[0]:
            ids = [_ids(r[column(key)], tokenizer, key) for r in rows]
            if len({len(i) for i in ids}) != 1:
                raise CampaignError(f"{campaign.path}: the {key} prompts of a batch must have the same length in tokens")
            out[key] = torch.tensor(ids)
    for key in ("answer", "wrong"):
        if column(key) in rows[0]:
            out[key] = [_ids(r[column(key)], tokenizer, key)[0] for r in rows]
    return out


def check_fields(campaign: Campaign, rows: list[dict]) -> None:
    """Refuse data that lacks a field the experiments need, before any work."""
    if not rows:
        raise CampaignError(f"{campaign.path}: data.path {campaign.data_path} holds no rows")
    needed = {"clean"}
    if any(e["kind"] != "extract" for e in campaign.experiments):
        needed |= {"corrupt"} | {"logit_diff": {"answer", "wrong"}, "prob": {"answer"}, "log_prob": {"answer"}}.get(campaign.metric.get("kind", "logit_diff"), set())
    for key in sorted(needed):
        name = campaign.data.get(key, key)
        if name not in rows[0]:
            raise CampaignError(f"{campaign.path}: the rows of {campaign.data_path.name} have no field {name!r} (data.{key}); they have {sorted(rows[0])}")


# ---------------------------------------------------------------- running


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


def _write_atomic(path: Path, write: Callable[[Path], Any]) -> None:
    """`write` a file under a hidden temporary name, sync it, then rename it to `path`:
    a file that exists counts as done when a campaign resumes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.parent / f".{path.name}.tmp"
    write(temporary)
    flush_to_disk(temporary)
    os.replace(temporary, path)


def _metric(campaign: Campaign, tensors: dict) -> Any:
    import shardlens as sl

    kind = campaign.metric.get("kind", "logit_diff")
    if kind == "logit_diff":
        return sl.metrics.logit_diff(tensors["answer"], tensors["wrong"])
    if kind in ("prob", "log_prob"):
        return getattr(sl.metrics, kind)(tensors["answer"])
    return sl.metrics.loss()


def _unit_done(unit: Unit, out: Path) -> bool:
    if unit.experiment["kind"] == "extract":
        return unit.marker(out).exists()
    return (out / unit.experiment["name"] / unit.part).exists()


def _extract(unit: Unit, tracer: Any, campaign: Campaign, out: Path, hooks: Optional[list[str]], clean: torch.Tensor,
             workers_write: bool) -> None:
    """Write the unit's activations (from the workers when they share `out` with this
    process; else gathered here); then its marker says it is finished."""
    import shardlens as sl

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
        with sl.ParquetSink(directory, layout=layout, metadata=metadata) as sink:
            parts = sink.write(sl.ActivationCache(dict(cache), examples=examples, batch=unit.batch), name=unit.name)
    listing = json.dumps(sorted(os.path.relpath(part, directory) for part in parts), indent=1)
    _write_atomic(unit.marker(out), lambda temporary: temporary.write_text(listing))


def _run_unit(unit: Unit, tracer: Any, campaign: Campaign, out: Path, hooks: Optional[list[str]], workers_write: bool) -> None:
    import shardlens as sl

    experiment, tensors = unit.experiment, batch_tensors(campaign, unit.rows, tracer.tokenizer)
    directory = out / experiment["name"]
    kind = experiment["kind"]
    if kind == "extract":
        _extract(unit, tracer, campaign, out, hooks, tensors["clean"], workers_write)
        return
    metric = _metric(campaign, tensors)
    over = tuple(experiment.get("over", ["layer", "pos"]))
    common = dict(points=experiment["points"], metric=metric, over=over)
    if experiment.get("positions") is not None:
        common["positions"] = experiment["positions"]
    if kind == "sweep":
        result = sl.patching.sweep(tracer, tensors["clean"], tensors["corrupt"], **common)
    elif kind == "atp":
        result = sl.attribution.atp(tracer, tensors["clean"], tensors["corrupt"], **common)
    else:
        common.pop("positions", None)
        result = sl.attribution.integrated_gradients(tracer, tensors["clean"], tensors["corrupt"], steps=experiment.get("steps", 16), **common)
    table = result.table
    table = table.append_column("batch", pa.array([unit.batch] * table.num_rows, pa.int32()))
    table = table.append_column("baseline", pa.array([result.baseline] * table.num_rows, pa.float64()))
    _write_atomic(directory / unit.part, lambda temporary: pq.write_table(table, temporary, compression="zstd"))


def run_campaign(path: os.PathLike, *, progress: bool = True) -> dict:
    """Run (or resume) a campaign; returns its summary."""
    from tqdm.auto import tqdm

    import shardlens as sl
    from shardlens.hooks.names import names_predicate

    campaign = load_campaign(path)
    rows = load_rows(campaign)
    check_fields(campaign, rows)
    batch_size = campaign.data.get("batch_size", 16)
    batches = [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]
    out = campaign.output_path
    out.mkdir(parents=True, exist_ok=True)
    cluster = campaign.cluster
    tracer = sl.Tracer.from_pretrained(
        _source(campaign), stages=cluster.get("stages", 1), replicas=cluster.get("replicas", 1),
        backend=cluster.get("backend", "ray"), address=cluster.get("address"),
        dtype=getattr(torch, campaign.model["dtype"]) if "dtype" in campaign.model else None, max_memory=cluster.get("max_memory"),
        microbatch_size=cluster.get("microbatch_size"), stage_resources=cluster.get("stage_resources"),
    )
    try:
        extract_hooks = {}
        for experiment in campaign.experiments:
            if experiment["kind"] == "extract":
                selected = names_predicate(experiment["points"], tracer.hook_names())
                extract_hooks[experiment["name"]] = [n for n in tracer.hook_names() if selected(n)]
        units = [Unit(e, b, batch) for e in campaign.experiments for b, batch in enumerate(batches)]
        todo = [u for u in units if not _unit_done(u, out)]
        # Workers on other machines write extract parts only through a filesystem they share with this one.
        workers_write = bool(extract_hooks) and tracer.shares(out)
        start = time.perf_counter()
        with tqdm(total=len(units), initial=len(units) - len(todo), unit="unit", disable=not progress, desc=campaign.name) as bar:
            for unit in todo:
                _run_unit(unit, tracer, campaign, out, extract_hooks.get(unit.experiment["name"]), workers_write)
                bar.update(1)
    finally:
        tracer.shutdown()
    summary = summarize(campaign, out, len(units), len(todo), time.perf_counter() - start)
    return summary


def _source(campaign: Campaign) -> str:
    source = campaign.model["source"]
    local = campaign.path.parent / source
    return str(local) if not os.path.isabs(source) and local.exists() else source


def summarize(campaign: Campaign, out: Path, n_units: int, ran: int, seconds: float) -> dict:
    """Write summary.json, summary.md and plots from the dataset as it is on disk."""
    experiments = {}
    for experiment in campaign.experiments:
        directory = out / experiment["name"]
        if experiment["kind"] == "extract":
            hooks = sorted(p.name.removeprefix("hook=") for p in directory.glob("hook=*"))
            experiments[experiment["name"]] = {"kind": "extract", "hooks": hooks}
            continue
        table = pq.read_table(sorted(directory.glob("part-*.parquet")))
        if experiment["kind"] == "sweep":  # the patching effect: patched metric - corrupted metric
            effect = pa.compute.subtract(table.column("value"), table.column("baseline"))
            table = table.set_column(table.column_names.index("value"), "value", effect)
        grid, points, columns = _mean_grid(table)
        flat = int(grid.abs().argmax())
        top_point, top_column = points[flat // grid.shape[1]], flat % grid.shape[1]
        experiments[experiment["name"]] = {
            "kind": experiment["kind"], "points": points, "grid": grid.tolist(),
            "top": {"point": top_point, columns: top_column, "value": float(grid.flatten()[flat])},
        }
        if campaign.output.get("plots", True):
            _plot(grid, points, columns, experiment["name"], out / "plots" / f"{experiment['name']}.png")
    summary = {"name": campaign.name, "units": n_units, "units_run_now": ran, "seconds": round(seconds, 2), "experiments": experiments}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    lines = [f"# {campaign.name}", "", f"{n_units} work units ({ran} run now).", ""]
    for name, info in experiments.items():
        if info["kind"] == "extract":
            lines.append(f"- **{name}** (extract): {len(info['hooks'])} hook points")
        else:
            top = info["top"]
            lines.append(f"- **{name}** ({info['kind']}): largest |value| {top['value']:.4g} at {top['point']}, "
                         f"{'head' if 'head' in top else 'pos'} {top.get('head', top.get('pos'))}")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    return summary


def _mean_grid(table: pa.Table) -> tuple[torch.Tensor, list[str], str]:
    columns = "head" if table.column("head").null_count == 0 else "pos"
    points = list(dict.fromkeys(table.column("point").to_pylist()))
    index = table.column(columns).to_pylist()
    values = table.column("value").to_pylist()
    n_cols = max(index) + 1
    total = torch.zeros(len(points), n_cols, dtype=torch.float64)
    count = torch.zeros_like(total)
    for point, col, value in zip(table.column("point").to_pylist(), index, values):
        total[points.index(point), col] += value
        count[points.index(point), col] += 1
    return total / count.clamp(min=1), points, columns


def _plot(grid: torch.Tensor, points: list[str], columns: str, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    figure, axis = plt.subplots(figsize=(max(4, grid.shape[1] * 0.5), max(2.5, len(points) * 0.4)))
    limit = float(grid.abs().max()) or 1.0
    image = axis.imshow(grid.numpy(), cmap="RdBu", vmin=-limit, vmax=limit, aspect="auto")
    axis.set_yticks(range(len(points)), points, fontsize=7)
    axis.set_xlabel(columns)
    axis.set_title(title)
    figure.colorbar(image, ax=axis)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
