"""`shardlens demo`: find the induction heads of the shipped model, across two stages.

The shipped model (shardlens/data/induction, trained by examples/train_induction.py) is a
2-layer attention-only Llama that predicts the second copy of a repeated random sequence.
The demo runs it as a 2-stage Tracer, patches each head's clean output (hook_z) at the last
position into a run whose first copy was replaced (so nothing can be copied), and compares
with attribution patching; it writes the results as Parquet, the residual stream as a Parquet dataset, a
heatmap PNG, and the same two grids as an HTML page (hover a cell for its value).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

import torch

MODEL = Path(__file__).resolve().parents[1] / "data" / "induction"
HALF = 12


def induction_task(n: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[int], list[int]]:
    """Clean prompts A + A[:-1] (the next token is A[-1]) and corrupted ones B + A[:-1]."""
    generator = torch.Generator().manual_seed(seed)
    first = torch.randint(3, 64, (n, HALF), generator=generator)
    other = torch.randint(3, 64, (n, HALF), generator=generator)
    clean = torch.cat([first, first[:, :-1]], dim=1)
    corrupt = torch.cat([other, first[:, :-1]], dim=1)
    return clean, corrupt, first[:, -1].tolist(), other[:, -1].tolist()


def heatmap(grids: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(grids), figsize=(4.2 * len(grids), 3.2))
    for axis, (title, grid) in zip(axes, grids.items()):
        image = axis.imshow(grid.numpy(), cmap="RdBu", vmin=-grid.abs().max(), vmax=grid.abs().max())
        axis.set_title(title)
        axis.set_xlabel("head")
        axis.set_ylabel("layer")
        axis.set_xticks(range(grid.shape[1]))
        axis.set_yticks(range(grid.shape[0]))
        figure.colorbar(image, ax=axis)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def run(out: Path, *, backend: str = "ray", stages: int = 2, model: Optional[Path] = None) -> dict:
    """Run the demo; returns its summary (also written to out/summary.json)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from shardlens.hooks import metrics
    from shardlens.tables.views import Heatmap, page
    from shardlens.tracer import attribution, patching
    from shardlens.tracer.cells import column_labels
    from shardlens.tracer.tracer import Tracer

    out.mkdir(parents=True, exist_ok=True)
    clean, corrupt, answer, wrong = induction_task()
    metric = metrics.logit_diff(answer, wrong)
    with Tracer.from_pretrained(model or MODEL, stages=stages, backend=backend) as tracer:
        tracer.plan.describe()
        # each head patched at the last position only: where the next token is predicted
        cells = dict(points="z", metric=metric, over=("layer", "head"), positions=[clean.shape[1] - 1])
        swept = patching.sweep(tracer, clean, corrupt, **cells)
        estimate = attribution.atp(tracer, clean, corrupt, **cells)
        clean_value = float(tracer(clean, return_type="metric", metric=metric))
        _, cache = tracer.run_with_cache(clean, names_filter="blocks.*.hook_resid_post")
    effect = swept.grid - swept.baseline
    tables = [r.table.append_column("experiment", pa.array([name] * r.table.num_rows)) for name, r in (("sweep", swept), ("atp", estimate))]
    pq.write_table(pa.concat_tables(tables), out / "heads.parquet", compression="zstd")
    shutil.rmtree(out / "activations", ignore_errors=True)  # the previous demo's, replaced
    cache.to_parquet(out / "activations", layout="token", metadata={"model": "shardlens induction demo"})
    heatmap({"patching effect (logit diff)": effect, "attribution patching": estimate.grid}, out / "heads.png")
    heads = column_labels("head", effect.shape[1])
    page("the induction heads of the shipped model", [
        Heatmap(effect, swept.points, heads, title="patching effect (logit diff)", row_title="hook point", col_title="head"),
        Heatmap(estimate.grid, estimate.points, heads, title="attribution patching", row_title="hook point", col_title="head"),
    ]).save(out / "heads.html")
    layer, head = divmod(int(effect.argmax()), effect.shape[1])
    summary = {
        "clean_logit_diff": clean_value, "corrupt_logit_diff": swept.baseline,
        "top_head": {"layer": layer, "head": head, "recovered": float(effect[layer, head] / (clean_value - swept.baseline))},
        "atp_top_head": dict(zip(("layer", "head"), divmod(int(estimate.grid.argmax()), estimate.grid.shape[1]))),
        "outputs": {"heads": str(out / "heads.parquet"), "activations": str(out / "activations"), "heatmap": str(out / "heads.png"),
                    "page": str(out / "heads.html")},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
