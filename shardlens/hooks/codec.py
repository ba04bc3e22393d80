"""JSON encoding of specs and ops: tensors travel as safetensors bytes, never pickle.

A value is encoded as plain JSON where it is JSON already; otherwise as a one-key object:
``{"__tensor__": base64 safetensors}``, ``{"__slice__": [start, stop, step]}``, or, for a
registered frozen dataclass, ``{"__type__": "Patch", ...fields}``. Decoding builds only
registered types and tensors: it never executes code (`sl.ops.Code`, which holds a Python
callable, is decoded only when the caller passes allow_code=True).
"""

from __future__ import annotations

import base64
import dataclasses
from typing import Any

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

_TYPES: dict[str, type] = {}


def serializable(cls: type) -> type:
    """Register a frozen dataclass so that encode / decode can carry it by its name."""
    if cls.__name__ in _TYPES and _TYPES[cls.__name__] is not cls:
        raise TypeError(f"two serializable types are named {cls.__name__!r}")
    _TYPES[cls.__name__] = cls
    return cls


def encode(value: Any, *, allow_code: bool = False) -> Any:
    """`value` as JSON-compatible data."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor):
        data = save_tensors({"tensor": value.detach().cpu().contiguous()})
        return {"__tensor__": base64.b64encode(data).decode("ascii")}
    if isinstance(value, slice):
        return {"__slice__": [value.start, value.stop, value.step]}
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, (list, tuple, range)):
        return [encode(v, allow_code=allow_code) for v in value]
    if isinstance(value, dict):
        return {str(k): encode(v, allow_code=allow_code) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and type(value).__name__ in _TYPES:
        to_fields = getattr(value, "encode_fields", None)
        fields = to_fields(allow_code) if to_fields else {
            f.name: encode(getattr(value, f.name), allow_code=allow_code) for f in dataclasses.fields(value)
        }
        return {"__type__": type(value).__name__, **fields}
    raise TypeError(f"cannot encode a {type(value).__name__} in a hook spec: {value!r}")


def decode(data: Any, *, allow_code: bool = False) -> Any:
    """The value `encode` produced `data` from (lists come back as tuples)."""
    if isinstance(data, list):
        return tuple(decode(v, allow_code=allow_code) for v in data)
    if not isinstance(data, dict):
        return data
    if "__tensor__" in data:
        try:
            return load_tensors(base64.b64decode(data["__tensor__"]))["tensor"]
        except Exception as error:  # safetensors' own error type is a bare Exception
            raise ValueError(f"a tensor in a hook spec is not safetensors bytes holding one 'tensor': {error}") from None
    if "__slice__" in data:
        return slice(*data["__slice__"])
    if "__type__" in data:
        name = data["__type__"]
        cls = _TYPES.get(name)
        if cls is None:
            raise ValueError(f"unknown type {name!r} in a hook spec; known: {', '.join(sorted(_TYPES))}")
        fields = {k: v for k, v in data.items() if k != "__type__"}
        from_fields = getattr(cls, "decode_fields", None)
        if from_fields:
            return from_fields(fields, allow_code)
        return cls(**{k: decode(v, allow_code=allow_code) for k, v in fields.items()})
    return {k: decode(v, allow_code=allow_code) for k, v in data.items()}


def values_equal(a: Any, b: Any) -> bool:
    """Equality that compares tensors by dtype, shape and values."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.cpu(), b.cpu())
        )
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(values_equal(x, y) for x, y in zip(a, b))
    return a == b
