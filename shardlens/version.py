"""The version of shardlens: a leaf module (it imports nothing), so that every layer may read it."""

__version__ = "0.1.0"
