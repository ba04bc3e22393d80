"""Checking a campaign's cluster against one process before its units run.

`verify` runs the first few examples of a campaign's data through the configured cluster
(a Tracer over stage workers) and through the same checkpoint in one process (a
HookedModel), and compares, per hook point the campaign's experiments name, the largest
absolute difference of the activations on the clean and corrupt prompts (and, for points
of atp and ig experiments, of their gradients of the metric), then the logits and the
campaign's metric. A compared value passes when

    max |cluster - one process| <= tolerance * max(1, max |one process|)

so the tolerance is absolute for values of order one and below, relative above. The
default tolerance follows the model's dtype (DEFAULT_TOLERANCE): float32 1e-4, float16
1e-2, bfloat16 3e-2 (its 8-bit mantissa rounds at 4e-3 per operation).

Example:
    >>> result = verify("campaign.yaml", examples=4)
    >>> print(result.describe())
    >>> result.check()      # raises VerificationError naming where they differ
"""

from __future__ import annotations

import math
import sys
from contextlib import ExitStack
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Optional, Union

import torch
from torch import Tensor

from shardlens.hooks.metrics import Metric
from shardlens.tracer.campaign.data import batch_tensors, check_fields, load_rows
from shardlens.tracer.campaign.runner import batch_metric, spliced, start_tracer
from shardlens.tracer.campaign.schema import Campaign, CampaignError, load_campaign
from shardlens.tracer.campaign.status import append_event
from shardlens.tracer.cells import resolve_points
from shardlens.tracer.tracer import Tracer

DEFAULT_TOLERANCE = MappingProxyType({"float32": 1e-4, "float16": 1e-2, "bfloat16": 3e-2})
DEFAULT_EXAMPLES = 4
GRADIENT_KINDS = ("atp", "ig")  # experiments whose results come from the pipeline's backward pass


class VerificationError(CampaignError):
    """The cluster and one process differ beyond the tolerance: names where, and by how much."""


@dataclass(frozen=True)
class Difference:
    """How far the cluster is from one process at one compared value.

    Attributes:
        point: a hook point, "<hook point>_grad" (its gradient of the metric), "logits", or
            "metric" (the campaign's metric of each example, on the clean and corrupt prompts).
        difference: max |cluster - one process| over the examples (NaN where either is NaN).
        scale: max |one process|.
        limit: the largest difference allowed: tolerance * max(1, scale).
        stage: the cluster's stage that computes the value (None: unknown, or the metric,
            which is computed here from the logits).
    """

    point: str
    difference: float
    scale: float
    limit: float
    stage: Optional[int] = None

    @property
    def ok(self) -> bool:
        return self.difference <= self.limit  # False for NaN

    @property
    def excess(self) -> float:
        """difference / limit: above 1 fails (inf for NaN)."""
        return math.inf if math.isnan(self.difference) else self.difference / self.limit


@dataclass(frozen=True)
class Verification:
    """The differences between the cluster and one process, in the order the runs compute
    them: hook points and logits (forward), the metric, then gradients (backward)."""

    differences: tuple
    tolerance: float
    dtype: str
    examples: int

    def __post_init__(self) -> None:
        if not self.differences:
            raise ValueError("a Verification needs at least one compared value")

    @property
    def ok(self) -> bool:
        return all(d.ok for d in self.differences)

    @property
    def failures(self) -> tuple:
        """The differences over their limit, in the order the runs compute them."""
        return tuple(d for d in self.differences if not d.ok)

    @property
    def worst(self) -> Difference:
        """The difference furthest over (or closest to) its limit."""
        return max(self.differences, key=lambda d: d.excess)

    def describe(self) -> str:
        """A table: per compared value, its stage, largest difference, scale, limit and verdict."""
        width = max(len(d.point) for d in self.differences)
        lines = [
            (f"{self.examples} examples, {self.dtype}, tolerance {self.tolerance:g}: a value passes when "
             "max |cluster - one process| <= tolerance x max(1, max |one process|)"),
            f"{'compared':<{width}}  stage  {'max |diff|':>10}  {'max |ref|':>10}  {'limit':>9}",
        ]
        for d in self.differences:
            stage = "-" if d.stage is None else str(d.stage)
            lines.append(f"{d.point:<{width}}  {stage:>5}  {d.difference:>10.3g}  {d.scale:>10.3g}  {d.limit:>9.2g}  {'ok' if d.ok else 'DIFFERS'}")
        lines.append("ok: the cluster agrees with one process" if self.ok else self.message())
        return "\n".join(lines)

    def message(self) -> str:
        """One line: where the cluster and one process differ, worst first, and the first
        compared value (in the order the runs compute them) that differs."""
        if self.ok:
            worst = self.worst
            return f"the cluster agrees with one process (closest to its limit: {worst.point}, {worst.difference:.3g} of {worst.limit:.2g})"
        failures = self.failures
        worst = sorted(failures, key=lambda d: -d.excess)[:3]
        listed = ", ".join(f"{d.point} by {d.difference:.3g} (limit {d.limit:.2g})" for d in worst)
        first = failures[0]
        where = f" (stage {first.stage})" if first.stage is not None else ""
        agree = self.differences.index(first)
        before = f"; the {agree} compared values before it agree" if agree else ""
        return (f"the cluster and one process differ beyond tolerance {self.tolerance:g} ({self.dtype}) at "
                f"{len(failures)} of {len(self.differences)} compared values: {listed}; the first that differs is "
                f"{first.point}{where}{before}")

    def check(self) -> "Verification":
        """This verification, or VerificationError when the cluster and one process differ."""
        if not self.ok:
            raise VerificationError(self.message())
        return self


def verify(
    campaign: Union[Campaign, str, Path], *, cluster: Any = None, reference: Any = None, examples: int = DEFAULT_EXAMPLES,
    tolerance: Optional[float] = None,
) -> Verification:
    """Run the campaign's first `examples` rows on its cluster and in one process, and compare.

    Args:
        campaign: a campaign file, or a loaded Campaign.
        cluster: the runner to check (a Tracer you started, with the campaign's dictionaries
            spliced in, as run_campaign's is); default: start the one the campaign's model
            and cluster sections describe, with its dictionaries (and shut it down after).
        reference: the one-process runner, likewise; default: sl.HookedModel.from_pretrained
            of the campaign's model, in its dtype, on this machine's CPU, with the campaign's
            dictionaries.
        examples: how many rows of the data to run.
        tolerance: see the module docstring; default: DEFAULT_TOLERANCE of the model's dtype.

    Returns:
        A Verification; call .check() to raise VerificationError when they differ.
    """
    campaign = campaign if isinstance(campaign, Campaign) else load_campaign(campaign)
    _check_arguments(examples, tolerance)
    batches = _first_rows(campaign, examples)
    with ExitStack() as cleanup:  # what it starts it splices the campaign's dictionaries into, and stops
        if cluster is None:
            cluster = start_tracer(campaign)
            cleanup.callback(cluster.shutdown)
            cleanup.enter_context(spliced(campaign, cluster))
        if reference is None:
            reference = cleanup.enter_context(spliced(campaign, _reference(campaign)))
        points, gradients = _points(campaign, cluster)
        theirs = _values(cluster, campaign, batches, points, gradients)
        ours = _values(reference, campaign, batches, points, gradients)
    dtype = campaign.model.get("dtype") or _dtype(reference)
    tolerance = tolerance if tolerance is not None else DEFAULT_TOLERANCE.get(dtype, DEFAULT_TOLERANCE["bfloat16"])
    stages = _stages(cluster)
    differences = tuple(_difference(key, theirs[key], ours[key], tolerance, stages.get(key.removesuffix("_grad"))) for key in ours)
    return Verification(differences, tolerance=tolerance, dtype=dtype, examples=sum(len(b) for b in batches))


def verify_before_run(campaign: Campaign, cluster: Any, out: Path, *, progress: bool = True) -> Verification:
    """The campaign's verify key at work (run_campaign, before its first unit): verify
    `cluster`, record the result in out/events.jsonl, print the table when `progress`, and
    raise VerificationError when they differ."""
    result = verify(campaign, cluster=cluster, **campaign.verify)
    append_event(out, "verify", ok=result.ok, message=result.message())
    if progress:
        print(result.describe(), file=sys.stderr)
    return result.check()


def _check_arguments(examples: Any, tolerance: Any) -> None:
    if not isinstance(examples, int) or isinstance(examples, bool) or examples < 1:
        raise ValueError(f"examples must be a positive int; got {examples!r}")
    if tolerance is not None and (not isinstance(tolerance, (int, float)) or isinstance(tolerance, bool) or not tolerance > 0):
        raise ValueError(f"tolerance must be a positive number such as 1e-4 (or None: by dtype, {DEFAULT_TOLERANCE}); got {tolerance!r}")


def _first_rows(campaign: Campaign, examples: int) -> list[list[dict]]:
    """The first `examples` rows of the data, in its batches (whose prompts share a length)."""
    rows = load_rows(campaign)
    check_fields(campaign, rows)
    size = campaign.data.get("batch_size", 16)
    first = rows[:examples]
    return [first[i:i + size] for i in range(0, len(first), size)]


def _reference(campaign: Campaign) -> Any:
    """The campaign's model in one process, in its dtype."""
    from shardlens.hooks.model import HookedModel
    dtype = campaign.model.get("dtype")
    return HookedModel.from_pretrained(campaign.model_source, dtype=getattr(torch, dtype) if dtype else "auto")


def _dtype(runner: Any) -> str:
    """The dtype of a runner's parameters, by name ("float32")."""
    if isinstance(runner, Tracer):
        return runner.plan.dtype
    return str(next(runner.model.parameters()).dtype).removeprefix("torch.")


def _points(campaign: Campaign, runner: Any) -> tuple[list[str], list[str]]:
    """The hook points the experiments name, and those whose gradients they use, in the
    runner's (forward) order."""
    selected: set[str] = set()
    gradients: set[str] = set()
    for experiment in campaign.experiments:
        names = resolve_points(runner, experiment["points"], ("layer", "pos"))
        selected.update(names)
        if experiment["kind"] in GRADIENT_KINDS:
            gradients.update(names)
    order = runner.hook_names()
    return [n for n in order if n in selected], [n for n in order if n in gradients]


def _metric(campaign: Campaign, tensors: dict) -> Optional[Metric]:
    """The campaign's metric for a batch; None when only extract, top_contexts and activations experiments run (the data
    need not hold answers then)."""
    if all(e["kind"] in ("extract", "top_contexts", "activations") for e in campaign.experiments):
        return None
    return batch_metric(campaign, tensors)


def _values(runner: Any, campaign: Campaign, batches: Sequence[list], points: list[str], gradients: list[str]) -> dict[str, Tensor]:
    """Everything compared, each flattened to one float64 vector over the batches: hook
    points (clean, then corrupt prompts), gradients of the metric, logits and metric."""
    values: dict[str, list[Tensor]] = {}
    keep = lambda key, tensor: values.setdefault(key, []).append(tensor.detach().double().flatten().cpu())  # noqa: E731
    for rows in batches:
        tensors = batch_tensors(campaign, rows, runner.tokenizer)
        metric = _metric(campaign, tensors)
        prompts = ("clean", "corrupt") if metric is not None else ("clean",)
        for prompt in prompts:
            with torch.no_grad():
                logits, cache = runner.run_with_cache(tensors[prompt], names_filter=points)
            for name in points:
                keep(name, cache[name])
            keep("logits", logits)
            if metric is not None:
                keep("metric", metric.per_example(logits, tokens=tensors[prompt]))
        if gradients:
            _, cache = runner.run_with_cache(tensors["clean"], names_filter=gradients, incl_bwd=True, return_type="metric", metric=metric)
            for name in gradients:
                keep(f"{name}_grad", cache[f"{name}_grad"])
    order = [*points, "logits", "metric", *(f"{n}_grad" for n in reversed(gradients))]  # as the passes compute them
    return {key: torch.cat(values[key]) for key in order if key in values}


def _stages(runner: Any) -> dict[str, int]:
    """Which stage computes each hook point (and the logits), on a Tracer; else nothing."""
    if not isinstance(runner, Tracer):
        return {}
    stage_names = runner.coordinator.stage_names
    return {"logits": len(stage_names) - 1, **{name: s for s, names in enumerate(stage_names) for name in names}}


def _difference(key: str, theirs: Tensor, ours: Tensor, tolerance: float, stage: Optional[int]) -> Difference:
    if theirs.shape != ours.shape:
        raise VerificationError(f"{key} has {theirs.numel()} values on the cluster but {ours.numel()} in one process")
    gap = (theirs - ours).abs()
    difference = math.nan if gap.isnan().any() else float(gap.max())
    scale = float(ours.abs().max())
    return Difference(key, difference, scale, tolerance * max(1.0, scale), stage)
