"""shardlens: trace transformer models too large for one GPU, with TransformerLens' hook API.

The public names of the package are the ones listed here.
"""

from shardlens import progress
from shardlens.errors import DatasetError, HookNameError, ModelSourceError, ParquetWriteError, RemoteHookError, ServiceError, ShardPlanError, WorkerError
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
from shardlens.tables import ActivationCache, DatasetManifest, DatasetSpec, DatasetWriter, ParquetSink, read_cache, verify_dataset
from shardlens.tracer import Tracer, attribution, patching
from shardlens.serve import connect

from shardlens.version import __version__

__all__ = [
    "ActivationCache",
    "DatasetError",
    "DatasetManifest",
    "DatasetSpec",
    "DatasetWriter",
    "HookedModel",
    "HookedRootModule",
    "HookIntrospectionMixin",
    "HookNameError",
    "HookPoint",
    "HookSpec",
    "KeyValueCache",
    "LensHandle",
    "ModelSourceError",
    "ParquetSink",
    "ParquetWriteError",
    "PointOptions",
    "Points",
    "RemoteHookError",
    "RunRequest",
    "RunResult",
    "Runner",
    "ServiceError",
    "ShardPlan",
    "ShardPlanError",
    "Slice",
    "Tracer",
    "WorkerError",
    "__version__",
    "attribution",
    "build_stage",
    "connect",
    "dictionaries",
    "metrics",
    "patching",
    "progress",
    "read_cache",
    "verify_dataset",
    "ops",
    "points",
]
