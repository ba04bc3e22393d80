"""Activation datasets for dictionary training: what `datasets` and SAELens read back, the shuffle,
the manifest, crashes and resuming, and the errors of bad inputs."""

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from shardlens.errors import DatasetError
from shardlens.tables import datasets as datasets_module
from shardlens.tables.datasets import DatasetSpec, DatasetWriter, read_manifest, verify_dataset

HOOKS = {"blocks.0.hook_resid_post": (8,), "blocks.1.attn.hook_z": (2, 3)}
ROWS = 1000


def token_rows(rows: int = ROWS, dtype: torch.dtype = torch.float16, seed: int = 0) -> dict:
    """Per hook point [rows, *shape] values, with token_ids = the row's index (so a read-back
    row says which input row it is), example and pos."""
    generator = torch.Generator().manual_seed(seed)
    values = {name: (torch.randn(rows, *shape, generator=generator) * 3).to(dtype) for name, shape in HOOKS.items()}
    index = torch.arange(rows)
    return {"values": values, "token_ids": index, "examples": index // 10, "positions": index % 10}


def write(path: Path, data: dict, *, chunk: int = 77, **spec_options) -> DatasetWriter:
    options = {"shard_rows": 128, "shuffle_buffer": 256, "seed": 3, **spec_options}
    dtype = str(next(iter(data["values"].values())).dtype).removeprefix("torch.")
    rows = len(data["token_ids"])
    spec = DatasetSpec(HOOKS, rows, dtype=dtype, **options)
    with DatasetWriter(path, spec, metadata={"model": "test"}) as writer:
        for start in range(0, rows, chunk):
            part = slice(start, start + chunk)
            writer.write({n: v[part] for n, v in data["values"].items()}, token_ids=data["token_ids"][part],
                         examples=data["examples"][part], positions=data["positions"][part])
    return writer


def files(path: Path) -> dict:
    """Every visible file of a dataset folder, as bytes."""
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file() and not p.name.startswith(".")}


def loaded(path: Path) -> dict:
    """The whole dataset as numpy arrays (datasets' numpy format gives floats as float32: exact for float16)."""
    import datasets

    return datasets.load_from_disk(str(path)).with_format("numpy")[:]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.bfloat16])
def test_datasets_reads_back_exactly_the_written_rows_with_hook_points_aligned(tmp_path, dtype):
    import datasets

    data = token_rows(dtype=dtype)
    write(tmp_path, data)
    got = loaded(tmp_path)
    features = datasets.load_from_disk(str(tmp_path)).features
    order = got["token_ids"][:, 0]  # which input row each dataset row is
    assert sorted(order.tolist()) == list(range(ROWS))  # every row once
    for name, values in data["values"].items():
        flat = values.reshape(ROWS, -1)
        expected = (flat.view(torch.int16).numpy().view(np.uint16) if dtype == torch.bfloat16 else flat.numpy())[order]
        assert features[name] == datasets.Array2D(shape=(1, flat.shape[1]), dtype=str(expected.dtype))
        assert got[name].shape == (ROWS, 1, flat.shape[1])
        np.testing.assert_array_equal(got[name][:, 0], expected.astype(got[name].dtype))  # row i of every hook point: input row order[i]
        assert np.array_equal(got[name][:, 0].astype(expected.dtype), expected)  # and nothing was lost in float32
    np.testing.assert_array_equal(got["example"], data["examples"].numpy()[order])
    np.testing.assert_array_equal(got["pos"], data["positions"].numpy()[order])


def test_rows_are_shuffled_within_their_group_in_the_order_the_seed_gives(tmp_path):
    data = token_rows()
    write(tmp_path / "a", data, seed=3)
    write(tmp_path / "b", data, seed=4)
    order = loaded(tmp_path / "a")["token_ids"][:, 0]
    expected = np.concatenate([start + np.random.default_rng([3, group]).permutation(min(256, ROWS - start))
                               for group, start in enumerate(range(0, ROWS, 256))])
    np.testing.assert_array_equal(order, expected)
    other = loaded(tmp_path / "b")["token_ids"][:, 0]
    assert sorted(other.tolist()) == list(range(ROWS)) and not np.array_equal(order, other)


def test_the_bytes_depend_on_the_rows_not_on_how_writes_split_them(tmp_path):
    data = token_rows()
    write(tmp_path / "a", data, chunk=77)
    write(tmp_path / "b", data, chunk=1000)
    write(tmp_path / "c", data, chunk=5)
    assert files(tmp_path / "a") == files(tmp_path / "b") == files(tmp_path / "c")
    assert [s.rows for s in read_manifest(tmp_path / "a").files] == [128] * 7 + [ROWS - 7 * 128]


def test_the_manifest_hashes_each_file_and_verify_names_the_first_that_differs(tmp_path):
    write(tmp_path, token_rows())
    manifest = verify_dataset(tmp_path)
    assert manifest.complete and len(manifest.files) == 8
    for listed in manifest.files:  # against hashlib over the file as it is on disk
        content = (tmp_path / listed.file).read_bytes()
        assert listed.sha256 == hashlib.sha256(content).hexdigest() and listed.bytes == len(content)
    listed = json.loads((tmp_path / "manifest.json").read_text())
    assert listed["seed"] == 3 and listed["metadata"] == {"model": "test"}
    assert [h["shape"] for h in listed["hooks"]] == [[8], [2, 3]] and {h["dtype"] for h in listed["hooks"]} == {"float16"}
    third, fifth = tmp_path / manifest.files[2].file, tmp_path / manifest.files[4].file
    for victim in (fifth, third):  # same size, one byte changed deep in the values
        content = bytearray(victim.read_bytes())
        content[len(content) // 2] ^= 0xFF
        victim.write_bytes(bytes(content))
    with pytest.raises(DatasetError, match=r"file data-00002-of-00008\.arrow has sha256 [0-9a-f]{64}; the manifest says"):
        verify_dataset(tmp_path)
    third.write_bytes(third.read_bytes()[:-8])
    with pytest.raises(DatasetError, match=r"file data-00002-of-00008\.arrow has \d+ bytes; the manifest says \d+"):
        verify_dataset(tmp_path)
    third.unlink()
    with pytest.raises(DatasetError, match=r"file data-00002-of-00008\.arrow is missing"):
        verify_dataset(tmp_path)


def test_saelens_reads_a_hook_point_as_cached_activations(tmp_path):
    from sae_lens.training.activations_store import ActivationsStore

    data = token_rows()
    write(tmp_path, data)
    order = loaded(tmp_path)["token_ids"][:, 0]
    name = "blocks.1.attn.hook_z"
    store = ActivationsStore(
        model=None, dataset=None, streaming=False, hook_name=name, hook_head_index=None, context_size=1, d_in=6,
        n_batches_in_buffer=2, total_training_tokens=ROWS, store_batch_size_prompts=100, train_batch_size_tokens=100,
        prepend_bos=False, normalize_activations="none", device=torch.device("cpu"), dtype="float32", cached_activations_path=str(tmp_path),
    )
    batches = [store.get_raw_llm_batch(raise_on_epoch_end=True) for _ in range(ROWS // 100)]
    activations = torch.cat([a for a, _ in batches])
    token_ids = torch.cat([t for _, t in batches])
    assert torch.equal(activations, data["values"][name].reshape(ROWS, 6)[order].float())
    assert torch.equal(token_ids, torch.from_numpy(order).float())  # SAELens casts every column to its dtype


def test_a_file_is_renamed_only_once_it_is_whole_and_synced(tmp_path, monkeypatch):
    seen, real_fsync = [], os.fsync

    def spy(descriptor):
        path = Path(os.readlink(f"/proc/self/fd/{descriptor}"))
        if path.name.endswith(".arrow.tmp"):
            final = path.parent / path.name[1:].removesuffix(".tmp")
            seen.append((final.name, pa.ipc.open_stream(str(path)).read_all().num_rows, final.exists()))
        real_fsync(descriptor)

    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("reads file names from /proc")
    monkeypatch.setattr(os, "fsync", spy)
    write(tmp_path, token_rows())
    assert sorted(name for name, _, _ in seen) == [f"data-{i:05d}-of-00008.arrow" for i in range(8)]
    assert [rows for _, rows, _ in sorted(seen)] == [128] * 7 + [104] and not any(visible for _, _, visible in seen)


def test_a_crashed_writer_resumes_to_the_bytes_of_an_uninterrupted_one(tmp_path, monkeypatch):
    data = token_rows()
    write(tmp_path / "whole", data)
    real_write = datasets_module._write_stream

    def crash_at_file_5(path, schema, batch):
        if path.name.startswith(".data-00005"):
            path.write_bytes(b"half a file")
            raise OSError("disk gone")
        return real_write(path, schema, batch)

    monkeypatch.setattr(datasets_module, "_write_stream", crash_at_file_5)
    with pytest.raises(OSError, match="disk gone"):
        write(tmp_path / "crashed", data)
    monkeypatch.setattr(datasets_module, "_write_stream", real_write)
    crashed = tmp_path / "crashed"
    manifest = read_manifest(crashed)
    assert [s.index for s in manifest.files] == [0, 1, 2, 3, 4] and not manifest.complete
    assert not (crashed / "state.json").exists() and not (crashed / "data-00005-of-00008.arrow").exists()
    (crashed / "data-00006-of-00008.arrow").write_bytes(b"renamed, never listed")  # a kill between rename and manifest
    spec = manifest.spec
    with DatasetWriter(crashed, spec, metadata={"model": "test"}) as writer:
        assert writer.next_row == 512  # file 4 ends group 1 (rows 256..511); group 2 holds files 4 and 5: 4 is kept
        writer.write(data["values"], token_ids=data["token_ids"], examples=data["examples"], positions=data["positions"], row=0)
    assert not list(crashed.glob(".*"))
    assert files(crashed) == files(tmp_path / "whole")


def test_a_resumed_writer_starts_at_the_first_unfinished_group(tmp_path, monkeypatch):
    data = token_rows()
    write(tmp_path / "whole", data)
    half = token_rows(rows=600)
    half["values"] = {n: v[:600] for n, v in data["values"].items()}
    spec = DatasetSpec(HOOKS, ROWS, shard_rows=128, shuffle_buffer=256, seed=3)
    with pytest.raises(DatasetError, match=r"600 of rows=1000 rows were written, so files from data-00004-of-00008\.arrow on are unfinished"):
        with DatasetWriter(tmp_path / "resumed", spec, metadata={"model": "test"}) as writer:
            writer.write(half["values"], token_ids=half["token_ids"], examples=half["examples"], positions=half["positions"])
            writer.close()
    with DatasetWriter(tmp_path / "resumed", spec, metadata={"model": "test"}) as writer:
        assert writer.next_row == 512
        part = slice(512, None)
        writer.write({n: v[part] for n, v in data["values"].items()}, token_ids=data["token_ids"][part],
                     examples=data["examples"][part], positions=data["positions"][part])
    assert files(tmp_path / "resumed") == files(tmp_path / "whole")


def test_a_folder_of_other_settings_is_refused(tmp_path):
    write(tmp_path, token_rows())
    spec = read_manifest(tmp_path).spec
    with pytest.raises(DatasetError, match=r"written with seed=3 \(now 4\)"):
        DatasetWriter(tmp_path, DatasetSpec(HOOKS, ROWS, shard_rows=128, shuffle_buffer=256, seed=4), metadata={"model": "test"})
    with pytest.raises(DatasetError, match=r"metadata \{'model': 'test'\}; now \{'model': 'other'\}"):
        DatasetWriter(tmp_path, spec, metadata={"model": "other"})
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(DatasetError, match=r"holds files but no manifest\.json"):
        DatasetWriter(tmp_path / "other", spec)


def test_the_spec_takes_its_options_by_keyword_only():
    with pytest.raises(TypeError, match=r"takes 3 positional arguments but 4 were given"):
        DatasetSpec(HOOKS, ROWS, "float32")
    assert DatasetSpec(HOOKS, ROWS, dtype="float32").dtype == "float32"


def test_the_names_the_functions_return_are_public(tmp_path):
    import shardlens as sl
    import shardlens.tables as tables

    write(tmp_path, token_rows())
    manifest = sl.verify_dataset(tmp_path)
    assert type(manifest) is sl.DatasetManifest is tables.DatasetManifest and tables.read_manifest(tmp_path) == manifest
    assert {type(f) for f in manifest.files} == {tables.DatasetFile} and type(manifest.spec) is sl.DatasetSpec is tables.DatasetSpec
    assert sl.DatasetWriter is tables.DatasetWriter and sl.DatasetError is DatasetError
    assert not {"ShardSpec", "ShardWriter", "ShardError", "verify_shards"} & set(dir(sl))  # "shard" is a stage's layers (ShardPlan)


@pytest.mark.parametrize("options, message", [
    (dict(shard_rows=0), r"shard_rows must be an int >= 1; got 0"),
    (dict(shuffle_buffer=100), r"shuffle_buffer must be a multiple of shard_rows=128; got 100"),
    (dict(seed=-1), r"seed must be an int >= 0; got -1"),
    (dict(dtype="float8"), r"dtype must be one of float16, float32, bfloat16; got 'float8'"),
    (dict(rows=0), r"rows must be an int >= 1; got 0"),
    (dict(hooks={}), r"hooks must be a non-empty mapping"),
    (dict(hooks={"a": (0,)}), r"the shape of a must be positive ints"),
    (dict(hooks={"pos": (4,)}), r"may not be named 'pos'"),
    (dict(hooks={"a": (2**20,)}, shard_rows=4096), r"shard_rows=4096 x 1048576 values of a exceeds .* use shard_rows <= 2047"),
])
def test_bad_specs_name_the_value_and_what_is_valid(options, message):
    fields = {"hooks": HOOKS, "rows": ROWS, "shard_rows": 128, **options}
    with pytest.raises(DatasetError, match=message):
        DatasetSpec(fields.pop("hooks"), fields.pop("rows"), **fields)


@pytest.mark.parametrize("change, message", [
    (lambda w: w.update(values={**w["values"], "blocks.0.hook_resid_post": w["values"]["blocks.0.hook_resid_post"].float()}),
     r"blocks\.0\.hook_resid_post is float32; the dataset's dtype is float16 \(convert first"),
    (lambda w: w.update(values={**w["values"], "blocks.1.attn.hook_z": w["values"]["blocks.1.attn.hook_z"][:9]}),
     r"every column needs the same rows .*'blocks.0.hook_resid_post': 10, 'blocks.1.attn.hook_z': 9"),
    (lambda w: w.update(values={**w["values"], "blocks.1.attn.hook_z": w["values"]["blocks.1.attn.hook_z"].reshape(10, 3, 2)}),
     r"blocks\.1\.attn\.hook_z has shape \[10, 3, 2\]; expected \[rows, 2, 3\] or \[rows, 6\]"),
    (lambda w: w["values"].pop("blocks.1.attn.hook_z"), r"write got hook points \['blocks.0.hook_resid_post'\]; the spec has"),
    (lambda w: w.update(token_ids=None), r"give token_ids \[rows\] too"),
    (lambda w: w.update(examples=torch.zeros(10)), r"example must be one integer per row; got torch.float32"),
    (lambda w: w.update(row=20), r"row=20 leaves rows 0\.\.19 unwritten; write from row 0"),
    (lambda w: w.update(row=995), r"rows 995\.\.1004 go past the spec's rows=1000"),
])
def test_bad_writes_name_the_value_and_what_is_valid(tmp_path, change, message):
    data = token_rows(rows=10)
    arguments = {"values": data["values"], "token_ids": data["token_ids"], "examples": data["examples"], "positions": data["positions"]}
    change(arguments)
    writer = DatasetWriter(tmp_path, DatasetSpec(HOOKS, ROWS, shard_rows=128))
    with pytest.raises(DatasetError, match=message):
        writer.write(arguments.pop("values"), **arguments)
    writer.abort()
    assert list(read_manifest(tmp_path).files) == []
