"""Hooks: TransformerLens-compatible hook points for one process (no Ray here)."""

from shardlens.errors import HookNameError
from shardlens.hooks.hook_points import (
    CachingHook,
    HookedRootModule,
    HookIntrospectionMixin,
    HookPoint,
    LensHandle,
)
from shardlens.hooks.model import HookedModel
from shardlens.hooks.names import NamesFilter
from shardlens.hooks import ops
from shardlens.hooks.slice import Slice
from shardlens.hooks.specs import HookSpec, Points, points
from shardlens.hooks.taps import PointOptions

__all__ = [
    "CachingHook",
    "HookedModel",
    "HookedRootModule",
    "HookIntrospectionMixin",
    "HookNameError",
    "HookSpec",
    "HookPoint",
    "LensHandle",
    "NamesFilter",
    "PointOptions",
    "Points",
    "Slice",
    "ops",
    "points",
]
