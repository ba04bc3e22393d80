"""Cluster: stage workers on Ray actors, the coordinator, and the in-process backend."""
