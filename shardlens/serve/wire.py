"""What travels between a client and the tracing service: requests as JSON, results as Arrow IPC.

A request is JSON built by `shardlens.hooks.codec` (tensors inside it travel as safetensors
bytes, never pickle); the server decodes it without `allow_code`, so an `sl.ops.Code` is
refused whatever the client sends. Results are an Arrow IPC stream of tensor records, one
record batch per piece of at most CHUNK_BYTES, so that a large cache streams instead of
being held whole in one message:

    entry: string      which tensor ("0/output", "0/cache/blocks.0.hook_resid_post", ...)
    dtype: string      its torch dtype ("float32", "bfloat16", ...)
    shape: list<int64> its shape
    data:  large_binary a piece of its raw bytes, in order

The stream's schema metadata holds `shardlens.meta`, a JSON object the caller chooses.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, BinaryIO

import pyarrow as pa
import torch
from torch import Tensor

from shardlens.tables.dtypes import normalize_dtype

CHUNK_BYTES = 8 << 20  # one record batch holds at most this much of a tensor's bytes
SEND_BYTES = 1 << 20  # the stream is handed on in pieces of at least this much (each piece costs a hop)
META_KEY = b"shardlens.meta"
JOB_HEADER = "X-Shardlens-Job"  # the HTTP header naming the job whose result a stream is
SCHEMA = pa.schema([("entry", pa.string()), ("dtype", pa.string()), ("shape", pa.list_(pa.int64())), ("data", pa.large_binary())])


def tensor_bytes(tensor: Tensor) -> memoryview:
    """The raw bytes of a tensor (on the CPU, contiguous), without a copy where it is one already."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def encode_tensors(entries: Iterable[tuple[str, Tensor]], meta: Mapping[str, Any]) -> Iterator[bytes]:
    """An Arrow IPC stream of `entries`, in pieces of at least SEND_BYTES (the last one
    smaller), with `meta` in its schema metadata."""
    sink = _Chunks()
    schema = SCHEMA.with_metadata({META_KEY: json.dumps(meta).encode()})
    with pa.ipc.new_stream(sink, schema) as writer:
        for name, tensor in entries:
            dtype, shape, data = str(tensor.dtype).removeprefix("torch."), list(tensor.shape), tensor_bytes(tensor)
            for start in range(0, max(len(data), 1), CHUNK_BYTES):
                writer.write_batch(pa.record_batch([pa.array([name]), pa.array([dtype]), pa.array([shape], pa.list_(pa.int64())),
                                                    _binary(data[start:start + CHUNK_BYTES])], schema=schema))
                if sink.size >= SEND_BYTES:
                    yield sink.take()
    yield sink.take()


def _binary(data: memoryview) -> pa.Array:
    """A one-row large_binary array over `data` (no copy)."""
    offsets = pa.py_buffer(torch.tensor([0, len(data)], dtype=torch.int64).numpy().tobytes())
    return pa.Array.from_buffers(pa.large_binary(), 1, [None, offsets, pa.py_buffer(data)])


def decode_tensors(source: BinaryIO | bytes) -> tuple[dict[str, Tensor], dict]:
    """The entries and meta of a stream `encode_tensors` wrote, read as it arrives."""
    reader = pa.ipc.open_stream(source)
    meta = json.loads((reader.schema.metadata or {}).get(META_KEY, b"{}"))
    pieces: dict[str, list] = {}
    for batch in reader:
        for name, dtype, shape, data in zip(*(batch.column(i).to_pylist() for i in range(3)), batch.column(3)):
            pieces.setdefault(name, [dtype, shape, []])[2].append(data.as_buffer())
    return {name: _tensor(dtype, shape, buffers) for name, (dtype, shape, buffers) in pieces.items()}, meta


def _tensor(dtype: str, shape: list[int], buffers: list[pa.Buffer]) -> Tensor:
    data = bytearray(b"".join(memoryview(b) for b in buffers))
    torch_dtype = getattr(torch, normalize_dtype(dtype, "dtype"))
    if not data:
        return torch.empty(shape, dtype=torch_dtype)
    return torch.frombuffer(data, dtype=torch.uint8).view(torch_dtype).reshape(shape)


class _Chunks:
    """A write-only file that hands back what was written since the last take()."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.size = 0
        self.closed = False

    def write(self, data: Any) -> int:
        self.parts.append(bytes(data))
        self.size += len(data)
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def take(self) -> bytes:
        data, self.parts, self.size = b"".join(self.parts), [], 0
        return data
