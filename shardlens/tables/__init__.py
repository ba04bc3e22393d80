"""Tables: the cache of one run and its Arrow / Parquet forms (torch and pyarrow only)."""

from shardlens.tables.cache import ActivationCache

__all__ = ["ActivationCache"]
