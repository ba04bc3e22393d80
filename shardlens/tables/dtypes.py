"""bfloat16, which numpy and Arrow lack, as its 16-bit patterns: the one place that turns
tensors into numpy arrays and back (Arrow and Parquet tables, activation datasets, a stage's
results crossing processes).

A bfloat16 tensor becomes a uint16 array of the same bytes; an Arrow field of such values
carries `shardlens.dtype=bfloat16` in its metadata, so a reader restores the dtype.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

DTYPE_KEY = b"shardlens.dtype"  # Arrow field metadata: the torch dtype of values stored as bits
BFLOAT16 = "bfloat16"


def normalize_dtype(value: Any, field_name: str) -> Optional[str]:
    """A torch dtype or its name ("bfloat16", "torch.float32") as its name; None stays None.
    Raises ValueError naming `field_name` for anything else."""
    if value is None:
        return None
    name = str(value).removeprefix("torch.")
    if not isinstance(getattr(torch, name, None), torch.dtype):
        raise ValueError(f"{field_name} must be a torch dtype or its name (e.g. 'bfloat16'); got {value!r}")
    return name


def to_numpy(tensor: Tensor) -> np.ndarray:
    """A CPU tensor as a numpy array over the same memory (no copy); bfloat16 as uint16 bits."""
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(np.uint16)
    return tensor.numpy()


def from_numpy(array: np.ndarray, dtype: Optional[str] = None) -> Tensor:
    """The tensor over a numpy array (no copy): with dtype "bfloat16", its 16-bit patterns
    read as bfloat16 (the inverse of `to_numpy`); otherwise the array's own dtype."""
    if dtype == BFLOAT16:
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)  # via int16: torch < 2.3 has no uint16
    return torch.from_numpy(array)


def field_metadata(dtype: torch.dtype) -> dict[bytes, bytes]:
    """The metadata of an Arrow field holding `to_numpy`'s values of a tensor of `dtype`:
    the mark of bfloat16 bits, or none."""
    return {DTYPE_KEY: BFLOAT16.encode()} if dtype == torch.bfloat16 else {}


def field_dtype(field: pa.Field) -> Optional[str]:
    """"bfloat16" for a field whose values are bfloat16 bits; None for values of their own dtype."""
    marked = (field.metadata or {}).get(DTYPE_KEY)
    return None if marked is None else marked.decode()
