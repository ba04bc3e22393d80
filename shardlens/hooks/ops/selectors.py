"""Selectors: positions, heads and batch as normalised indices, and the tensor indices they give."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Union

import torch
from torch import Tensor

Index = Union[None, int, slice, tuple]  # normalised selector


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def normalize_index(value: Any, field_name: str, *, groups: bool = False) -> Index:
    """A selector as None, int, slice, tuple of ints, or (with groups) tuple of int tuples."""
    if value is None or is_int(value) or isinstance(value, slice):
        return value
    if isinstance(value, Tensor):
        value = value.tolist()
    if isinstance(value, (list, tuple, range)):
        items = list(value)
        if items and all(isinstance(v, (list, tuple, range)) for v in items):
            if not groups:
                raise ValueError(f"{field_name} takes an int, a slice or a list of ints; token groups only for positions")
            normalized = tuple(tuple(normalize_index(list(g), field_name)) for g in items)
            if any(not g for g in normalized):
                raise ValueError(f"{field_name}: a token group is empty")
            return normalized
        if all(is_int(v) for v in items):
            return tuple(items)
    raise ValueError(f"{field_name} must be an int, a slice, a list of ints{' or a list of index lists' if groups else ''}; got {value!r}")


def is_groups(index: Index) -> bool:
    return isinstance(index, tuple) and bool(index) and isinstance(index[0], tuple)


def flat(index: Index) -> Index:
    """Token groups as one list of positions; other selectors unchanged."""
    return tuple(p for group in index for p in group) if is_groups(index) else index


def _axis_indices(index: Index, size: int, device: torch.device) -> Tensor:
    if index is None:
        return torch.arange(size, device=device)
    if is_int(index):
        return torch.tensor([index], device=device)
    if isinstance(index, slice):
        return torch.arange(size, device=device)[index]
    return torch.tensor(flat(index), dtype=torch.long, device=device)


def outer_index(tensor: Tensor, selections: Mapping[int, Index]) -> tuple:
    """An index that takes the outer product of the selections (axis -> selector), keeping
    every axis: usable to read (tensor[idx]) and to write (tensor[idx] = values)."""
    chosen = {axis: index for axis, index in selections.items() if index is not None}
    if not chosen:
        return (Ellipsis,)
    n = max(chosen) + 1
    index = []
    for axis in range(n):
        indices = _axis_indices(chosen.get(axis), tensor.shape[axis], tensor.device)
        shape = [1] * n
        shape[axis] = -1
        index.append(indices.view(shape))
    return tuple(index)


def check_sizes(selector: Index, size: int, what: str, name: str) -> None:
    values = [selector] if is_int(selector) else (flat(selector) if isinstance(selector, tuple) else [])
    bad = [v for v in values if not -size <= v < size]
    if bad:
        raise IndexError(f"{name}: {what} {bad} out of range for an axis of {size}")


def as_list(index: Index, field_name: str) -> tuple:
    if is_int(index):
        return (index,)
    if isinstance(index, tuple):
        return index
    raise ValueError(f"{field_name} must be ints or groups of ints; got {index!r}")
