"""What sweeps and attribution share: the grid of cells (hook point x position or head),
and how to run any runner (HookedModel, Tracer: see shardlens.hooks.hook_api) for a metric."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import torch
from torch import Tensor

from shardlens.hooks.hook_api import Runner
from shardlens.hooks.metrics import Metric
from shardlens.hooks.ops import Cache
from shardlens.hooks.run import RunRequest
from shardlens.hooks.specs import HookSpec
from shardlens.tables.axes import PATTERN_SUFFIXES, head_axis, layer_index
from shardlens.tables.views import Heatmap, View, grid_view

# What activation cells are over; expert sweeps are over ("layer", "expert"). "feature": the
# last axis of a [batch, pos, d] point, such as a dictionary's latents or an MLP's neurons.
OVER = (("layer", "pos"), ("layer", "head"), ("layer", "feature"))


@dataclass(frozen=True)
class CellGrid:
    """Values over (hook point, position), (hook point, head), (hook point, feature) or
    (hook point, expert).

    Attributes:
        points: the hook points, one per row of `grid` (in layer order).
        over: ("layer", "pos"), ("layer", "head"), ("layer", "feature") or ("layer", "expert").
        grid: [point, pos], [point, head], [point, feature] or [point, expert]; NaN for
            cells not computed (a feature sweep's features outside its top N).
        baseline: the metric of the corrupted run (sweeps and attribution), when known.
        patched_metric: the grid holds each patched run's metric (sweeps), not a change of
            the metric (attribution); `view` draws the patching effect, grid - baseline.
    """

    points: tuple
    over: tuple
    grid: Tensor
    baseline: Optional[float] = None
    patched_metric: bool = False

    def __post_init__(self) -> None:
        if self.patched_metric and self.baseline is None:
            raise ValueError("a CellGrid of patched metrics (patched_metric=True) needs the baseline they are patched "
                             "from; got baseline=None")

    @property
    def table(self) -> pa.Table:
        """One row per computed cell: point, layer, pos, head (expert or feature, when the grid
        is over them), value; pos or head null as `over` says."""
        rows, cols = self.grid.shape
        points = [p for p in self.points for _ in range(cols)]
        columns = {
            "point": pa.array(points, pa.string()),
            "layer": pa.array([layer_index(p) for p in points], pa.int16()),
        }
        for axis in ("pos", "head") + ((self.over[1],) if self.over[1] in ("expert", "feature") else ()):
            columns[axis] = pa.array([c if self.over[1] == axis else None for _ in range(rows) for c in range(cols)], pa.int32())
        columns["value"] = pa.array(self.grid.flatten().double().numpy(), pa.float64())
        table = pa.table(columns)
        return table.filter(pa.compute.invert(pa.compute.is_nan(table["value"]))) if self.grid.isnan().any() else table

    def view(self, tokens: Optional[Sequence[str]] = None, *, title: Optional[str] = None) -> View:
        """The grid as an HTML heatmap (shardlens.tables.views): a row per hook point, a column
        per position, head, feature or expert, on a scale centred on 0; hover a cell for its
        value. A sweep's grid shows its patching effect (patched metric - corrupted metric), an
        expert sweep's its ablation effect (ablated metric - unablated metric). Cells not
        computed show grey.

        Args:
            tokens: over ("layer", "pos"), a label per position (the prompt's tokens).

        Example:
            >>> sl.patching.sweep(model, clean, corrupt, points="resid_pre", metric=metric).view(["The", " cat"]).save("grid.html")
        """
        kind = self.over[1]
        if tokens is not None and kind != "pos":
            raise ValueError(f"CellGrid.view(tokens=...) labels positions; this grid is over {self.over}")
        columns = column_labels(kind, self.grid.shape[1], tokens)
        effect, run = ("ablation effect", "unablated run") if kind == "expert" else ("patching effect", "corrupted run")
        baseline = "" if self.baseline is None else f" ({run}: {self.baseline:.4g})"
        values, shown = (self.grid - self.baseline, effect) if self.patched_metric else (self.grid, "cells")
        return grid_view(Heatmap(values, list(self.points), columns, title=title or f"{shown} over {self.over}{baseline}",
                                 row_title="hook point", col_title=kind))

    def _repr_html_(self) -> str:
        return self.view()._repr_html_()


_PREFIX = {"head": "H", "expert": "E"}  # column labels: H0, H1, ... ; positions and features by number


def column_labels(kind: str, n: int, tokens: Optional[Sequence[str]] = None) -> list[str]:
    """The labels of a grid's n columns over `kind` ("pos", "head", "feature", "expert"): H0,
    H1, ... for heads, E0, ... for experts, numbers otherwise; positions with their tokens
    ("0 The", "1  cat") when given."""
    if tokens is None:
        return [f"{_PREFIX.get(kind, '')}{i}" for i in range(n)]
    if len(tokens) != n:
        raise ValueError(f"CellGrid.view needs a token per position: {n}; got {len(tokens)} tokens")
    return [f"{i} {t}" for i, t in enumerate(tokens)]


def resolve_points(model: Runner, points: Any, over: Sequence[str]) -> list[str]:
    """The hook names `points` selects (a kind such as "resid_pre", a name, glob, list or
    sl.points), checked against what `over` needs."""
    over = tuple(over)
    if over not in OVER:
        raise ValueError(f"over must be ('layer', 'pos'), ('layer', 'head') or ('layer', 'feature'); got {over!r}")
    if isinstance(points, str) and "." not in points and not points.startswith("hook_"):
        from shardlens.hooks.specs import points as by_kind

        points = by_kind(points)
    names = HookSpec(points, Cache()).resolve(model.hook_names())
    if over[1] == "feature":
        with_heads = [n for n in names if head_axis(n) is not None or n.endswith(PATTERN_SUFFIXES)]
        if with_heads:
            raise ValueError(f"over=('layer', 'feature') needs [batch, pos, d] hook points (a dictionary's .sae.hook_latents, "
                             f"mlp.hook_post); {with_heads[0]} is not one")
    if over[1] == "head":
        without = [n for n in names if head_axis(n) != 2]
        if without:
            raise ValueError(f"over=('layer', 'head') needs [batch, pos, head, ...] hook points (hook_z, hook_q, ...); {without[0]} is not one")
    return sorted(names, key=lambda n: (layer_index(n) if layer_index(n) is not None else -1, n))


def cache_of(model: Runner, tokens: Tensor, mask: Optional[Tensor], names: list[str]) -> Any:
    """The cache of `names` in one run of `tokens`, asking for no logits (a runner that takes
    tokens then unembeds only what it must, and a Tracer sends none back)."""
    options = {"return_type": None} if model.takes_tokens else {}
    _, cache = model.run_with_cache(tokens, names_filter=names, attention_mask=mask, **options)
    return cache


def run_logits(model: Runner, tokens: Tensor, mask: Optional[Tensor], specs: Sequence[HookSpec]) -> Tensor:
    """The logits of one run with these specs (the batch kept whole: the specs select rows)."""
    with torch.no_grad():
        return model.run(RunRequest(tokens, attention_mask=mask, specs=tuple(specs), whole_batch=True)).output


def cache_with_grads(model: Runner, tokens: Tensor, mask: Optional[Tensor], names: list[str], metric: Metric, specs: Sequence = ()) -> tuple[Tensor, Any]:
    """(metric value, cache of `names` and their gradients of the metric)."""
    value, cache = model.run_with_cache(
        tokens, names_filter=names, incl_bwd=True, return_type="metric", metric=metric, attention_mask=mask,
        fwd_hooks=list(specs), whole_batch=bool(specs),  # specs select rows of the batch: keep it whole
    )
    return value.detach(), cache

