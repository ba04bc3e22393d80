"""Sharding: plan a model's layers over stages and devices, build one stage (no Ray here)."""
