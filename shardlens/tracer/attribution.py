"""Gradient attribution through the pipeline: attribution patching (AtP), integrated
gradients, and gradient x activation. Gradients come from the pipeline's backward pass, so
they work across stages.

Every result is a CellGrid over (point, pos), (point, head) or (point, feature): each
cell's value is a sum over that cell's features (d_model, or d_head of the head; for a
feature, over positions) and over the batch, of the activation term times the gradient of the batch-mean
metric (which already carries the 1 / batch of the mean): the estimated change of the metric
when the cell changes in every example. Feature cells are over the last axis of any
[batch, pos, d] point: a spliced dictionary's ``.sae.hook_latents`` (an SAE's or a
transcoder's, installed with model.hooks(fwd_hooks=[sl.dictionaries.load(...)])) or an
MLP's ``mlp.hook_post`` neurons.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from shardlens.hooks.hook_api import Runner
from shardlens.hooks.metrics import Metric
from shardlens.hooks.ops import CacheGrad, Patch
from shardlens.hooks.specs import HookSpec
from shardlens.tracer.cells import CellGrid, cache_of, cache_with_grads, resolve_points


def _cell_sums(values: Tensor, over: Sequence[str], positions: Optional[Sequence[int]] = None) -> Tensor:
    """[batch, pos, (head,) features...] -> [pos], [head] or [feature], summed over
    features (or positions, for feature cells) and batch (head cells over `positions` only, when given)."""
    if over[1] == "feature":
        return values.sum(1).sum(0)  # [batch, pos, feature] -> [feature]
    if over[1] == "pos":
        return values.flatten(2).sum(-1).sum(0)  # [pos]
    if positions is not None:
        values = values[:, list(positions)]
    return values.sum(-1).sum(1).sum(0)  # [batch, pos, head, d_head] -> [head]


def atp(
    model: Runner, clean: Tensor, corrupt: Tensor, *, points: Any, metric: Metric,
    over: Sequence[str] = ("layer", "pos"), attention_mask: Optional[Tensor] = None,
    positions: Optional[Sequence[int]] = None,
) -> CellGrid:
    """Attribution patching: (clean - corrupt) . d metric / d act on the corrupted run, the
    first-order estimate of what patching each cell changes the metric by. Two forward
    passes and one backward. `positions` restricts head cells, as in sweep."""
    names = resolve_points(model, points, over)
    clean_cache = cache_of(model, clean, attention_mask, names)
    baseline, corrupt_cache = cache_with_grads(model, corrupt, attention_mask, names, metric)
    rows = [_cell_sums((clean_cache[n] - corrupt_cache[n]) * corrupt_cache[n + "_grad"], over, positions) for n in names]
    return CellGrid(tuple(names), tuple(over), torch.stack(rows).cpu(), float(baseline))


def integrated_gradients(
    model: Runner, clean: Tensor, corrupt: Tensor, *, points: Any, metric: Metric, steps: int = 16,
    over: Sequence[str] = ("layer", "pos"), attention_mask: Optional[Tensor] = None,
) -> CellGrid:
    """Integrated gradients at each point along the straight path from the corrupted to the
    clean activation (midpoint rule, `steps` points, batched into one forward and one
    backward per hook point): (clean - corrupt) . mean gradient."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1; got {steps}")
    names = resolve_points(model, points, over)
    clean_cache = cache_of(model, clean, attention_mask, names)
    corrupt_cache = cache_of(model, corrupt, attention_mask, names)
    alphas = (torch.arange(steps, dtype=torch.float32) + 0.5) / steps
    tokens = corrupt.repeat(steps, 1)
    mask = None if attention_mask is None else attention_mask.repeat(steps, 1)
    rows = []
    for name in names:
        difference = clean_cache[name] - corrupt_cache[name]
        shape = (steps,) + (1,) * difference.ndim
        path = (corrupt_cache[name][None] + alphas.view(shape).to(difference.dtype) * difference[None]).flatten(0, 1)
        specs = [HookSpec(name, Patch(path)), HookSpec(name, CacheGrad())]
        _, cache = cache_with_grads(model, tokens, mask, [], metric.repeat(steps), specs)
        # the metric averaged over steps x batch rows: x steps gives each step's batch-mean gradient
        mean_grad = cache[name + "_grad"].unflatten(0, (steps, -1)).mean(0) * steps
        rows.append(_cell_sums(difference * mean_grad, over))
    return CellGrid(tuple(names), tuple(over), torch.stack(rows).cpu())


def grad_x_act(
    model: Runner, tokens: Tensor, *, points: Any, metric: Metric,
    over: Sequence[str] = ("layer", "pos"), attention_mask: Optional[Tensor] = None,
) -> CellGrid:
    """Gradient x activation of the metric at each cell: one forward and one backward."""
    names = resolve_points(model, points, over)
    value, cache = cache_with_grads(model, tokens, attention_mask, names, metric)
    rows = [_cell_sums(cache[n] * cache[n + "_grad"], over) for n in names]
    return CellGrid(tuple(names), tuple(over), torch.stack(rows).cpu(), float(value))
