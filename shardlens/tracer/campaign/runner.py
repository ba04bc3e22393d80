"""What a campaign runs on: the Tracer its model and cluster sections describe, and the
metric of a batch of its data."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from shardlens.hooks import metrics
from shardlens.tracer.campaign.cost import campaign_microbatch
from shardlens.tracer.campaign.schema import Campaign
from shardlens.tracer.tracer import Tracer


def start_tracer(campaign: Campaign) -> Tracer:
    """The Tracer the campaign's model and cluster sections describe."""
    cluster = campaign.cluster
    return Tracer.from_pretrained(
        campaign.model_source, stages=cluster.get("stages", 1), replicas=cluster.get("replicas", 1),
        backend=cluster.get("backend", "ray"), address=cluster.get("address"),
        dtype=getattr(torch, campaign.model["dtype"]) if "dtype" in campaign.model else None, max_memory=cluster.get("max_memory"),
        microbatch_size=campaign_microbatch(campaign), stage_resources=cluster.get("stage_resources"),
    )


@contextmanager
def spliced(campaign: Campaign, runner: Any) -> Iterator[Any]:
    """`runner` with the campaign's dictionaries spliced in (a context level), for the block."""
    specs = campaign.dictionary_specs()
    if not specs:
        yield runner
        return
    with runner.hooks(fwd_hooks=specs):
        yield runner


def batch_metric(campaign: Campaign, tensors: dict) -> Any:
    """The campaign's metric for a batch of its data (answer / wrong token ids per example)."""
    kind = campaign.metric.get("kind", "logit_diff")
    if kind == "logit_diff":
        return metrics.logit_diff(tensors["answer"], tensors["wrong"])
    if kind in ("prob", "log_prob"):
        return getattr(metrics, kind)(tensors["answer"])
    return metrics.loss()
