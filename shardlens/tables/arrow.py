"""Caches as Arrow tables, and back.

One table per hook point (forward entries and their `_grad` entries together). Columns:
  example   int64     the global example index
  batch     int32     the id of the batch the row came from
  hook      dictionary<int32, string>
  layer     int16     null outside the blocks
  direction string    "fwd" or "bwd"
  seq_len   int32     the example's real tokens, from the attention mask (null: no position axis)
  pos       int32     layout "token" only: the position in the (padded) batch
  value     arrow.fixed_shape_tensor: layout "example" [the entry's shape after batch],
            layout "token" [its shape after batch and position]; bf16 travels as its
            uint16 bits with field metadata shardlens.dtype=bfloat16 (shardlens.tables.dtypes).
  indices, values   instead of `value` for a sparse entry (a torch sparse COO tensor, see
            shardlens.tables.sparse): each row's flat indices into that same row shape
            and their values, as lists; the row shape is in the metadata of `indices`.
Layout "token" writes one row per real token: padding is never written as data (a sparse
entry's token with no stored value is a row with empty lists).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch import Tensor

from shardlens.tables.axes import base_name, layer_index, position_axis
from shardlens.tables.cache import ActivationCache
from shardlens.tables.dtypes import field_dtype, field_metadata, from_numpy, to_numpy
from shardlens.tables.sparse import is_sparse, movedim, rows_tensor, sparse_columns
from shardlens.version import __version__

LAYOUTS = ("example", "token")
SHAPE_KEY = b"shardlens.shape"


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be 'example' or 'token'; got {layout!r}")


def cache_to_tables(cache: ActivationCache, layout: str = "example") -> dict[str, pa.Table]:
    """One table per hook point of `cache` (see the module docstring for the columns)."""
    check_layout(layout)
    tables: dict[str, list[pa.Table]] = {}
    for name, tensor in cache.items():
        hook = base_name(name)
        direction = "bwd" if name.endswith("_grad") else "fwd"
        tables.setdefault(hook, []).append(entry_table(cache, name, hook, direction, tensor, layout))
    return {hook: _concat(hook, parts) for hook, parts in tables.items()}


def _concat(hook: str, parts: list[pa.Table]) -> pa.Table:
    forms = {"value" in part.column_names for part in parts}
    if len(forms) > 1:
        raise ValueError(f"{hook} has a sparse and a dense entry (forward and gradient): one table per hook point holds one form; "
                         "cache both sparse or both dense (sl.ops.CacheGrad(sparse=True) keeps every non-zero of the gradient, "
                         "sl.ops.Cache(sparse=True) of the activation)")
    return pa.concat_tables(parts)


def entry_table(cache: ActivationCache, name: str, hook: str, direction: str, tensor: Tensor, layout: str) -> pa.Table:
    sparse = is_sparse(tensor)
    tensor = tensor.detach().cpu() if sparse else tensor.detach().cpu().contiguous()
    n = tensor.shape[0]
    examples = cache.example_ids().cpu().long()
    pos_axis = position_axis(name)
    has_pos = tensor.ndim > pos_axis
    seq_lens = cache.seq_lens()
    if seq_lens is None and has_pos:
        seq_lens = torch.full((n,), tensor.shape[pos_axis])
    columns: dict[str, pa.Array] = {}
    if layout == "example":
        rows, values = torch.arange(n), tensor
    else:
        if not has_pos:
            raise ValueError(f"layout 'token' needs a position axis; {name} has shape {list(tensor.shape)}")
        mask = _mask(cache, n, tensor.shape[pos_axis], name)
        rows, positions = mask.nonzero(as_tuple=True)
        values = movedim(tensor, pos_axis, 1) if sparse else tensor.movedim(pos_axis, 1)[rows, positions].contiguous()  # [tokens, ...]
        columns["pos"] = pa.array(positions.int().numpy(), pa.int32())
    if sparse:
        written = torch.ones(n, dtype=torch.bool) if layout == "example" else mask
        value_columns, value_fields = sparse_columns(values, 1 if layout == "example" else 2, written)
    else:
        value_array, value_field = tensor_column(values)
        value_columns, value_fields = {"value": value_array}, [value_field]
    n_rows = len(rows)
    layer = layer_index(hook)
    table_columns = {
        "example": pa.array(examples[rows].numpy(), pa.int64()),
        "batch": pa.array(np.full(n_rows, cache.batch, np.int32), pa.int32()),
        "hook": pa.DictionaryArray.from_arrays(pa.array(np.zeros(n_rows, np.int32)), pa.array([hook])),
        "layer": pa.array([layer] * n_rows, pa.int16()),
        "direction": pa.array([direction] * n_rows, pa.string()),
        "seq_len": pa.nulls(n_rows, pa.int32()) if seq_lens is None else pa.array(seq_lens[rows].int().numpy(), pa.int32()),
        **columns,
    }
    fields = [pa.field(k, v.type) for k, v in table_columns.items()] + value_fields
    return pa.Table.from_arrays([*table_columns.values(), *value_columns.values()], schema=pa.schema(fields))


def _mask(cache: ActivationCache, n: int, length: int, name: str) -> Tensor:
    if cache.attention_mask is None:
        return torch.ones(n, length, dtype=torch.bool)
    mask = cache.attention_mask.cpu().bool()
    if tuple(mask.shape) != (n, length):
        raise ValueError(f"{name}: the attention mask is {list(mask.shape)} but the entry has {n} examples x {length} positions")
    return mask


def tensor_column(values: Tensor) -> tuple[pa.Array, pa.Field]:
    """A fixed_shape_tensor column of `values` [rows, ...], zero-copy for contiguous CPU
    tensors; bf16 as its uint16 bits, marked in the field metadata."""
    metadata = field_metadata(values.dtype)
    if values.ndim == 1:  # a scalar per row: stored as [1], restored by the metadata
        values, metadata[SHAPE_KEY] = values[:, None], b"[]"
    column = pa.FixedShapeTensorArray.from_numpy_ndarray(to_numpy(values))
    return column, pa.field("value", column.type, metadata=metadata or None)


def column_tensor(column: pa.ChunkedArray, field: pa.Field) -> Tensor:
    """The tensor [rows, ...] of a value column (bf16 and scalar rows restored)."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    values = np.ascontiguousarray(array.to_numpy_ndarray())
    values = from_numpy(values if values.flags.writeable else values.copy(), field_dtype(field))
    if (field.metadata or {}).get(SHAPE_KEY) == b"[]":
        values = values[:, 0]
    return values


def tables_to_cache(table: pa.Table, *, sparse: bool = False) -> ActivationCache:
    """The ActivationCache of a table with rows of one or more hook points (a `hook` column).
    Entries stored sparsely come back dense, or as sparse COO tensors with `sparse`."""
    if table.num_rows == 0:
        return ActivationCache({})
    hooks = table.column("hook")
    hooks = pc.cast(hooks, pa.string()) if pa.types.is_dictionary(hooks.type) else hooks
    examples = torch.from_numpy(np.unique(table.column("example").to_numpy()))  # np.unique copies
    tensors, mask = {}, None
    for hook in pc.unique(hooks).to_pylist():
        for direction in ("fwd", "bwd"):
            rows = table.filter(pc.and_(pc.equal(hooks, hook), pc.equal(table.column("direction"), direction)))
            if rows.num_rows:
                name = hook + ("_grad" if direction == "bwd" else "")
                tensors[name], entry_mask = _entry_tensor(rows, name, examples, sparse)
                mask = entry_mask if entry_mask is not None else mask
    return ActivationCache(tensors, attention_mask=mask, examples=examples)


def _entry_tensor(rows: pa.Table, name: str, examples: Tensor, sparse: bool) -> tuple[Tensor, Optional[Tensor]]:
    """One entry's tensor (a sparse entry: dense unless `sparse`) and, in layout "token", its mask."""
    index = (torch.searchsorted(examples, _ints(rows.column("example"))),)  # each row's example (and position)
    shape = (len(examples),)
    mask = None
    if "pos" in rows.column_names:
        positions = _ints(rows.column("pos"))
        index, shape = (*index, positions), (*shape, int(positions.max()) + 1)
        mask = torch.zeros(shape, dtype=torch.long)
        mask[index] = 1
    if "indices" in rows.column_names:
        tensor = rows_tensor(rows, torch.stack(index), shape, name=name)
        tensor = tensor if sparse else tensor.to_dense()
    else:
        values = column_tensor(rows.column("value"), rows.schema.field("value"))
        tensor = values.new_zeros((*shape, *values.shape[1:]))
        tensor[index] = values
    if mask is not None:  # [batch, pos, ...] -> the entry's own axes
        tensor = movedim(tensor, 1, position_axis(name)) if tensor.is_sparse else tensor.movedim(1, position_axis(name))
    return tensor, mask


def _ints(column: pa.ChunkedArray) -> Tensor:
    return torch.from_numpy(column.to_numpy().astype(np.int64))  # astype copies: arrow's buffers are read-only


def schema_metadata(metadata: Optional[Mapping]) -> dict[bytes, bytes]:
    """Schema metadata for a dataset: the caller's fields as JSON under b"shardlens"."""
    payload = {"shardlens_version": __version__, **(metadata or {})}
    return {b"shardlens": json.dumps(payload, sort_keys=True, default=str).encode()}
