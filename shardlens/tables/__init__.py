"""Tables: the cache of one run and its Arrow / Parquet forms (torch and pyarrow only)."""

from shardlens.tables.cache import ActivationCache
from shardlens.tables.parquet import ParquetSink, read_cache

__all__ = ["ActivationCache", "ParquetSink", "read_cache"]
