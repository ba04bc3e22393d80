"""shardlens: trace transformer models too large for one GPU, with TransformerLens' hook API.

The public names of the package are the ones listed here.
"""

from shardlens.errors import HookNameError, ParquetWriteError, RemoteHookError, ShardError, ShardPlanError, WorkerError
from shardlens.hooks import dictionaries, metrics
from shardlens.hooks.generation import KeyValueCache
from shardlens.hooks import (
    HookedModel,
    HookedRootModule,
    HookIntrospectionMixin,
    HookPoint,
    HookSpec,
    LensHandle,
    PointOptions,
    Points,
    RunRequest,
    RunResult,
    Runner,
    Slice,
    ops,
    points,
)
from shardlens.sharding import ShardPlan, build_stage
from shardlens.tables import ActivationCache, ParquetSink, ShardSpec, ShardWriter, read_cache, verify_shards
from shardlens.tracer import Tracer, attribution, patching

from shardlens.version import __version__

__all__ = [
    "ActivationCache",
    "HookedModel",
    "HookedRootModule",
    "HookIntrospectionMixin",
    "HookNameError",
    "HookPoint",
    "HookSpec",
    "KeyValueCache",
    "LensHandle",
    "ParquetSink",
    "ParquetWriteError",
    "PointOptions",
    "Points",
    "RemoteHookError",
    "RunRequest",
    "RunResult",
    "Runner",
    "ShardError",
    "ShardPlan",
    "ShardPlanError",
    "ShardSpec",
    "ShardWriter",
    "Slice",
    "Tracer",
    "WorkerError",
    "__version__",
    "attribution",
    "build_stage",
    "dictionaries",
    "metrics",
    "patching",
    "read_cache",
    "verify_shards",
    "ops",
    "points",
]
