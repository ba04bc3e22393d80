"""A Python callable as an op; it serialises only when the caller allows code."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Optional

from torch import Tensor

from shardlens.hooks.ops.base import Op
from shardlens.hooks.ops.context import RunContext


@dataclass(frozen=True, eq=False)
class Code(Op):
    """A Python callable as an op, called TransformerLens-style: fn(tensor, hook=hook).

    It runs in one process like any hook. Serialising it pickles code (cloudpickle), which
    whoever reads it would execute, so to_json / from_json refuse it unless given
    allow_code=True.
    """

    either_direction: ClassVar[bool] = True
    fn: Callable

    def __post_init__(self) -> None:
        if not callable(self.fn):
            raise ValueError(f"Code(fn) takes a callable; got {type(self.fn).__name__}")

    def __call__(self, tensor: Tensor, hook: Any, ctx: RunContext) -> Optional[Tensor]:
        return self.fn(tensor, hook=hook)

    def encode_fields(self, allow_code: bool) -> dict:
        if not allow_code:
            raise ValueError(
                "sl.ops.Code holds a Python callable: serialising it pickles code that the reader would "
                "execute. Use declarative ops, or pass allow_code=True if you trust every reader"
            )
        import cloudpickle

        return {"pickle": base64.b64encode(cloudpickle.dumps(self.fn)).decode("ascii")}

    @classmethod
    def decode_fields(cls, fields: dict, allow_code: bool) -> "Code":
        if not allow_code:
            raise ValueError("this spec holds sl.ops.Code (pickled Python code); reading it would execute it: pass allow_code=True to accept")
        import pickle

        return cls(pickle.loads(base64.b64decode(fields["pickle"])))
