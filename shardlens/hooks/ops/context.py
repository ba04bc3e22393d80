"""The per-run store ops act in, and where batch, position and head live in a hook point's tensor."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

from torch import Tensor

from shardlens.tables.axes import head_axis, position_axis


@dataclass
class RunContext:
    """The per-run store that ops read from and write to.

    Attributes:
        root: the hooked module the run belongs to (ops read weights from it, e.g. W_O).
        cache: where reading ops put their results (the run's ActivationCache dict), or None
            when the run keeps no results.
        sources: caches of earlier runs by name, for Patch(from_cache=...).
        carried: what an op acting at two hook points of one run hands from the first to
            the second (a transcoder's latents, from its input point to its output point).
    """

    root: Any
    cache: Optional[dict] = None
    sources: Mapping[str, Mapping[str, Tensor]] = field(default_factory=dict)
    carried: dict = field(default_factory=dict)

    def store(self, key: str, value: Tensor) -> None:
        if self.cache is None:
            raise ValueError(f"a reading op produced {key!r} but this run keeps no results: use run_with_cache, or pass store={{}}")
        self.cache[key] = value


@dataclass(frozen=True)
class Axes:
    batch: int
    pos: int
    head: Optional[int]


def axes_of(name: str) -> Axes:
    """Where batch, position and head live in the tensor of the hook point `name`."""
    return Axes(batch=0, pos=position_axis(name), head=head_axis(name))
