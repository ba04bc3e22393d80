"""Slice: TransformerLens' position-slice value, used by run_with_cache(pos_slice=...)."""

from __future__ import annotations

from typing import Union

import numpy as np
import torch

SliceInput = Union[int, tuple, list, slice, torch.Tensor, np.ndarray, None]


class Slice:
    """One selection along one axis, with TransformerLens' semantics.

    - ``None``: identity.
    - ``int`` i: ``tensor[i]`` along the axis (the axis is dropped). `Slice.unwrap` turns a
      bare int into ``[i]`` first, so ``run_with_cache(pos_slice=3)`` keeps the position axis.
    - ``tuple``: ``slice(*t)``, so ``(k,)`` is ``:k``, ``(a, b)`` is ``a:b``, ``(a, b, s)``
      is ``a:b:s``. A Python ``slice`` is used as it is.
    - list, 1-D tensor or array of ints: those indices, in that order (a boolean mask:
      where it is True).

    Example:
        >>> Slice.unwrap(-1).apply(torch.zeros(2, 5, 8), dim=-2).shape
        torch.Size([2, 1, 8])
    """

    def __init__(self, input_slice: SliceInput = None):
        if input_slice is None:
            self.mode, self.slice = "identity", slice(None)
        elif isinstance(input_slice, bool):
            raise TypeError(f"pos_slice must be an int, tuple, slice, list or array, got {input_slice!r}")
        elif isinstance(input_slice, int):
            self.mode, self.slice = "int", input_slice
        elif isinstance(input_slice, tuple):
            self.mode, self.slice = "slice", slice(*input_slice)
        elif isinstance(input_slice, slice):
            self.mode, self.slice = "slice", input_slice
        elif isinstance(input_slice, (list, torch.Tensor, np.ndarray)):
            index = torch.as_tensor(input_slice).cpu()
            if index.dtype == torch.bool:
                index = index.nonzero().flatten()  # a boolean mask selects where it is True
            if index.ndim != 1 or index.is_floating_point() or index.is_complex():
                raise TypeError(
                    f"an index pos_slice must be a 1-D list of ints or a boolean mask, got "
                    f"shape {tuple(index.shape)} and dtype {index.dtype}"
                )
            self.mode, self.slice = "array", index.long()
        else:
            raise TypeError(
                f"pos_slice must be None, an int, a tuple, a slice, or a list/tensor/array of "
                f"indices; got {type(input_slice).__name__}"
            )

    @classmethod
    def unwrap(cls, input_slice: "Slice | SliceInput") -> "Slice":
        """A Slice from any slice input; a bare int becomes ``[i]`` so the axis is kept."""
        if isinstance(input_slice, Slice):
            return input_slice
        if isinstance(input_slice, int) and not isinstance(input_slice, bool):
            input_slice = [input_slice]
        return cls(input_slice)

    def apply(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """`tensor` with this selection applied along `dim` (negative dims allowed)."""
        if self.mode == "identity":
            return tensor
        index: list = [slice(None)] * tensor.ndim
        index[dim] = self.slice.to(tensor.device) if self.mode == "array" else self.slice
        return tensor[tuple(index)]

    def indices(self, max_ctx: int | None = None) -> np.ndarray:
        """The indices this selection takes from an axis of length `max_ctx`."""
        if self.mode == "int":
            return np.array([self.slice], dtype=np.int64)
        if self.mode == "array":
            return self.slice.numpy()
        if max_ctx is None:
            raise ValueError(f"max_ctx is needed to list the indices of a {self.mode} Slice")
        return np.arange(max_ctx, dtype=np.int64)[self.slice]

    def __repr__(self) -> str:
        shown = self.slice.tolist() if self.mode == "array" else self.slice
        return f"Slice({shown!r}, mode={self.mode!r})"
