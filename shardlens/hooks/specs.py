"""HookSpec: a frozen, serialisable description of what to do at which hook points.

Closures cannot be audited, stored or re-sent to a restarted worker; specs can. A spec
names hook points (a name, a glob, a list, or a `points(...)` selector) and holds one op.

Example:
    >>> spec = sl.HookSpec("blocks.*.hook_resid_post", sl.ops.Cache(positions=-1))
    >>> sl.HookSpec.from_json(spec.to_json()) == spec
    True
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
from collections.abc import Collection, Sequence
from dataclasses import KW_ONLY, dataclass
from typing import Any, Optional, Union

from shardlens.errors import HookNameError
from shardlens.hooks.codec import decode, encode, serializable
from shardlens.hooks.names import is_glob
from shardlens.hooks.ops import Op, RunContext, normalize_index


@serializable
@dataclass(frozen=True)
class Points:
    """Hook points by kind and layer: ``points(kind="resid_post", layers=range(4, 8))``
    selects ``blocks.4.hook_resid_post`` … ``blocks.7.hook_resid_post``.

    `kind` is the hook name's last part without ``hook_`` ("resid_post", "z", "pattern",
    "scale", …); `layers` None selects every layer and the points outside blocks.
    """

    kind: str
    _: KW_ONLY
    layers: Optional[tuple] = None

    def __post_init__(self) -> None:
        if not isinstance(self.kind, str) or not self.kind:
            raise ValueError(f"points: kind must be a non-empty string such as 'resid_post'; got {self.kind!r}")
        if self.layers is not None:
            layers = normalize_index(self.layers, "layers")
            object.__setattr__(self, "layers", (layers,) if isinstance(layers, int) else tuple(range(layers.stop)[layers]) if isinstance(layers, slice) else layers)

    def matches(self, name: str) -> bool:
        if not name.rsplit(".", 1)[-1] == f"hook_{self.kind}":
            return False
        if self.layers is None:
            return True
        parts = name.split(".")
        return len(parts) > 2 and parts[0] == "blocks" and parts[1].isdigit() and int(parts[1]) in self.layers

    def example(self) -> str:
        return f"blocks.{self.layers[0]}.hook_{self.kind}" if self.layers else f"hook_{self.kind}"


def points(kind: str, *, layers: Any = None) -> Points:
    """A selector of hook points by kind and layers, e.g. points("z", layers=range(2, 4))."""
    return Points(kind, layers=layers)


PointsSelector = Union[str, tuple, Points]
_DIRECTIONS = ("fwd", "bwd")


@serializable
@dataclass(frozen=True)
class HookSpec:
    """What to do (`op`) at which hook points (`points`).

    Args:
        points: a hook name, a glob ("blocks.*.hook_resid_post"), a list of names and globs,
            or a `points(kind=..., layers=...)` selector.
        op: an op from `sl.ops`.
        dir: "fwd" or "bwd"; by default the op's own direction (CacheGrad, ScaleGrad and
            StopGrad act on gradients).
        level: the context level the spec belongs to (None: none); inside a hooks() block the
            block's level is used.
        permanent: survives reset_hooks(), like TransformerLens' permanent hooks.
        prepend: run before the hooks already at those points.
    """

    points: Any
    op: Op
    _: KW_ONLY
    dir: Optional[str] = None
    level: Optional[int] = None
    permanent: bool = False
    prepend: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "points", _normalize_points(self.points))
        if not isinstance(self.op, Op):
            raise ValueError(f"op must be an op from sl.ops (e.g. sl.ops.Cache()); got {type(self.op).__name__}")
        direction = self.op.direction if self.dir is None else self.dir
        if direction not in _DIRECTIONS:
            raise ValueError(f"dir must be 'fwd' or 'bwd'; got {self.dir!r}")
        if direction != self.op.direction and not self.op.either_direction:
            kind = "gradients" if self.op.direction == "bwd" else "activations"
            raise ValueError(f"dir={direction!r}, but {type(self.op).__name__} acts on {kind} (dir={self.op.direction!r})")
        object.__setattr__(self, "dir", direction)
        if self.level is not None and (not isinstance(self.level, int) or isinstance(self.level, bool) or self.level < 0):
            raise ValueError(f"level must be None or a non-negative int; got {self.level!r}")
        if self.permanent and self.level is not None:
            raise ValueError(f"a permanent spec has no context level; got level={self.level}")
        for name in ("permanent", "prepend"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False; got {getattr(self, name)!r}")

    def resolve(self, names: Collection[str]) -> list[str]:
        """The hook names this spec matches among `names`, in their order.

        Raises HookNameError, with the closest names, for a name or glob that matches none.
        """
        selectors = self.points if isinstance(self.points, tuple) else (self.points,)
        # Exact names by set lookup: a run_with_cache spec names every hook point of a model.
        exact = {s for s in selectors if isinstance(s, str) and not is_glob(s)}
        patterns = [s for s in selectors if s not in exact]
        known = set(names)
        for selector in selectors:
            if selector in exact and selector in known or selector not in exact and any(_matches(selector, name) for name in names):
                continue
            if isinstance(selector, Points):
                raise HookNameError(selector.example(), names, what=f"hook point matches points({selector.kind!r}, layers={selector.layers}), e.g.")
            what = "hook point matches the glob" if is_glob(selector) else "hook point named"
            raise HookNameError(selector, names, what=what)
        return [name for name in names if name in exact or any(_matches(p, name) for p in patterns)]

    def to_json(self, *, allow_code: bool = False) -> str:
        """This spec as JSON; tensors inside travel as safetensors bytes (base64)."""
        return json.dumps(encode(self, allow_code=allow_code), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, *, allow_code: bool = False) -> "HookSpec":
        """The spec `to_json` wrote. Builds only known op types and tensors: no code runs,
        unless allow_code=True accepts an sl.ops.Code (pickled Python)."""
        spec = decode(json.loads(text), allow_code=allow_code)
        if not isinstance(spec, cls):
            raise ValueError(f"the JSON holds a {type(spec).__name__}, not a HookSpec")
        return spec

    def with_level(self, level: Optional[int]) -> "HookSpec":
        return dataclasses.replace(self, level=level)

    @property
    def needs_grad(self) -> bool:
        """Whether a run must backpropagate for this spec to act."""
        return self.dir == "bwd" or self.op.needs_grad

    def created_names(self, names: Sequence[str]) -> list[str]:
        """The hook points the op makes where it acts at the points `names` (a Splice's)."""
        return self.op.created_names(names)


def _normalize_points(value: Any) -> PointsSelector:
    if isinstance(value, Points):
        return value
    if isinstance(value, str):
        if not value:
            raise ValueError("points must not be empty")
        return value
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, (str, Points)) for v in value):
        return tuple(value)
    raise ValueError(f"points must be a hook name, a glob, a list of them, or sl.points(...); got {value!r}")


def _matches(selector: Union[str, Points], name: str) -> bool:
    if isinstance(selector, Points):
        return selector.matches(name)
    return fnmatch.fnmatchcase(name, selector) if is_glob(selector) else name == selector


class SpecHook:
    """A spec's op as a TransformerLens hook fn(tensor, hook). It acts in the context of the
    run it fires in (`root.run_context`), with the store and sources it was installed with,
    if any, in place of the run's (a plain module's forward runs outside any run)."""

    def __init__(self, spec: HookSpec, root: Any, store: Optional[dict] = None, sources: Optional[Any] = None):
        self.spec, self.op, self.root, self.store, self.sources = spec, spec.op, root, store, sources

    def __call__(self, tensor: Any, hook: Any) -> Any:
        ctx = self.root.run_context
        if self.store is not None or self.sources:
            ctx = RunContext(ctx.root, self.store if self.store is not None else ctx.cache, {**ctx.sources, **(self.sources or {})}, ctx.carried)
        try:
            return self.op(tensor, hook, ctx)
        except Exception as error:
            # Unchanged for a caller in this process; a stage worker reads where it happened.
            if not hasattr(error, "shardlens_hook"):
                error.shardlens_hook = hook.name
            raise

    def __repr__(self) -> str:
        return f"SpecHook({self.op!r})"
