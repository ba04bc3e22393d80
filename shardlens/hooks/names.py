"""Name filters: which hook points a name, glob, list or predicate selects."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Collection, Sequence
from typing import Union

from shardlens.errors import HookNameError

NamesFilter = Union[Callable[[str], bool], Sequence[str], str, None]

_GLOB_CHARS = frozenset("*?[")


def is_glob(name: str) -> bool:
    """Whether `name` is a glob pattern (contains *, ? or [) rather than an exact name."""
    return not _GLOB_CHARS.isdisjoint(name)


def names_predicate(names_filter: NamesFilter, known: Collection[str]) -> Callable[[str], bool]:
    """A predicate on hook names for a TransformerLens-style names filter.

    `names_filter` is None (every name), a name, a glob such as ``"blocks.*.hook_resid_post"``,
    a list of names and globs, or a predicate (used as it is). Exact names and globs are checked
    against `known`: one that matches nothing raises HookNameError with the closest names, so a
    typo never silently caches nothing.
    """
    if names_filter is None:
        return lambda name: True
    if isinstance(names_filter, str):
        names_filter = [names_filter]
    elif callable(names_filter):
        return names_filter
    if not isinstance(names_filter, (Sequence, set, frozenset)):
        raise TypeError(
            "names_filter must be None, a hook name, a glob, a list of names, or a predicate; "
            f"got {type(names_filter).__name__}"
        )
    exact: set[str] = set()
    patterns: list[str] = []
    for item in names_filter:
        if not isinstance(item, str):
            raise TypeError(f"names_filter lists hook names as strings; got {item!r}")
        if is_glob(item):
            if not any(fnmatch.fnmatchcase(name, item) for name in known):
                raise HookNameError(item, known, what="hook point matches the glob")
            patterns.append(item)
        elif item in known:
            exact.add(item)
        else:
            raise HookNameError(item, known)
    if not patterns:
        return exact.__contains__
    return lambda name: name in exact or any(fnmatch.fnmatchcase(name, p) for p in patterns)
