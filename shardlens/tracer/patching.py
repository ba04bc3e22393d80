"""Activation patching sweeps: the metric with one clean activation patched into the
corrupted run, for every (hook point, position) or (hook point, head).

Many patch variants run per forward pass: the corrupted batch is repeated along the batch
axis, and each copy gets its own patch (sl.ops.Patch with batch= rows). The variants of one
layer resume at that layer from the corrupted run's resid_pre there (sl.RunRequest's
resume): the layers before it are the corrupted run's, so they are not computed again (on
a Tracer, the run enters at the stage that holds the layer). The runs go through the
runner's run_variants: a Tracer spreads them over its replicas. Head cells patched only at
later positions run against a frozen key/value cache of the shared prefix (on a runner that
runs one variant at a time: a HookedModel, or a Tracer with one replica).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from shardlens.hooks.hook_api import Runner
from shardlens.hooks.metrics import Metric
from shardlens.hooks.ops import AblateExperts, Patch
from shardlens.hooks.run import Resume, RunRequest
from shardlens.hooks.specs import HookSpec
from shardlens.tables.axes import layer_index
from shardlens.tracer.cells import CellGrid, batch_mean, resolve_points, run_logits


def _cells(names: list[str], over: Sequence[str], clean_cache: Any) -> list[tuple[str, int]]:
    cells = []
    for name in names:
        tensor = clean_cache[name]
        count = tensor.shape[1] if over[1] == "pos" else tensor.shape[2]
        cells += [(name, i) for i in range(count)]
    return cells


def patch_spec(name: str, over: Sequence[str], index: int, clean: Tensor, rows: list[int], positions: Optional[list] = None) -> HookSpec:
    """The spec patching cell (name, index) of the clean activation into batch rows `rows`
    (a head cell only at `positions`, when given)."""
    if over[1] == "pos":
        return HookSpec(name, Patch(clean[:, index:index + 1], positions=[index], batch=rows))
    values = clean[:, :, index:index + 1] if positions is None else clean[:, positions, index:index + 1]
    return HookSpec(name, Patch(values, heads=[index], positions=positions, batch=rows))


def _corrupt_resid(model: Runner, corrupt: Tensor, attention_mask: Optional[Tensor], names: list[str]) -> dict:
    """The corrupted run's resid_pre of each layer the cells are in (a run patched there can
    start from it); empty for a model without canonical layers."""
    if getattr(model, "architecture", None) is None:
        return {}
    layers = sorted({layer_index(n) for n in names if layer_index(n) is not None})
    resid = [f"blocks.{layer}.hook_resid_pre" for layer in layers]
    _, cache = model.run_with_cache(corrupt, names_filter=resid, attention_mask=attention_mask)
    return {layer: cache[name] for layer, name in zip(layers, resid)}


def _by_layer(cells: list, start_from: dict) -> list:
    """Cells grouped by the layer a run can start from (None: the whole forward), in order."""
    groups: dict = {}
    for name, index in cells:
        layer = layer_index(name)
        groups.setdefault(layer if layer in start_from else None, []).append((name, index))
    return list(groups.items())


def _request(tokens: Tensor, mask: Optional[Tensor], specs: list, resume: Optional[Resume] = None, kv_cache: Any = None) -> RunRequest:
    return RunRequest(tokens, attention_mask=mask, specs=tuple(specs), resume=resume, kv_cache=kv_cache, whole_batch=True)


def _run_all(model: Runner, requests: list[RunRequest]) -> list[Tensor]:
    """Each request's logits: run_variants spreads them over a Tracer's replicas."""
    with torch.no_grad():
        return [result.output for result in model.run_variants(requests)]


def _run_after_prefix(model: Runner, corrupt: Tensor, mask: Optional[Tensor], runs: list, *, prefix: int, positions: Sequence[int], clean_cache: Any) -> list[Tensor]:
    """Each run's logits for the tokens from `prefix` on, against one frozen key/value cache
    of the corrupted prefix (computed once; on a Tracer it stays on the stages); the patches
    move to suffix coordinates."""
    with model.init_kv_cache(corrupt.shape[0]) as cache, torch.no_grad():
        model(corrupt[:, :prefix], attention_mask=None if mask is None else mask[:, :prefix], past_kv_cache=cache)
        cache.freeze()
        shifted = [p % corrupt.shape[1] - prefix for p in positions]
        batch = corrupt.shape[0]
        requests = []
        for _, group, tokens, run_mask, _ in runs:
            specs = [
                HookSpec(name, Patch(clean_cache[name][:, list(positions), index:index + 1], heads=[index], positions=shifted,
                                     batch=list(range(j * batch, (j + 1) * batch))))
                for j, (name, index) in enumerate(group)
            ]
            suffix_mask = None if run_mask is None else run_mask[:, prefix:]
            requests.append(_request(tokens[:, prefix:], suffix_mask, specs, kv_cache=cache.repeat(len(group))))
        return _run_all(model, requests)


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
    max_batch: int = 64,
    reuse_prefix: bool = True,
) -> CellGrid:
    """Patch each clean activation (cell) into the corrupted run and score it.

    Args:
        model: any runner (a HookedModel, a Tracer: see sl.Runner).
        clean, corrupt: token ids [batch, pos] of equal shape.
        points: a hook kind ("resid_pre", "z"), name, glob, list, or sl.points(...).
        metric: an sl.metrics score (its value over the batch is each cell's value).
        over: ("layer", "pos") or ("layer", "head") (head needs points such as hook_z).
        positions: with over=("layer", "head"), patch each head only at these positions.
        max_batch: rows per forward pass (variants x examples).
        reuse_prefix: with head cells at `positions`, run the tokens before the earliest
            patched position once (a frozen key/value cache) and only the rest for every
            variant: on a HookedModel, and on a Tracer with one replica (with several, the
            whole runs spread over the replicas instead).

    Returns:
        CellGrid: `.grid` [point, pos|head] of metric values, `.table`, `.baseline` (the
        corrupted run's metric).
    """
    if clean.shape != corrupt.shape:
        raise ValueError(f"clean {tuple(clean.shape)} and corrupt {tuple(corrupt.shape)} must have the same shape")
    names = resolve_points(model, points, over)
    if positions is not None and over[1] != "head":
        raise ValueError("positions= restricts head cells; over=('layer', 'pos') sweeps every position already")
    positions = None if positions is None else [int(p) for p in positions]
    _, clean_cache = model.run_with_cache(clean, names_filter=names, attention_mask=attention_mask)
    cells = _cells(names, over, clean_cache)
    # A runner that runs several variants at once (a Tracer with replicas) spreads whole runs
    # instead of sharing a prefix: the prefix would live on one replica.
    prefix = min(p % clean.shape[1] for p in positions) if positions and reuse_prefix and model.parallel_runs == 1 else 0
    start_from = _corrupt_resid(model, corrupt, attention_mask, names) if prefix == 0 else {}
    runs = _patch_runs(_by_layer(cells, start_from), corrupt, attention_mask, clean_cache, over=over, positions=positions, max_batch=max_batch)
    if prefix > 0:
        all_logits = _run_after_prefix(model, corrupt, attention_mask, runs, prefix=prefix, positions=positions, clean_cache=clean_cache)
    else:
        requests = [
            _request(tokens, mask, specs, None if layer is None else Resume(layer, start_from[layer].repeat(len(group), 1, 1)))
            for layer, group, tokens, mask, specs in runs
        ]
        all_logits = _run_all(model, requests)
    values = _scores(metric, [run[1:] for run in runs], all_logits, prefix)
    grid = values.reshape(len(names), -1).cpu()
    return CellGrid(tuple(names), tuple(over), grid, _baseline(model, corrupt, attention_mask, metric))


def _patch_runs(
    groups: list, corrupt: Tensor, mask: Optional[Tensor], clean_cache: Any, *, over: Sequence[str], positions: Optional[list],
    max_batch: int,
) -> list:
    """The runs of a sweep: (layer to start from or None, its cells, tokens, mask, specs), each
    the corrupted batch repeated once per cell, the cell's patch on its copy."""
    batch = corrupt.shape[0]
    per_run = max(1, max_batch // batch)
    runs = []
    for layer, layer_cells in groups:
        for start in range(0, len(layer_cells), per_run):
            group = layer_cells[start:start + per_run]
            specs = [patch_spec(n, over, i, clean_cache[n], list(range(j * batch, (j + 1) * batch)), positions) for j, (n, i) in enumerate(group)]
            runs.append((layer, group, corrupt.repeat(len(group), 1), None if mask is None else mask.repeat(len(group), 1), specs))
    return runs


def _scores(metric: Metric, runs: list, all_logits: list[Tensor], prefix: int = 0) -> Tensor:
    """The metric of each cell: the mean over its copy of the batch in its run's logits
    (which cover the tokens from `prefix` on)."""
    values = []
    for (cells, tokens, mask, _), logits in zip(runs, all_logits):
        tokens, mask = tokens[:, prefix:], None if mask is None else mask[:, prefix:]
        values.append(batch_mean(metric.repeat(len(cells)).per_example(logits, mask, tokens), len(cells)))
    return torch.cat(values)


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
    max_batch: int = 64,
) -> CellGrid:
    """Ablate each expert of each mixture-of-experts layer in turn and score the run.

    Each cell (layer, expert) takes that expert out of that layer's routing for every token
    (sl.ops.AblateExperts at blocks.<layer>.mlp.hook_expert_weights, renormalising the other
    experts' weights when asked). As in `sweep`, many cells run per forward pass.

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
    cells = [(name, expert) for name in names for expert in range(n_experts)]
    batch = tokens.shape[0]
    per_run = max(1, max_batch // batch)
    runs = []
    for start in range(0, len(cells), per_run):
        group = cells[start:start + per_run]
        specs = [
            HookSpec(name, AblateExperts([expert], renormalize=renormalize, batch=list(range(j * batch, (j + 1) * batch))))
            for j, (name, expert) in enumerate(group)
        ]
        mask = None if attention_mask is None else attention_mask.repeat(len(group), 1)
        runs.append((group, tokens.repeat(len(group), 1), mask, specs))
    all_logits = _run_all(model, [_request(tokens, mask, specs) for _, tokens, mask, specs in runs])
    grid = _scores(metric, runs, all_logits).reshape(len(names), n_experts).cpu()
    return CellGrid(tuple(names), ("layer", "expert"), grid, _baseline(model, tokens, attention_mask, metric))
