"""Tracer: the user-facing layer (Tracer, sweeps, attribution, campaigns, the CLI)."""

from shardlens.tracer.tracer import Tracer

__all__ = ["Tracer"]
