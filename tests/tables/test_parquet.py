"""Arrow tables and Parquet datasets of caches: exact round trips, filters, other readers."""

import json
import os
import pickle
import threading

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import torch

import shardlens as sl
from shardlens.tables import parquet as parquet_module
from shardlens.tables.arrow import tables_to_cache

NAMES = ["hook_embed", "blocks.1.hook_resid_post", "blocks.0.attn.hook_z", "blocks.2.attn.hook_pattern", "ln_final.hook_scale"]


@pytest.fixture(scope="module")
def model(tiny_checkpoints):
    return sl.HookedModel.from_pretrained(tiny_checkpoints["llama_gqa"])


def model_cache(model, padded, dtype=torch.float32, incl_bwd=False):
    tokens, mask = padded
    kwargs = dict(return_type="loss", incl_bwd=True) if incl_bwd else {}
    _, cache = model.run_with_cache(tokens, attention_mask=mask, names_filter=NAMES, **kwargs)
    if dtype == torch.float32:
        return cache
    return sl.ActivationCache({k: v.to(dtype) for k, v in cache.items()}, attention_mask=cache.attention_mask)


def assert_same_real_values(got, cache, *, token_layout):
    mask = cache.attention_mask.bool()
    assert set(got) == set(cache)
    for name, tensor in cache.items():
        assert got[name].dtype == tensor.dtype, name
        if not token_layout:
            assert torch.equal(got[name], tensor), name
            continue
        axis = 2 if "pattern" in name else 1
        assert got[name].shape == tensor.shape, name
        assert torch.equal(got[name].movedim(axis, 1)[mask], tensor.movedim(axis, 1)[mask]), name
        assert torch.count_nonzero(got[name].movedim(axis, 1)[~mask]) == 0, name  # padding was not written


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["example", "token"])
def test_arrow_round_trip_is_exact(model, padded, dtype, layout):
    cache = model_cache(model, padded, dtype)
    tables = cache.to_arrow(layout)
    assert set(tables) == set(NAMES)
    for hook, table in tables.items():
        assert table.column_names[:6] == ["example", "batch", "hook", "layer", "direction", "seq_len"]
        assert pa.types.is_dictionary(table.schema.field("hook").type)
        assert isinstance(table.schema.field("value").type, pa.FixedShapeTensorType)
    z = tables["blocks.0.attn.hook_z"]
    assert z.column("layer").to_pylist()[0] == 0 and tables["hook_embed"].column("layer").null_count == tables["hook_embed"].num_rows
    expected_rows = 3 if layout == "example" else 5 + 8 + 2
    assert z.num_rows == expected_rows
    assert z.column("seq_len").to_pylist()[:1] == [5]
    back = {}
    for table in tables.values():
        back.update(tables_to_cache(table))
    assert_same_real_values(back, cache, token_layout=layout == "token")


def test_bf16_travels_as_uint16_bits_with_metadata(model, padded):
    table = model_cache(model, padded, torch.bfloat16).to_arrow()["hook_embed"]
    field = table.schema.field("value")
    assert field.type.value_type == pa.uint16()
    assert field.metadata[b"shardlens.dtype"] == b"bfloat16"


@pytest.mark.parametrize("layout", ["example", "token"])
def test_parquet_round_trip_with_gradients(model, padded, tmp_path, layout):
    cache = model_cache(model, padded, incl_bwd=True)
    assert "blocks.1.hook_resid_post_grad" in cache
    cache.to_parquet(tmp_path / "acts", layout=layout, metadata={"model": "tiny-llama", "dtype": "float32"})
    assert sorted(os.listdir(tmp_path / "acts")) == sorted(f"hook={n}" for n in NAMES)
    back = sl.read_cache(tmp_path / "acts")
    assert_same_real_values(back, cache, token_layout=layout == "token")


def test_parts_carry_json_metadata_and_zstd(model, padded, tmp_path):
    model_cache(model, padded).to_parquet(tmp_path, metadata={"model": "tiny-llama", "plan": {"stages": 2}})
    part = next((tmp_path / "hook=hook_embed").glob("part-*.parquet"))
    metadata = json.loads(pq.read_schema(part).metadata[b"shardlens"])
    assert metadata["model"] == "tiny-llama" and metadata["plan"] == {"stages": 2} and metadata["shardlens_version"] == sl.__version__
    columns = pq.ParquetFile(part).metadata.row_group(0)
    by_name = {columns.column(i).path_in_schema: columns.column(i) for i in range(columns.num_columns)}
    assert all(c.compression == "ZSTD" for c in by_name.values())
    value = next(c for name, c in by_name.items() if name.startswith("value"))
    assert "RLE_DICTIONARY" not in value.encodings and "PLAIN_DICTIONARY" not in value.encodings
    assert "hook" not in pq.read_schema(part).names  # the partition key lives in the path


def test_filtered_reads(model, padded, tmp_path):
    cache = model_cache(model, padded)
    with sl.ParquetSink(tmp_path, layout="token") as sink:
        sink.write(cache)
    back = sl.read_cache(tmp_path, hooks=["blocks.0.attn.hook_z"], examples=[0, 2])
    assert list(back) == ["blocks.0.attn.hook_z"]
    assert back.examples.tolist() == [0, 2]
    z = cache["blocks.0.attn.hook_z"]
    assert torch.equal(back["blocks.0.attn.hook_z"][0, 3:], z[0, 3:])
    assert torch.equal(back["blocks.0.attn.hook_z"][1, 6:], z[2, 6:])


def test_streaming_sink_appends_batches_with_global_example_ids(model, tmp_path):
    with sl.ParquetSink(tmp_path, layout="example") as sink:
        for batch in range(3):
            tokens = torch.randint(3, 97, (2, 6), generator=torch.Generator().manual_seed(batch))
            _, cache = model.run_with_cache(tokens, names_filter="blocks.1.hook_resid_post")
            sink.write(sl.ActivationCache(dict(cache), examples=torch.arange(2) + 2 * batch, batch=batch))
    table = ds.dataset(tmp_path, format="parquet", partitioning="hive").to_table()
    assert sorted(table.column("example").to_pylist()) == list(range(6))
    assert sorted(set(table.column("batch").to_pylist())) == [0, 1, 2]
    assert len(list((tmp_path / "hook=blocks.1.hook_resid_post").glob("part-*.parquet"))) == 3


def test_plain_pyarrow_and_duckdb_read_the_same_values(model, padded, tmp_path):
    cache = model_cache(model, padded)
    cache.to_parquet(tmp_path, layout="token")
    name = "blocks.1.hook_resid_post"
    real = cache[name][cache.attention_mask.bool()]  # [tokens, d_model] in (example, pos) order
    # each hook point has its own value shape: plain pyarrow reads one hook's directory
    table = ds.dataset(tmp_path / f"hook={name}", format="parquet").to_table()
    table = table.sort_by([("example", "ascending"), ("pos", "ascending")])
    values = table.column("value").combine_chunks().to_numpy_ndarray()
    assert np.array_equal(values, real.numpy())
    duckdb = pytest.importorskip("duckdb")
    rows = duckdb.sql(
        f"SELECT value FROM read_parquet('{tmp_path}/hook={name}/*.parquet') ORDER BY example, pos"
    ).fetchall()
    assert np.array_equal(np.array([r[0] for r in rows], dtype=np.float32), real.numpy())


def test_a_write_that_fails_midway_leaves_no_visible_part(model, padded, tmp_path, monkeypatch):
    cache = model_cache(model, padded)
    real_write = pq.write_table

    def half_then_fail(table, where, **kwargs):
        real_write(table.slice(0, 1), where, **kwargs)  # some bytes reach the temporary file
        raise OSError("disk full")

    monkeypatch.setattr(parquet_module.pq, "write_table", half_then_fail)
    with pytest.raises(sl.ParquetWriteError, match="disk full") as failure:
        cache.to_parquet(tmp_path)
    assert failure.value.unwritten[0] is cache and isinstance(failure.value.__cause__, OSError)
    assert str(failure.value).endswith("The data that was not written is on this error's .unwritten.")
    leftovers = [f for _, _, files in os.walk(tmp_path) for f in files]
    assert leftovers == []
    assert sl.read_cache(tmp_path) == {}


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="reads file names from /proc")
def test_each_part_reaches_the_disk_before_its_name_appears(model, padded, tmp_path, fsyncs):
    seen = fsyncs
    with sl.ParquetSink(tmp_path, layout="token") as sink:
        parts = sink.write(model_cache(model, padded))
    assert len(parts) == len(NAMES) and len(seen) == len(NAMES)
    for part in parts:
        temporary = os.path.join(os.path.dirname(part), f".{os.path.basename(part)}.tmp")
        assert (temporary, True, False) in seen  # whole, synced, not yet published


def files_under(path):
    return sorted(str(p) for p in path.rglob("*") if p.is_file())


@pytest.fixture
def gated_writes(monkeypatch):
    """pq.write_table in the sink waits for `gate` to be set; `started` lists where it was called."""
    real_write, started, gate = pq.write_table, [], threading.Event()

    def gated(table, where, **kwargs):
        started.append(where)
        assert gate.wait(timeout=60), "the test never opened the gate"
        real_write(table, where, **kwargs)

    monkeypatch.setattr(parquet_module.pq, "write_table", gated)
    return started, gate


@pytest.mark.parametrize("threads", [1, 2])
def test_a_write_whose_third_part_fails_leaves_none_of_its_parts(model, padded, tmp_path, monkeypatch, threads):
    cache, later = model_cache(model, padded), model_cache(model, padded, torch.float16)
    real_write, calls = pq.write_table, []

    def third_fails(table, where, **kwargs):
        calls.append(where)
        if len(calls) == 3:
            raise OSError("disk full")
        real_write(table, where, **kwargs)

    with sl.ParquetSink(tmp_path, threads=threads) as sink:
        first = sink.write(cache)
        sink.flush()
        monkeypatch.setattr(parquet_module.pq, "write_table", third_fails)
        sink.write(cache)  # queued: its failure is the next call's to report
        with pytest.raises(sl.ParquetWriteError, match=r"write #2 failed.*OSError: disk full") as failure:
            sink.flush()
        assert failure.value.writes == (2,) and failure.value.unwritten[0] is cache
        assert len(calls) == len(NAMES)
        assert files_under(tmp_path) == sorted(first)  # the earlier write stays whole
        monkeypatch.setattr(parquet_module.pq, "write_table", real_write)
        third = sink.write(later)  # a failure, once reported, does not stop the sink
    assert files_under(tmp_path) == sorted(first + third)
    assert sink.parts == first + third


def test_write_returns_before_its_parts_are_written_and_flush_waits(model, padded, tmp_path, gated_writes):
    started, gate = gated_writes
    cache = model_cache(model, padded)
    with sl.ParquetSink(tmp_path, layout="token") as sink:
        parts = sink.write(cache)
        assert len(parts) == len(NAMES) and not any(os.path.exists(p) for p in parts)
        gate.set()
        assert sink.flush() == parts
        assert all(os.path.exists(p) for p in parts)
    assert_same_real_values(sl.read_cache(tmp_path), cache, token_layout=True)


def test_write_waits_while_max_pending_writes_are_in_flight(model, padded, tmp_path, gated_writes):
    started, gate = gated_writes
    cache = model_cache(model, padded)
    sink = sl.ParquetSink(tmp_path, threads=1, max_pending=1)
    second_returned = threading.Event()

    def two_writes():
        sink.write(cache)
        sink.write(cache)
        second_returned.set()

    writer = threading.Thread(target=two_writes)
    writer.start()
    try:
        assert not second_returned.wait(timeout=0.5)  # the first write holds the only slot
        assert len(started) == 1
    finally:
        gate.set()
        writer.join()
        sink.close()
    assert second_returned.is_set() and len(sink.parts) == 2 * len(NAMES)


def disk_full(*args, **kwargs):
    raise OSError("disk full")


def test_with_max_pending_0_a_write_reports_its_own_failure(model, padded, tmp_path, monkeypatch):
    cache = model_cache(model, padded)
    monkeypatch.setattr(parquet_module.pq, "write_table", disk_full)
    with sl.ParquetSink(tmp_path, max_pending=0) as sink:
        with pytest.raises(sl.ParquetWriteError, match="write #1 failed") as failure:
            sink.write(cache)
    assert failure.value.unwritten == (cache,) and files_under(tmp_path) == []


def test_flush_reports_every_failed_write_once(model, padded, tmp_path, monkeypatch):
    first, second = model_cache(model, padded), model_cache(model, padded, torch.float16)
    gate = threading.Event()

    def disk_full_once_both_are_queued(*args, **kwargs):
        assert gate.wait(timeout=60)
        disk_full()

    with sl.ParquetSink(tmp_path, max_pending=2) as sink:
        monkeypatch.setattr(parquet_module.pq, "write_table", disk_full_once_both_are_queued)
        sink.write(first)
        sink.write(second)
        gate.set()
        with pytest.raises(sl.ParquetWriteError, match="writes #1, #2 failed and kept none of their parts") as failure:
            sink.flush()
        assert failure.value.writes == (1, 2) and failure.value.unwritten == (first, second)
        assert sink.flush() == []  # reported once
    assert files_under(tmp_path) == []


def test_a_write_after_an_unreported_failure_is_not_queued_and_is_kept(model, padded, tmp_path, monkeypatch):
    first, second = model_cache(model, padded), model_cache(model, padded, torch.bfloat16)
    real_write = pq.write_table
    with sl.ParquetSink(tmp_path, max_pending=1) as sink:
        monkeypatch.setattr(parquet_module.pq, "write_table", disk_full)
        sink.write(first)
        monkeypatch.setattr(parquet_module.pq, "write_table", real_write)
        with pytest.raises(sl.ParquetWriteError, match="not queued either") as failure:
            sink.write(second)  # waits for the first (max_pending=1), which failed
    assert failure.value.unwritten == (first, second) and failure.value.writes == (1,)
    assert files_under(tmp_path) == []


def test_changing_a_tensor_in_place_before_it_is_written_fails_that_write(model, padded, tmp_path, gated_writes):
    started, gate = gated_writes
    cache = model_cache(model, padded)
    sink = sl.ParquetSink(tmp_path, layout="example")
    sink.write(cache)
    cache["blocks.1.hook_resid_post"].mul_(2)
    gate.set()
    with pytest.raises(sl.ParquetWriteError, match=r"blocks.1.hook_resid_post changed in place.*flush\(\)"):
        sink.close()
    assert files_under(tmp_path) == []


def test_layout_token_copies_the_values_so_changing_them_after_write_is_harmless(model, padded, tmp_path, gated_writes):
    started, gate = gated_writes
    cache = model_cache(model, padded)
    expected = {name: tensor.clone() for name, tensor in cache.items()}
    with sl.ParquetSink(tmp_path, layout="token") as sink:
        sink.write(cache)
        for tensor in cache.values():
            tensor.zero_()
        gate.set()
    assert_same_real_values(sl.read_cache(tmp_path), sl.ActivationCache(expected, attention_mask=cache.attention_mask), token_layout=True)


def test_leaving_the_block_on_an_error_still_publishes_what_was_written(model, padded, tmp_path):
    cache = model_cache(model, padded)
    with pytest.raises(KeyError, match="the user's own error"):
        with sl.ParquetSink(tmp_path, layout="token") as sink:
            parts = sink.write(cache)
            raise KeyError("the user's own error")
    assert files_under(tmp_path) == sorted(parts)
    assert_same_real_values(sl.read_cache(tmp_path), cache, token_layout=True)


def test_a_closed_sink_and_bad_arguments_are_refused_clearly(model, padded, tmp_path):
    sink = sl.ParquetSink(tmp_path)
    sink.close()
    sink.close()  # closing twice is harmless
    with pytest.raises(ValueError, match="is closed; open a new one"):
        sink.write(model_cache(model, padded))
    with pytest.raises(ValueError, match=r"threads >= 1 and max_pending >= 0; got threads=0, max_pending=2"):
        sl.ParquetSink(tmp_path, threads=0)
    with pytest.raises(ValueError, match="layout must be 'example' or 'token'; got 'rows'"):
        sl.ParquetSink(tmp_path, layout="rows")


def test_a_write_error_crosses_processes_without_its_data(model, padded):
    error = sl.ParquetWriteError("write #3 failed", writes=(3,), unwritten=(model_cache(model, padded),))
    back = pickle.loads(pickle.dumps(error))
    assert isinstance(back, OSError) and str(back) == "write #3 failed" and back.writes == (3,) and back.unwritten == ()


def test_token_layout_needs_a_position_axis():
    cache = sl.ActivationCache({"blocks.0.hook_x.stat": torch.zeros(2)})
    with pytest.raises(ValueError, match="needs a position axis"):
        cache.to_arrow("token")
    with pytest.raises(ValueError, match="layout must be"):
        cache.to_arrow("rows")


def test_mixing_layouts_in_one_dataset_is_refused_clearly(model, padded, tmp_path):
    cache = model_cache(model, padded)
    cache.to_parquet(tmp_path, layout="example")
    cache.to_parquet(tmp_path, layout="token")
    with pytest.raises(ValueError, match="differ in schema"):
        sl.read_cache(tmp_path, hooks=["hook_embed"])


def test_a_named_write_replaces_the_parts_of_its_name(model, padded, tmp_path):
    cache = model_cache(model, padded)
    twice = sl.ActivationCache({name: tensor * 2 for name, tensor in cache.items()}, attention_mask=cache.attention_mask)
    with sl.ParquetSink(tmp_path, layout="token") as sink:
        first = sink.write(cache, name="part-b00001")
        again = sink.write(twice, name="part-b00001")  # in flight together: the second waits for the first
    assert first == again and files_under(tmp_path) == sorted(first)
    assert all(os.path.basename(p) == "part-b00001.parquet" for p in first)
    assert_same_real_values(sl.read_cache(tmp_path), twice, token_layout=True)


@pytest.mark.parametrize("name", ["", ".hidden", "_meta", "a/b"])
def test_a_part_name_a_dataset_would_skip_or_misplace_is_refused(model, padded, tmp_path, name):
    with sl.ParquetSink(tmp_path) as sink:
        with pytest.raises(ValueError, match="must be a file name that does not start with"):
            sink.write(model_cache(model, padded), name=name)
    assert files_under(tmp_path) == []
