"""Tables: the cache of one run and its Arrow / Parquet forms (torch and pyarrow only)."""

from shardlens.tables.cache import ActivationCache
from shardlens.tables.parquet import ParquetSink, read_cache
from shardlens.tables.datasets import DatasetFile, DatasetManifest, DatasetSpec, DatasetWriter, read_manifest, verify_dataset

__all__ = [
    "ActivationCache", "DatasetFile", "DatasetManifest", "DatasetSpec", "DatasetWriter", "ParquetSink", "read_cache", "read_manifest",
    "verify_dataset",
]
