"""Tracer: the user-facing layer (Tracer, sweeps, attribution, campaigns, the CLI)."""
