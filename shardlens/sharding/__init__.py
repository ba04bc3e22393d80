"""Sharding: plan a model's layers over stages and devices, build one stage (no Ray here)."""

from shardlens.errors import ShardPlanError
from shardlens.sharding.plan import ShardPlan, StagePlan
from shardlens.sharding.stage import Stage, StageIO, build_stage

__all__ = ["ShardPlan", "ShardPlanError", "Stage", "StageIO", "StagePlan", "build_stage"]
