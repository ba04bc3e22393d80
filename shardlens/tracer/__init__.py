"""Tracer: the user-facing layer (Tracer, sweeps, attribution, the CLI)."""

from shardlens.tracer import attribution, patching
from shardlens.tracer.tracer import Tracer

__all__ = ["Tracer", "attribution", "patching"]
