"""Results on the wire: tensors through an Arrow IPC stream (serve.wire), and a run job's
RunResults through named entries and back (serve.calls.result_entries / runs_from).

The references are the tensors sent: what arrives must equal them exactly (dtype, shape,
bytes)."""

import io
import warnings

import pyarrow as pa
import pytest
import torch

import shardlens as sl
from shardlens.serve import calls, wire


def sent(entries, meta=None):
    """The stream encode_tensors writes for `entries`, as one bytes object."""
    return b"".join(wire.encode_tensors(entries, {} if meta is None else meta))


def assert_same(got, expected):
    assert got.dtype == expected.dtype
    assert tuple(got.shape) == tuple(expected.shape)
    assert torch.equal(got, expected)


TENSORS = {
    "float32": torch.linspace(-3, 3, 24).reshape(2, 3, 4),
    "bfloat16": torch.linspace(-3, 3, 24).reshape(4, 6).to(torch.bfloat16),
    "float16": torch.tensor([0.5, -1.25, 65504.0], dtype=torch.float16),
    "int64": torch.tensor([[-(2**62), 0, 7], [1, 2**40, -3]], dtype=torch.int64),
    "bool": torch.tensor([[True, False, True], [False, False, True]]),
    "empty": torch.zeros(0, 5),
    "empty_int": torch.zeros(3, 0, dtype=torch.int64),
    "scalar": torch.tensor(2.75),
    "scalar_int": torch.tensor(-9, dtype=torch.int64),
    "transposed": torch.arange(12, dtype=torch.float32).reshape(3, 4).t(),  # not contiguous
}


@pytest.mark.parametrize("kind", sorted(TENSORS))
def test_tensor_round_trips_exactly(kind):
    tensor = TENSORS[kind]

    entries, _ = wire.decode_tensors(sent([("x", tensor)]))

    assert list(entries) == ["x"]
    assert_same(entries["x"], tensor)


def test_several_entries_arrive_by_name():
    sent_entries = [(f"0/cache/{name}", TENSORS[name]) for name in ("float32", "bool", "scalar", "empty")]

    entries, _ = wire.decode_tensors(sent(sent_entries))

    assert list(entries) == [name for name, _ in sent_entries]
    for name, tensor in sent_entries:
        assert_same(entries[name], tensor)


def test_tensor_larger_than_a_chunk_arrives_whole(monkeypatch):
    monkeypatch.setattr(wire, "CHUNK_BYTES", 64)
    big = torch.arange(1000, dtype=torch.float32).reshape(10, 100)  # 4000 bytes: 63 pieces of at most 64
    small = torch.tensor([1, 2, 3], dtype=torch.int64)  # 24 bytes: one piece

    data = sent([("big", big), ("small", small)])
    entries, _ = wire.decode_tensors(data)

    assert_same(entries["big"], big)
    assert_same(entries["small"], small)
    batches = list(pa.ipc.open_stream(data))
    assert [b.column(0)[0].as_py() for b in batches] == ["big"] * 63 + ["small"]
    assert max(len(b.column(3)[0].as_py()) for b in batches) == 64


def test_meta_comes_back():
    meta = {"outputs": ["tensor", "none"], "sparse": {"0/cache/x": [2, 3]}, "session": None, "n": 3}

    _, got = wire.decode_tensors(sent([("x", TENSORS["float32"])], meta))

    assert got == meta


def test_meta_comes_back_without_entries():
    entries, meta = wire.decode_tensors(sent([], {"outputs": []}))

    assert entries == {}
    assert meta == {"outputs": []}


def test_decoding_from_a_file_reads_as_from_bytes(monkeypatch):
    monkeypatch.setattr(wire, "CHUNK_BYTES", 16)
    sent_entries = [("a", TENSORS["bfloat16"]), ("b", TENSORS["int64"]), ("c", TENSORS["scalar"])]
    data = sent(sent_entries, {"k": "v"})

    from_bytes, meta_bytes = wire.decode_tensors(data)
    from_file, meta_file = wire.decode_tensors(io.BytesIO(data))

    assert meta_file == meta_bytes == {"k": "v"}
    assert list(from_file) == list(from_bytes) == ["a", "b", "c"]
    for name, tensor in sent_entries:
        assert_same(from_file[name], tensor)


def test_decoded_tensors_are_writable():
    tensor = TENSORS["float32"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns when it wraps a read-only buffer
        entries, _ = wire.decode_tensors(sent([("x", tensor)]))

    entries["x"][0, 0, 0] = 100.0

    assert entries["x"][0, 0, 0].item() == 100.0
    assert tensor[0, 0, 0].item() == -3.0


# ---------------------------------------------------------------------- RunResults


def sparse_cache_entry():
    dense = torch.zeros(2, 3, 8)
    dense[0, 1, 5], dense[1, 2, 0], dense[1, 0, 7] = 1.5, -2.0, 0.25
    return dense.to_sparse().coalesce()


def run_results():
    logits = torch.linspace(-1, 1, 2 * 3 * 5).reshape(2, 3, 5)
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    return [
        sl.RunResult(logits, {"blocks.0.hook_resid_post": torch.ones(2, 3, 4), "blocks.1.attn.hook_pattern": torch.rand(2, 4, 3, 3)},
                     attention_mask=mask),
        sl.RunResult((logits * 2, torch.tensor(3.25)), {"blocks.0.mlp.hook_post": sparse_cache_entry()}),
        sl.RunResult(None, {"blocks.2.hook_resid_post": torch.arange(6, dtype=torch.float32).reshape(2, 3, 1).to(torch.bfloat16)}),
        sl.RunResult(None),
    ]


def through_the_wire(results):
    entries, meta = calls.result_entries("run", results)
    received, received_meta = wire.decode_tensors(sent(entries, meta))
    return calls.runs_from(received, received_meta)


def assert_same_value(got, expected):
    if expected is None:
        assert got is None
    elif isinstance(expected, tuple):
        assert isinstance(got, tuple) and len(got) == len(expected)
        for g, e in zip(got, expected):
            assert_same(g, e)
    elif expected.is_sparse:
        assert got.is_sparse
        assert tuple(got.shape) == tuple(expected.shape)
        assert torch.equal(got.indices(), expected.indices())
        assert_same(got.values(), expected.values())
    else:
        assert_same(got, expected)


def test_run_results_round_trip():
    results = run_results()

    got = through_the_wire(results)

    assert len(got) == len(results)
    for g, e in zip(got, results):
        assert_same_value(g.output, e.output)
        assert sorted(g.cache) == sorted(e.cache)
        for name in e.cache:
            assert_same_value(g.cache[name], e.cache[name])
        assert_same_value(g.attention_mask, e.attention_mask)


def test_result_outputs_and_sparse_shapes_go_in_meta():
    entries, meta = calls.result_entries("run", run_results())

    assert meta == {"outputs": ["tensor", "pair", "none", "none"], "sparse": {"1/cache/blocks.0.mlp.hook_post": [2, 3, 8]}}
    assert [name for name, _ in entries] == [
        "0/output/0", "0/cache/blocks.0.hook_resid_post", "0/cache/blocks.1.attn.hook_pattern", "0/mask",
        "1/output/0", "1/output/1", "1/cache/blocks.0.mlp.hook_post#indices", "1/cache/blocks.0.mlp.hook_post#values",
        "2/cache/blocks.2.hook_resid_post",
    ]


def test_empty_sparse_cache_entry_round_trips():
    empty = torch.zeros(2, 3, 8).to_sparse().coalesce()

    (got,) = through_the_wire([sl.RunResult(None, {"blocks.0.mlp.hook_post": empty})])

    assert_same_value(got.cache["blocks.0.mlp.hook_post"], empty)
    assert got.cache["blocks.0.mlp.hook_post"]._nnz() == 0


def test_generate_result_entries_name_the_store():
    tokens = torch.tensor([[5, 6, 7, 8]])
    store = {"blocks.0.hook_resid_post": torch.ones(1, 4, 4), "blocks.0.mlp.hook_post": sparse_cache_entry()}

    entries, meta = calls.result_entries("generate", {"tokens": tokens, "store": store})
    received, received_meta = wire.decode_tensors(sent(entries, meta))
    dense = calls.dense_entries(received, received_meta)

    assert received_meta == {"session": None, "sparse": {"store/blocks.0.mlp.hook_post": [2, 3, 8]}}
    assert sorted(dense) == ["store/blocks.0.hook_resid_post", "store/blocks.0.mlp.hook_post", "tokens"]
    assert_same(dense["tokens"], tokens)
    assert_same(dense["store/blocks.0.hook_resid_post"], store["blocks.0.hook_resid_post"])
    assert_same_value(dense["store/blocks.0.mlp.hook_post"], store["blocks.0.mlp.hook_post"])
