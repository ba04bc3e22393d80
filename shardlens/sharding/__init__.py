"""Sharding: plan a model's layers over stages and devices, build one stage, estimate what a run costs (no Ray here)."""

from shardlens.errors import ShardPlanError
from shardlens.sharding.estimate import Estimate, StageCost, estimate, fit_microbatch
from shardlens.sharding.plan import ShardPlan, StagePlan
from shardlens.sharding.stage import Stage, StageIO, build_stage

__all__ = ["Estimate", "ShardPlan", "ShardPlanError", "Stage", "StageCost", "StageIO", "StagePlan", "build_stage", "estimate", "fit_microbatch"]
