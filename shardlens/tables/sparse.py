"""Sparse cache entries: torch sparse COO tensors, and their rows in Arrow tables.

A sparse entry is a coalesced `torch.sparse_coo` tensor of the dense entry's shape, sparse
in every axis: what `Cache(sparse=True)` (the non-zeros) and `Cache(top_k=k)` (the k largest
along the last axis, at each position) store, and CacheGrad with the same options of a
gradient (see `kept`). It is a Tensor, so it keeps the dense shape and
dtype, moves with `.to(device)`, concatenates along the batch axis with `torch.cat`, and
turns dense with `.to_dense()`; its memory is its non-zeros (`nnz`) x (ndim int64 indices +
one value), not the dense size.

In a table a sparse entry has, instead of `value`, two list columns: `indices` (each
row's flat indices into the row's dense shape: int32 in layout "token", int64 in layout
"example", where that shape includes positions) and `values` (the values, in the entry's
dtype; bf16 as uint16 bits, marked as `value` is: see shardlens.tables.dtypes). The
`indices` field's metadata holds the row's dense shape as JSON under
`shardlens.sparse_shape` (e.g. b"[65536]").
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch import Tensor

from shardlens.tables.dtypes import field_dtype, field_metadata, from_numpy, to_numpy

SPARSE_SHAPE_KEY = b"shardlens.sparse_shape"


def is_sparse(tensor: Tensor) -> bool:
    return tensor.layout == torch.sparse_coo


def coo(indices: Tensor, values: Tensor, shape: Sequence[int], *, coalesced: bool = False) -> Tensor:
    """A coalesced sparse COO tensor (`coalesced`: the indices are sorted and unique already)."""
    # Invariants are checked by the callers (indices in range): torch's own check is a full pass.
    tensor = torch.sparse_coo_tensor(indices, values, tuple(shape), is_coalesced=coalesced or None, check_invariants=False)
    return tensor if coalesced else tensor.coalesce()


def nonzeros(tensor: Tensor) -> Tensor:
    """The non-zeros of a dense tensor, as a sparse entry."""
    return tensor.to_sparse().coalesce()


def top_k(tensor: Tensor, k: int, *, name: str = "the tensor") -> Tensor:
    """The `k` largest values along the last axis at each leading index (torch.topk's choice),
    as a sparse entry: exactly k stored values per position, zeros included."""
    features = tensor.shape[-1] if tensor.ndim else 0
    if k > features:
        raise ValueError(f"top_k={k} at {name}: its last axis has only {features} features (shape {list(tensor.shape)})")
    values, indices = tensor.topk(k, dim=-1)
    indices, order = indices.sort(dim=-1)  # sorted within each position: the COO is coalesced as built
    values = values.gather(-1, order)
    leading = tensor.shape[:-1]
    rows = torch.arange(leading.numel(), device=tensor.device).repeat_interleave(k)
    coords = [c for c in torch.unravel_index(rows, leading)] if leading else []
    all_indices = torch.stack([*coords, indices.reshape(-1)])  # [ndim, positions x k]
    return coo(all_indices, values.reshape(-1), tensor.shape, coalesced=True)


def check_options(op: str, sparse: object, k: object) -> None:
    """Refuse bad `sparse` / `top_k` options of a caching op (`op`: its name, for the message)."""
    if not isinstance(sparse, bool):
        raise ValueError(f"{op}(sparse=...) must be True or False; got {sparse!r}")
    if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k < 1):
        raise ValueError(f"{op}(top_k=...) must be a positive int (values kept per position) or None; got {k!r}")


def kept(tensor: Tensor, *, sparse: bool = False, k: Optional[int] = None, name: str = "the tensor") -> Tensor:
    """What a caching op with options `sparse` and `top_k=k` keeps of a dense tensor: all of
    it; its non-zeros (sparse); the k largest values along the last axis at each position
    (k); the non-zero ones of those (both); the last three as sparse entries."""
    if k is not None:
        entry = top_k(tensor, k, name=name)
        return drop_zeros(entry) if sparse else entry
    return nonzeros(tensor) if sparse else tensor


def movedim(tensor: Tensor, source: int, destination: int) -> Tensor:
    """A sparse tensor with one axis moved, as Tensor.movedim moves a dense one's."""
    if source == destination:
        return tensor
    order = list(range(tensor.ndim))
    order.insert(destination, order.pop(source))
    return tensor.permute(order).coalesce()


def drop_zeros(tensor: Tensor) -> Tensor:
    """A sparse entry without its stored zeros."""
    keep = tensor.values() != 0
    return coo(tensor.indices()[:, keep], tensor.values()[keep], tensor.shape, coalesced=True)


# ---------------------------------------------------------------------- Arrow rows


def sparse_columns(tensor: Tensor, row_dims: int, rows: Tensor) -> tuple[dict[str, pa.Array], list[pa.Field]]:
    """The `indices` and `values` columns of a sparse entry, one row per True of `rows`.

    Args:
        tensor: a sparse COO tensor whose first `row_dims` axes index the rows (batch, or
            batch and position moved to axis 1).
        rows: a bool mask over those axes ([batch] or [batch, pos]); entries outside it
            (padding) are not written. Rows follow its row-major order.
    """
    tensor = tensor.detach().cpu().coalesce()
    shape = tuple(tensor.shape)
    row_shape = shape[row_dims:]
    row_size = int(np.prod(row_shape, dtype=np.int64))
    indices, values = tensor.indices(), tensor.values()
    row_key = _ravel(indices[:row_dims], shape[:row_dims])  # which (example, pos) each stored value is in
    flat = _ravel(indices[row_dims:], row_shape)  # where in that row's dense shape
    order = torch.argsort(row_key * row_size + flat)  # row-major: grouped by row, sorted within (coalesce sorted by the axes as they were)
    row_key, flat, values = row_key[order], flat[order], values[order]
    written = rows.reshape(-1)
    keep = written[row_key]
    row_key, flat, values = row_key[keep], flat[keep], values[keep]
    row_of = written.long().cumsum(0) - 1  # a written position's row in the table
    counts = torch.bincount(row_of[row_key], minlength=int(written.sum()))
    offsets = np.concatenate([[0], counts.cumsum(0).numpy()]).astype(np.int32)
    index_type = pa.int32() if row_dims == 2 else pa.int64()
    if index_type == pa.int32() and row_size > np.iinfo(np.int32).max:
        raise ValueError(f"a sparse row of shape {list(row_shape)} has more than 2**31 entries; use layout 'example'")
    index_array = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat.numpy().astype(index_type.to_pandas_dtype())))
    value_list = pa.ListArray.from_arrays(pa.array(offsets), pa.array(to_numpy(values)))
    fields = [
        pa.field("indices", index_array.type, metadata={SPARSE_SHAPE_KEY: json.dumps(list(row_shape)).encode()}),
        pa.field("values", value_list.type, metadata=field_metadata(values.dtype) or None),
    ]
    return {"indices": index_array, "values": value_list}, fields


def _ravel(coords: Tensor, shape: Sequence[int]) -> Tensor:
    """Flat row-major indices of coordinates [ndim, n] in `shape`."""
    flat = torch.zeros(coords.shape[1], dtype=torch.long)
    for axis, size in enumerate(shape):
        flat = flat * size + coords[axis]
    return flat


def rows_tensor(rows: pa.Table, lead: Tensor, lead_shape: Sequence[int], *, name: str) -> Tensor:
    """The sparse COO tensor [*lead_shape, *row shape] of a table's `indices` / `values` rows,
    row r at the leading coordinates lead[:, r] ([row_dims, rows])."""
    field = rows.schema.field("indices")
    row_shape = tuple(json.loads((field.metadata or {}).get(SPARSE_SHAPE_KEY, b"null")) or ())
    if not row_shape and SPARSE_SHAPE_KEY not in (field.metadata or {}):
        raise ValueError(f"{name}: the indices column has no {SPARSE_SHAPE_KEY.decode()} metadata: not a shardlens sparse entry")
    index_list = _combined(rows.column("indices"))
    value_list = _combined(rows.column("values"))
    counts = torch.from_numpy(pc.list_value_length(index_list).to_numpy(zero_copy_only=False).astype(np.int64))
    flat = torch.from_numpy(index_list.flatten().to_numpy(zero_copy_only=False).astype(np.int64))
    row_size = int(np.prod(row_shape, dtype=np.int64))
    if len(flat) and (int(flat.min()) < 0 or int(flat.max()) >= row_size):
        raise ValueError(f"{name}: sparse indices must lie in [0, {row_size}) for rows of shape {list(row_shape)}; "
                         f"got {int(flat.min())}..{int(flat.max())}")
    values = value_list.flatten().to_numpy(zero_copy_only=False).copy()  # a copy: arrow's buffers are read-only
    values = from_numpy(values, field_dtype(rows.schema.field("values")))
    if len(values) != len(flat):
        raise ValueError(f"{name}: {len(flat)} sparse indices but {len(values)} values")
    coords = torch.stack(list(torch.unravel_index(flat, row_shape))) if row_shape else flat.new_zeros(0, len(flat))
    indices = torch.cat([lead.repeat_interleave(counts, dim=1), coords])
    return coo(indices, values, (*lead_shape, *row_shape))


def _combined(column: pa.ChunkedArray) -> pa.Array:
    return column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
