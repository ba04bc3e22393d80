"""bfloat16 as its 16-bit patterns (shardlens.tables.dtypes): every pattern round trips
bit for bit, without a copy, and every writer marks and restores it the one same way."""

import numpy as np
import pyarrow as pa
import torch

import shardlens as sl
from shardlens.cluster.worker import pack, unpack
from shardlens.tables.arrow import tables_to_cache
from shardlens.tables.dtypes import DTYPE_KEY, field_dtype, field_metadata, from_numpy, to_numpy

EVERY_BF16 = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)  # NaNs and infinities too


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().view(torch.int16)


def test_every_bfloat16_pattern_round_trips_through_numpy_without_a_copy():
    array = to_numpy(EVERY_BF16)
    assert array.dtype == np.uint16 and array.ctypes.data == EVERY_BF16.data_ptr()
    assert np.array_equal(np.sort(array), np.arange(2**16))  # every pattern, once
    back = from_numpy(array, "bfloat16")
    assert back.dtype == torch.bfloat16 and back.data_ptr() == EVERY_BF16.data_ptr()
    assert torch.equal(bits(back), bits(EVERY_BF16))
    assert from_numpy(np.ones(3, np.float16)).dtype == torch.float16  # other dtypes as numpy has them


def test_the_field_mark_names_bfloat16_only():
    assert field_metadata(torch.bfloat16) == {DTYPE_KEY: b"bfloat16"} and field_metadata(torch.float16) == {}
    assert field_dtype(pa.field("v", pa.uint16(), metadata=field_metadata(torch.bfloat16))) == "bfloat16"
    assert field_dtype(pa.field("v", pa.float16())) is None


def test_tables_sparse_tables_datasets_and_stage_results_agree_on_the_bits(tmp_path):
    values = EVERY_BF16.reshape(2, 2**15)  # [batch, features]
    dense = sl.ActivationCache({"hook_embed": values}).to_arrow()["hook_embed"]
    sparse = sl.ActivationCache({"hook_embed": values.to_sparse()}).to_arrow()["hook_embed"]
    for table, column in ((dense, "value"), (sparse, "values")):
        assert field_dtype(table.schema.field(column)) == "bfloat16", column
    assert torch.equal(bits(tables_to_cache(dense)["hook_embed"]), bits(values))
    assert torch.equal(bits(tables_to_cache(sparse, sparse=True)["hook_embed"].values()), bits(values.to_sparse().values()))
    assert torch.equal(bits(unpack(pack(values))), bits(values))
    rows = values.reshape(-1, 8)  # a dataset of 8192 rows of width 8
    with sl.DatasetWriter(tmp_path, sl.DatasetSpec({"hook_embed": [8]}, len(rows), dtype="bfloat16", shard_rows=len(rows), seed=0,
                                                   provenance=False)) as writer:
        writer.write({"hook_embed": rows})
    (file,) = tmp_path.glob("data-*.arrow")
    table = pa.ipc.open_stream(str(file)).read_all()
    assert field_dtype(table.schema.field("hook_embed")) == "bfloat16"
    column = table.column("hook_embed").combine_chunks()
    column = column.storage if isinstance(column, pa.ExtensionArray) else column  # datasets, once imported, registers Array2D
    stored = column.flatten().flatten().to_numpy().reshape(-1, 8)
    order = np.random.default_rng([0, 0]).permutation(len(rows))  # the shuffle of group 0 (see shardlens.tables.datasets)
    assert torch.equal(bits(from_numpy(stored.copy(), "bfloat16")), bits(rows[order]))
