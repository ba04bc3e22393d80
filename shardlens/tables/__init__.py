"""Tables: the cache of one run and its Arrow / Parquet forms (torch and pyarrow only)."""

from shardlens.tables.cache import ActivationCache
from shardlens.tables.parquet import ParquetSink, read_cache
from shardlens.tables.shards import ShardSpec, ShardWriter, read_manifest, verify_shards

__all__ = ["ActivationCache", "ParquetSink", "ShardSpec", "ShardWriter", "read_cache", "read_manifest", "verify_shards"]
