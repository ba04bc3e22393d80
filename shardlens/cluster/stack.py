"""SpecStack: the coordinator's truth about which specs are installed, level by level.

Each entry holds one context level's specs and each stage's share of them (as JSON: what
that stage's workers were sent). A worker found restarted is re-sent every entry's share
for its stage; leaving a level removes its entry.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Optional

from shardlens.hooks.hook_point import removed
from shardlens.hooks.specs import HookSpec


@dataclass(frozen=True)
class StackEntry:
    """Specs installed at one context level (None: permanent or level-less), as each stage
    received them: per_stage[s] is a tuple of spec JSON texts."""

    level: Optional[int]
    specs: tuple[HookSpec, ...]
    per_stage: tuple[tuple[str, ...], ...]


class SpecStack:
    """The levels of specs installed on every stage, and the stages' hook names.

    Args:
        stage_names: each stage's hook point names, in stage order.
        allow_code: whether specs may hold sl.ops.Code (pickled Python).
    """

    def __init__(self, stage_names: Sequence[Sequence[str]], *, allow_code: bool = False):
        self.stage_names = [list(names) for names in stage_names]
        self.model_names = [list(names) for names in stage_names]  # before any spec made points
        self.allow_code = allow_code
        self.entries: list[StackEntry] = []

    @property
    def hook_names(self) -> list[str]:
        return [name for names in self.stage_names for name in names]

    def split(self, specs: Sequence[HookSpec], *, check: Optional[Callable] = None) -> tuple[tuple[tuple[str, ...], ...], list[list[str]]]:
        """Each stage's share of the specs (as JSON), and the stages' hook names after them (a
        Splice adds points). Unknown names, and specs check(spec, names) refuses, fail here,
        before anything is sent anywhere."""
        per_stage: list[list[str]] = [[] for _ in self.stage_names]
        known = [list(names) for names in self.stage_names]
        for spec in specs:
            names = spec.resolve([name for stage in known for name in stage])
            if check is not None:
                check(spec, names)
            for s, stage_names in enumerate(known):
                mine = [name for name in names if name in stage_names]
                if mine:
                    per_stage[s].append(dataclasses.replace(spec, points=tuple(mine)).to_json(allow_code=self.allow_code))
                    stage_names += [name for name in spec.created_names(mine) if name not in stage_names]  # made once
        return tuple(tuple(share) for share in per_stage), known

    def push(self, level: Optional[int], specs: Sequence[HookSpec], per_stage: tuple, known: list[list[str]]) -> None:
        """Record specs the stages accepted (per_stage and known as `split` gave them)."""
        self.entries.append(StackEntry(level, tuple(specs), per_stage))
        self.stage_names = known

    def remove(self, level: Optional[int], *, including_permanent: bool = False, direction: str = "both") -> None:
        """Forget the non-permanent specs of `level` (of every level when None) in `direction`,
        or with including_permanent every spec, as the workers' remove does."""
        kept, made_points = [], False
        for entry in self.entries:
            specs = [s for s in entry.specs if not _removed(s, entry.level, level, including_permanent, direction)]
            made_points |= any(s.op.creates_points for s in entry.specs if not any(s is k for k in specs))
            if len(specs) == len(entry.specs):
                kept.append(entry)
            elif specs:
                kept.append(StackEntry(entry.level, tuple(specs), self.split(specs)[0]))
        self.entries = kept
        if made_points:  # the points a removed spec made (a Splice's) are gone with it
            self.stage_names = [list(names) for names in self.model_names]
            for entry in self.entries:
                self.stage_names = self.split(entry.specs)[1]

    def for_stage(self, stage: int) -> list[tuple[Optional[int], tuple[str, ...]]]:
        """What a restarted worker of `stage` must be sent again: (level, specs JSON), in order."""
        return [(entry.level, entry.per_stage[stage]) for entry in self.entries if entry.per_stage[stage]]

    def installed(self) -> list[tuple[str, HookSpec]]:
        """Every installed spec, once per hook point it acts at (as a spec of that point), with
        its level."""
        names = self.hook_names
        return [
            (name, dataclasses.replace(spec, points=name, level=None if spec.permanent else entry.level))
            for entry in self.entries for spec in entry.specs for name in spec.resolve(names)
        ]

    def needs_grad(self) -> bool:
        """Whether a run must backpropagate for some installed spec to act."""
        return any(spec.needs_grad for entry in self.entries for spec in entry.specs)


def _removed(spec: HookSpec, level: Optional[int], asked: Optional[int], including_permanent: bool, direction: str) -> bool:
    if direction not in ("both", spec.dir):
        return False
    return removed(permanent=spec.permanent, level=level, asked=asked, including_permanent=including_permanent)
