"""After a campaign's last unit: summary.json, summary.md, summary.html (the run's metadata and
each grid as an interactive heatmap, shardlens.tables.views) and (with output.plots)
plots/<experiment>.png, from the dataset as it is on disk."""

from __future__ import annotations

import json
import warnings
from html import escape
from pathlib import Path
from urllib.parse import quote

import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.parquet as pq
import torch

from shardlens.tables.views import Heatmap, View, page
from shardlens.tracer.campaign import activations, top_contexts
from shardlens.tracer.campaign.schema import Campaign
from shardlens.tracer.cells import column_labels
from shardlens.version import __version__


def summarize(campaign: Campaign, out: Path, n_units: int, ran: int, seconds: float) -> dict:
    """Write summary.json, summary.md, summary.html and plots from the dataset as it is on disk."""
    experiments = {}
    for experiment in campaign.experiments:
        directory = out / experiment["name"]
        if experiment["kind"] == "extract":
            hooks = sorted(p.name.removeprefix("hook=") for p in directory.glob("hook=*"))
            experiments[experiment["name"]] = {"kind": "extract", "hooks": hooks}
            continue
        if experiment["kind"] == "top_contexts":
            experiments[experiment["name"]] = top_contexts.summary(experiment, directory)
            continue
        if experiment["kind"] == "activations":
            experiments[experiment["name"]] = activations.summary(experiment, directory)
            continue
        grid, points, columns = experiment_grid(experiment["kind"], directory)
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
        elif info["kind"] == "activations":
            lines.append(f"- **{name}** (activations): {info['rows']} token rows of {len(info['hooks'])} hook points in {info['shards']} shards ({info['dtype']})")
        elif info["kind"] == "top_contexts":
            lines.append(f"- **{name}** (top_contexts): {info['contexts']} contexts of {info['features']} features at {len(info['hooks'])} hook points")
        else:
            top = info["top"]
            lines.append(f"- **{name}** ({info['kind']}): largest |value| {top['value']:.4g} at {top['point']}, "
                         f"{next(c for c in ('feature', 'head', 'pos') if c in top)} {top.get('feature', top.get('head', top.get('pos')))}")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    try:
        html_report(campaign, out, summary).save(out / "summary.html")
    except Exception as error:  # noqa: BLE001  the campaign's results and summaries are written: a page is no reason to fail it
        warnings.warn(f"{out / 'summary.html'} was not written ({type(error).__name__}: {error}); summary.md and summary.json were",
                      RuntimeWarning, stacklevel=2)
    return summary


def experiment_grid(kind: str, directory: Path) -> tuple[torch.Tensor, list[str], str]:
    """A sweep, atp or ig experiment's grid from its parts: (the mean over batches of each
    cell [point, column], the points, what the columns are: "pos", "head" or "feature"); for
    a sweep the patching effect, patched metric - corrupted metric."""
    parts = sorted(directory.glob("part-*.parquet"))
    if not parts:
        raise ValueError(f"{directory} holds no part-*.parquet of a {kind} experiment")
    table = pq.read_table(parts)
    if kind == "sweep":
        effect = pa.compute.subtract(table.column("value"), table.column("baseline"))
        table = table.set_column(table.column_names.index("value"), "value", effect)
    return _mean_grid(table)


def grid_heatmap(name: str, kind: str, grid: torch.Tensor, points: list[str], columns: str) -> Heatmap:
    """An experiment's grid as the views draw it: a row per point, a column per position, head or feature."""
    what = {"sweep": "patching effect (patched - corrupted metric)", "atp": "attribution", "ig": "attribution"}.get(
        kind, "values as written (the experiment's kind is unknown: no campaign.json beside it)")
    return Heatmap(grid, points, column_labels(columns, grid.shape[1]), title=f"{name}: {what}, mean over batches", row_title="hook point", col_title=columns)


def html_report(campaign: Campaign, out: Path, summary: dict) -> View:
    """summary.html: the run's metadata, each sweep / attribution grid as a heatmap, a line for
    the other kinds, and relative links to each experiment's dataset and the summaries."""
    parts: list = [_metadata(campaign, out, summary),
                   '<p>Summaries: <a href="summary.md">summary.md</a> · <a href="summary.json">summary.json</a></p>']
    for experiment in campaign.experiments:
        name, info = experiment["name"], summary["experiments"][experiment["name"]]
        link = f'<a href="./{escape(quote(name))}/">{escape(name)}/</a>'  # "./": a name never reads as another host
        parts.append(f"<h2>{escape(name)} <small>({escape(info['kind'])}, dataset {link})</small></h2>")
        if "grid" in info:
            columns = next(c for c in ("feature", "head", "pos") if c in info["top"])
            parts.append(grid_heatmap(name, info["kind"], torch.tensor(info["grid"], dtype=torch.float64), info["points"], columns))
        else:
            parts.append(f"<p>{escape(_line(info))}</p>")
    return page(f"campaign {campaign.name}", parts)


def _line(info: dict) -> str:
    if info["kind"] == "extract":
        return f"{len(info['hooks'])} hook points: {', '.join(info['hooks'])}"
    if info["kind"] == "activations":
        return f"{info['rows']} token rows of {len(info['hooks'])} hook points in {info['shards']} shards ({info['dtype']})"
    return f"{info['contexts']} contexts of {info['features']} features at {len(info['hooks'])} hook points"


def _metadata(campaign: Campaign, out: Path, summary: dict) -> str:
    """The run's metadata as an HTML table: model, plan, versions, time, units (per experiment with its seconds per unit)."""
    import transformers

    from shardlens.tracer.campaign.status import status

    cluster = campaign.cluster
    plan = (f"backend {cluster.get('backend', 'ray')}, {cluster.get('stages', 1)} stages, {cluster.get('replicas', 1)} replicas"
            + (f", max_memory {cluster['max_memory']}" if cluster.get("max_memory") else ""))
    rows = [("model", f"{campaign.model_source}" + (f" ({campaign.model['dtype']})" if "dtype" in campaign.model else "")),
            ("plan", plan),
            ("dictionaries", ", ".join(d.get("point", d["path"]) for d in campaign.dictionaries) or "none"),
            ("data", f"{campaign.data.get('path')} (batch size {campaign.data.get('batch_size', 16)})"),
            ("metric", campaign.metric.get("kind", "logit_diff")),
            ("versions", f"shardlens {__version__}, torch {torch.__version__}, transformers {transformers.__version__}, pyarrow {pa.__version__}"),
            ("time", f"{summary['seconds']} s this run"),
            ("units", f"{summary['units_run_now']} run now of {summary['units']}")]
    for experiment in status(out).experiments:
        rate = "" if experiment.seconds_per_unit is None else f", {experiment.seconds_per_unit:.3g} s per unit"
        rows.append((f"· {experiment.name}", f"{experiment.kind}: {experiment.done} of {experiment.total} units done{rate}"))
    cells = "".join(f"<tr><td>{escape(k)}</td><td>{escape(str(v))}</td></tr>" for k, v in rows)
    return f'<table class="sl-meta">{cells}</table>'


def _mean_grid(table: pa.Table) -> tuple[torch.Tensor, list[str], str]:
    columns = next(c for c in ("feature", "head", "pos") if c in table.column_names and table.column(c).null_count == 0)
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
