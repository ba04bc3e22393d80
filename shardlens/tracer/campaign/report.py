"""After a campaign's last unit: summary.json, summary.md and (with output.plots) plots/<experiment>.png,
from the dataset as it is on disk."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.parquet as pq
import torch

from shardlens.tracer.campaign import activations, top_contexts
from shardlens.tracer.campaign.schema import Campaign


def summarize(campaign: Campaign, out: Path, n_units: int, ran: int, seconds: float) -> dict:
    """Write summary.json, summary.md and plots from the dataset as it is on disk."""
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
        elif info["kind"] == "activations":
            lines.append(f"- **{name}** (activations): {info['rows']} token rows of {len(info['hooks'])} hook points in {info['shards']} shards ({info['dtype']})")
        elif info["kind"] == "top_contexts":
            lines.append(f"- **{name}** (top_contexts): {info['contexts']} contexts of {info['features']} features at {len(info['hooks'])} hook points")
        else:
            top = info["top"]
            lines.append(f"- **{name}** ({info['kind']}): largest |value| {top['value']:.4g} at {top['point']}, "
                         f"{next(c for c in ('feature', 'head', 'pos') if c in top)} {top.get('feature', top.get('head', top.get('pos')))}")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    return summary


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
