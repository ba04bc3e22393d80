"""Activation patching sweeps: the metric with one clean activation patched into the
corrupted run, for every (hook point, position) or (hook point, head).

A sweep pays only for what a patch can change. The corrupted batch runs once and is kept
by the runner (runner.base_run: each layer's resid_pre and every layer's keys and values;
on a Tracer, on each replica's stages). A cell patched at (layer L, position p) then runs
only the layers from L on, over the positions from p on: the layers before are the
corrupted run's, and causal attention reads the positions before p from its keys and
values (sl.hooks.Resume). On a Tracer the run enters at the stage that holds L.

Many cells run per forward pass: the corrupted batch is repeated along the batch axis,
each copy with its own patch (sl.ops.Patch with batch= rows). Cells of one layer are
grouped by their start position, trading a few recomputed positions for fewer, larger runs
(`_groups`). The runs go through the runner's run_variants: a Tracer spreads them over its
replicas.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import Tensor

from shardlens.hooks.hook_api import Runner
from shardlens.hooks.metrics import Metric
from shardlens.hooks.ops import AblateExperts, Patch
from shardlens.hooks.run import BaseRun, Resume, RunRequest
from shardlens.hooks.specs import HookSpec
from shardlens.tables.axes import layer_index
from shardlens.tracer.attribution import atp
from shardlens.tracer.cells import CellGrid, cache_of, resolve_points, run_logits

MAX_BATCH = 64  # rows per forward pass (cells x examples), by default
RUN_COST = 32  # what one more run costs, in example-positions it could compute instead (weights read again, calls)


@dataclass(frozen=True)
class Cell:
    """One cell of a sweep: its hook point, its index (position, head or expert), and where
    a run of it can start (layer None: the whole forward)."""

    name: str
    index: int
    layer: Optional[int]
    position: int


@dataclass(frozen=True)
class Group:
    """Cells run in one forward pass, each on its own copy of the batch, from (layer, position)."""

    cells: tuple[Cell, ...]
    layer: Optional[int]
    position: int


def sweep_cells(names: Sequence[str], over: Sequence[str], counts: Mapping[str, int], *, positions: Optional[list], first_read: int) -> list[Cell]:
    """Every cell of a sweep (`counts[name]` positions or heads of each hook point), with
    the earliest (layer, position) its patch can change: its own layer, and its patched
    position (a head cell's earliest one), but no later than the first position the metric
    reads."""
    cells = []
    for name in names:
        layer = layer_index(name)
        for i in range(counts[name]):
            patched = i if over[1] == "pos" else (min(positions) if positions else 0)
            start = 0 if layer is None else min(patched, first_read)
            cells.append(Cell(name, i, layer, start))
    return cells


def _groups(cells: list[Cell], *, per_run: int, batch: int, seq_len: int) -> list[Group]:
    """The cells of each start layer cut into runs of at most `per_run`, in order of start
    position, so that the positions computed (a run computes every cell from its earliest
    start position) plus RUN_COST per run are fewest (dynamic programming over the cuts)."""
    by_layer: dict = {}
    for cell in cells:
        by_layer.setdefault(cell.layer, []).append(cell)
    groups = []
    for layer, layer_cells in by_layer.items():
        ordered = sorted(layer_cells, key=lambda c: c.position)
        best = [0.0] + [float("inf")] * len(ordered)  # best[i]: the cost of the first i cells
        cut = [0] * (len(ordered) + 1)
        for i in range(1, len(ordered) + 1):
            for j in range(max(0, i - per_run), i):
                cost = best[j] + (i - j) * batch * (seq_len - ordered[j].position) + RUN_COST
                if cost < best[i]:
                    best[i], cut[i] = cost, j
        i, runs = len(ordered), []
        while i > 0:
            runs.append(ordered[cut[i]:i])
            i = cut[i]
        groups += [Group(tuple(run), layer, run[0].position) for run in reversed(runs)]
    return groups


def patch_spec(cell: Cell, over: Sequence[str], clean: Tensor, rows: list[int], *, positions: Optional[list], start: int = 0) -> HookSpec:
    """The spec patching a cell's clean activation into batch rows `rows` of a run whose
    positions start at `start` (a head cell only at `positions`, when given)."""
    if over[1] == "pos":
        return HookSpec(cell.name, Patch(clean[:, cell.index:cell.index + 1], positions=[cell.index - start], batch=rows))
    head = slice(cell.index, cell.index + 1)
    if positions is None:
        return HookSpec(cell.name, Patch(clean[:, start:, head], heads=[cell.index], batch=rows))
    return HookSpec(cell.name, Patch(clean[:, positions, head], heads=[cell.index], positions=[p - start for p in positions], batch=rows))


def head_positions(positions: Sequence[int], seq_len: int) -> list[int]:
    """Head cells' positions as indices 0..seq_len-1 (negative ones count from the end)."""
    bad = [p for p in positions if not -seq_len <= int(p) < seq_len]
    if bad:
        raise ValueError(f"positions={list(positions)} but the batch has {seq_len} tokens: valid positions are {-seq_len}..{seq_len - 1}")
    return sorted({int(p) % seq_len for p in positions})


def _request(group: Group, base: Optional[BaseRun], tokens: Tensor, mask: Optional[Tensor], specs: list, metric: Metric) -> RunRequest:
    """One group's run, scored per cell: the batch repeated once per cell, started inside
    the base run when the group has a start layer."""
    n = len(group.cells)
    resume = None if base is None or group.layer is None else Resume(base, group.layer, group.position, n)
    return RunRequest(
        tokens.repeat(n, 1), attention_mask=None if mask is None else mask.repeat(n, 1), specs=tuple(specs), resume=resume,
        whole_batch=True, return_type="metric", metric=metric.per_copy(n),
    )


def _run_all(model: Runner, requests: list[RunRequest]) -> Tensor:
    """Every request's metric per copy of its batch, one after another: run_variants spreads
    the requests over a Tracer's replicas, and the metric is computed where the logits are."""
    with torch.no_grad():
        return torch.cat([result.output.reshape(-1).cpu() for result in model.run_variants(requests)])


def sweep(
    model: Runner,
    clean: Tensor,
    corrupt: Tensor,
    *,
    points: Any,
    metric: Metric,
    over: Sequence[str] = ("layer", "pos"),
    attention_mask: Optional[Tensor] = None,
    positions: Optional[Sequence[int]] = None,
    max_batch: int = MAX_BATCH,
    reuse: bool = True,
) -> CellGrid:
    """Patch each clean activation (cell) into the corrupted run and score it.

    Args:
        model: any runner (a HookedModel, a Tracer: see sl.Runner).
        clean, corrupt: token ids [batch, pos] of equal shape.
        points: a hook kind ("resid_pre", "z"), name, glob, list, or sl.points(...).
        metric: an sl.metrics score (its value over the batch is each cell's value).
        over: ("layer", "pos") or ("layer", "head") (head needs points such as hook_z).
        positions: with over=("layer", "head"), patch each head only at these positions.
        max_batch: rows per forward pass (cells x examples).
        reuse: start each cell's run inside the corrupted run, at the cell's layer and
            position (see the module's docstring); False runs the whole forward for every
            cell (in groups of cells, as many as max_batch allows: the same values, for
            comparison).

    Returns:
        CellGrid: `.grid` [point, pos|head] of metric values, `.table`, `.baseline` (the
        corrupted run's metric).
    """
    if clean.shape != corrupt.shape:
        raise ValueError(f"clean {tuple(clean.shape)} and corrupt {tuple(corrupt.shape)} must have the same shape")
    if tuple(over) == ("layer", "feature"):
        raise ValueError("sweep patches positions or heads; for features use sl.patching.feature_sweep (its top N by attribution)")
    names = resolve_points(model, points, over)
    if positions is not None and over[1] != "head":
        raise ValueError("positions= restricts head cells; over=('layer', 'pos') sweeps every position already")
    seq_len = clean.shape[1]
    positions = None if positions is None else head_positions(positions, seq_len)
    clean_cache = cache_of(model, clean, attention_mask, names)
    reuse = reuse and getattr(model, "architecture", None) is not None
    first_read = metric.first_read(attention_mask, seq_len) if reuse else 0
    counts = {name: clean_cache[name].shape[1 if over[1] == "pos" else 2] for name in names}  # [batch, pos, (head,) ...]
    cells = sweep_cells(names, over, counts, positions=positions, first_read=first_read)
    if not reuse:
        cells = [Cell(c.name, c.index, None, 0) for c in cells]
    groups = _groups(cells, per_run=max(1, max_batch // clean.shape[0]), batch=clean.shape[0], seq_len=seq_len)
    batch = corrupt.shape[0]

    def specs(group: Group) -> list[HookSpec]:
        rows = lambda j: list(range(j * batch, (j + 1) * batch))  # noqa: E731  the j-th copy of the batch
        return [patch_spec(cell, over, clean_cache[cell.name], rows(j), positions=positions, start=group.position) for j, cell in enumerate(group.cells)]

    grid, baseline = _run_groups(model, groups, cells, corrupt, attention_mask, metric=metric, specs=specs, reuse=reuse)
    return CellGrid(tuple(names), tuple(over), grid.reshape(len(names), -1), baseline, patched_metric=True)


def _run_groups(
    model: Runner, groups: list[Group], cells: list[Cell], tokens: Tensor, mask: Optional[Tensor], *, metric: Metric, specs: Any,
    reuse: bool,
) -> tuple[Tensor, float]:
    """(each cell's metric in the order of `cells`, the metric of the unchanged run): every
    group run with specs(group), inside one base run of `tokens` when reusing it."""
    if reuse:
        with model.base_run(tokens, attention_mask=mask) as base:
            values = _run_all(model, [_request(g, base, tokens, mask, specs(g), metric) for g in groups])
            baseline = float(metric(base.logits, mask, tokens))
    else:
        values = _run_all(model, [_request(g, None, tokens, mask, specs(g), metric) for g in groups])
        baseline = _baseline(model, tokens, mask, metric)
    order = {(cell.name, cell.index): i for i, cell in enumerate(c for g in groups for c in g.cells)}
    return values[[order[(c.name, c.index)] for c in cells]], baseline


def _baseline(model: Runner, tokens: Tensor, mask: Optional[Tensor], metric: Metric) -> float:
    """The metric of the run with no cell changed."""
    return float(metric(run_logits(model, tokens, mask, []), mask, tokens))


def expert_sweep(
    model: Runner,
    tokens: Tensor,
    *,
    metric: Metric,
    renormalize: bool = False,
    layers: Optional[Sequence[int]] = None,
    attention_mask: Optional[Tensor] = None,
    max_batch: int = MAX_BATCH,
) -> CellGrid:
    """Ablate each expert of each mixture-of-experts layer in turn and score the run.

    Each cell (layer, expert) takes that expert out of that layer's routing for every token
    (sl.ops.AblateExperts at blocks.<layer>.mlp.hook_expert_weights, renormalising the other
    experts' weights when asked). As in `sweep`, many cells run per forward pass, each starting
    at its layer inside one run of the unchanged batch.

    Args:
        model: any runner of a mixture-of-experts model.
        tokens: token ids [batch, pos].
        metric: an sl.metrics score.
        layers: the MoE layers to sweep (default: all).

    Returns:
        CellGrid over ("layer", "expert"): `.grid` [layer, expert], `.table`, `.baseline`
        (the metric with every expert in place).
    """
    names = sorted((n for n in model.hook_names() if n.endswith(".mlp.hook_expert_weights")), key=layer_index)
    if not names:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        raise ValueError(f"expert_sweep needs a mixture-of-experts model; a {model_type} model has no blocks.<layer>.mlp.hook_expert_weights")
    if layers is not None:
        wanted = {int(layer) for layer in layers}
        missing = sorted(wanted - {layer_index(n) for n in names})
        if missing:
            raise ValueError(f"layers {missing} have no mixture-of-experts block; MoE layers: {[layer_index(n) for n in names]}")
        names = [n for n in names if layer_index(n) in wanted]
    n_experts = model.hook_shape(names[0].replace("hook_expert_weights", "hook_router_logits"))[0]
    reuse = getattr(model, "architecture", None) is not None
    cells = [Cell(name, expert, layer_index(name) if reuse else None, 0) for name in names for expert in range(n_experts)]
    batch = tokens.shape[0]
    groups = _groups(cells, per_run=max(1, max_batch // batch), batch=batch, seq_len=tokens.shape[1])

    def specs(group: Group) -> list[HookSpec]:
        return [
            HookSpec(cell.name, AblateExperts([cell.index], renormalize=renormalize, batch=list(range(j * batch, (j + 1) * batch))))
            for j, cell in enumerate(group.cells)
        ]

    grid, baseline = _run_groups(model, groups, cells, tokens, attention_mask, metric=metric, specs=specs, reuse=reuse)
    return CellGrid(tuple(names), ("layer", "expert"), grid.reshape(len(names), n_experts), baseline, patched_metric=True)


def feature_sweep(
    model: Runner,
    clean: Tensor,
    corrupt: Tensor,
    *,
    points: Any,
    metric: Metric,
    top: int = 16,
    features: Optional[Mapping[str, Sequence[int]]] = None,
    attention_mask: Optional[Tensor] = None,
    max_batch: int = MAX_BATCH,
) -> CellGrid:
    """Patch each chosen feature's clean values (at every position) into the corrupted run
    and score it: one cell per (hook point, feature), such as a dictionary's latent.

    Args:
        model: any runner, with the dictionaries spliced in (model.hooks(fwd_hooks=[...])).
        points: [batch, pos, d] hook points: a dictionary's ``.sae.hook_latents`` (SAE or
            transcoder), or neurons such as ``mlp.hook_post``.
        top: sweep each point's `top` features by |attribution patching| (sl.attribution.atp);
            one forward and backward more to choose them.
        features: the features to sweep per point, instead of choosing.

    Returns:
        CellGrid over ("layer", "feature"): `.grid` [point, d] with NaN at features not swept,
        `.table` (the swept cells), `.baseline` (the corrupted run's metric).
    """
    if clean.shape != corrupt.shape:
        raise ValueError(f"clean {tuple(clean.shape)} and corrupt {tuple(corrupt.shape)} must have the same shape")
    over = ("layer", "feature")
    names = resolve_points(model, points, over)
    if features is None:
        if not isinstance(top, int) or top < 1:
            raise ValueError(f"top must be a positive int; got {top!r}")
        scores = atp(model, clean, corrupt, points=names, metric=metric, over=over, attention_mask=attention_mask).grid
        features = {name: scores[i].abs().topk(min(top, scores.shape[1])).indices.sort().values.tolist() for i, name in enumerate(names)}
    unknown = sorted(set(features) - set(names))
    if unknown:
        raise ValueError(f"features= names {unknown}, which points= does not select; selected: {names}")
    clean_cache = cache_of(model, clean, attention_mask, names)
    reuse = getattr(model, "architecture", None) is not None
    cells = [Cell(name, int(i), layer_index(name) if reuse else None, 0) for name in names for i in features.get(name, ())]
    batch = clean.shape[0]
    groups = _groups(cells, per_run=max(1, max_batch // batch), batch=batch, seq_len=clean.shape[1])

    def specs(group: Group) -> list[HookSpec]:
        return [HookSpec(cell.name, Patch(clean_cache[cell.name][..., [cell.index]], features=[cell.index], batch=list(range(j * batch, (j + 1) * batch))))
                for j, cell in enumerate(group.cells)]

    values, baseline = _run_groups(model, groups, cells, corrupt, attention_mask, metric=metric, specs=specs, reuse=reuse)
    grid = torch.full((len(names), max(clean_cache[n].shape[-1] for n in names)), float("nan"))
    for cell, value in zip(cells, values):
        grid[names.index(cell.name), cell.index] = value
    return CellGrid(tuple(names), over, grid, baseline, patched_metric=True)
