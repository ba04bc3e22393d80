"""Hooks: TransformerLens-compatible hook points for one process (no Ray here)."""

from shardlens.errors import HookNameError
from shardlens.hooks.hook_api import HookAPI, Runner
from shardlens.hooks.hook_point import HookPoint, LensHandle
from shardlens.hooks.root_module import CachingHook, HookedRootModule, HookIntrospectionMixin
from shardlens.hooks.run import BaseRun, Destination, Resume, RunRequest, RunResult
from shardlens.hooks.model import HookedModel
from shardlens.hooks.names import NamesFilter
from shardlens.hooks import dictionaries, ops
from shardlens.hooks.slice import Slice
from shardlens.hooks.specs import HookSpec, Points, points
from shardlens.hooks.taps import PointOptions

__all__ = [
    "CachingHook",
    "Destination",
    "HookAPI",
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
    "Resume",
    "BaseRun",
    "RunRequest",
    "RunResult",
    "Runner",
    "Slice",
    "dictionaries",
    "ops",
    "points",
]
