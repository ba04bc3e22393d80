"""ActivationCache: what one run cached, by hook name."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Union

import torch
from torch import Tensor

from shardlens.errors import HookNameError


class ActivationCache(Mapping[str, Tensor]):
    """The activations one run cached, by hook name; gradients under ``<name>_grad``.

    A read-only mapping: it is a value scoped to one run, not state a later run writes into.

    Example:
        >>> logits, cache = model.run_with_cache(tokens)
        >>> cache["blocks.0.hook_resid_post"].shape
        torch.Size([2, 7, 64])
    """

    def __init__(self, tensors: Mapping[str, Tensor]):
        self._tensors = dict(tensors)

    def __getitem__(self, name: str) -> Tensor:
        try:
            return self._tensors[name]
        except KeyError:
            raise HookNameError(name, self._tensors, what="cache entry named") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def to(self, device: Union[str, torch.device]) -> "ActivationCache":
        """A copy of this cache with every tensor on `device`."""
        return ActivationCache({name: t.to(device) for name, t in self._tensors.items()})

    def __repr__(self) -> str:
        rows = [f"  {name}: {list(t.shape)} {str(t.dtype).removeprefix('torch.')}" for name, t in self._tensors.items()]
        return f"ActivationCache({len(self)} entries" + (":\n" + "\n".join(rows) + "\n)" if rows else ")")
