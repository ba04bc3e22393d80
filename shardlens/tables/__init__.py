"""Tables: the cache of one run and its Arrow / Parquet forms (torch and pyarrow only)."""

from shardlens.tables.cache import ActivationCache
from shardlens.tables.parquet import ParquetSink, read_cache
from shardlens.tables.views import Context, Heatmap, View, attention_view, contexts_view, grid_view, page, top_contexts_view
from shardlens.tables.datasets import DatasetFile, DatasetManifest, DatasetSpec, DatasetWriter, read_manifest, verify_dataset

__all__ = [
    "ActivationCache", "Context", "DatasetFile", "DatasetManifest", "DatasetSpec", "DatasetWriter", "Heatmap", "ParquetSink", "View",
    "attention_view", "contexts_view", "grid_view", "page", "read_cache", "read_manifest", "top_contexts_view", "verify_dataset",
]
