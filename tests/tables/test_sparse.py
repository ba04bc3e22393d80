"""Sparse cache entries (Cache(sparse=True), Cache(top_k=k), and CacheGrad's same options):
what they keep, and exact round trips through ActivationCache, Arrow, Parquet and a 2-stage
Tracer, against dense references."""

from types import SimpleNamespace

import pyarrow.dataset as ds
import pytest
import torch

import shardlens as sl
from shardlens.hooks.ops import Cache, CacheGrad, RunContext
from tests.tiny_models import save_tiny_model

MLP = "blocks.1.mlp.hook_post"  # [batch, pos, d_mlp=64]
PATTERN = "blocks.0.attn.hook_pattern"  # [batch, head, q_pos, k_pos]: causal, so exact zeros above the diagonal


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_model("llama_gqa", tmp_path_factory.mktemp("sparse") / "llama_gqa")


@pytest.fixture(scope="module")
def model(checkpoint):
    return sl.HookedModel.from_pretrained(checkpoint)


def topk_dense(dense, k):
    """The reference: torch.topk's values scattered into zeros."""
    values, indices = dense.topk(k, dim=-1)
    return torch.zeros_like(dense).scatter_(-1, indices, values)


def dense_and_sparse(model, padded, specs):
    """A dense run caching the points the specs name (so that attention takes the same path:
    fully masked padding rows differ between SDPA and the eager path that pattern hooks
    need), and a run with the specs."""
    tokens, mask = padded
    names = [name for spec in specs for name in spec.resolve(model.hook_names())]
    _, dense = model.run_with_cache(tokens, attention_mask=mask, names_filter=names)
    _, sparse = model.run_with_cache(tokens, attention_mask=mask, names_filter=[], fwd_hooks=specs)
    return dense, sparse


def store(op, tensor, name=MLP):
    ctx = RunContext(None, {})
    op(tensor, SimpleNamespace(name=name), ctx)
    return ctx.cache[name]


# ---------------------------------------------------------------------- what the op keeps


def test_top_k_keeps_exactly_torch_topk(model, padded):
    dense, sparse = dense_and_sparse(model, padded, [sl.HookSpec(MLP, Cache(top_k=5))])
    entry = sparse[MLP]
    assert entry.is_sparse and entry.shape == dense[MLP].shape and entry._nnz() == 3 * 8 * 5
    values, indices = dense[MLP].topk(5, dim=-1)
    kept = entry.coalesce()
    rows = kept.indices()[:2].T.reshape(3, 8, 5, 2)  # each position's 5 stored entries
    assert torch.equal(rows[..., 0], torch.arange(3)[:, None, None].expand(3, 8, 5))
    assert torch.equal(kept.indices()[2].reshape(3, 8, 5), indices.sort(-1).values)
    assert torch.equal(entry.to_dense(), topk_dense(dense[MLP], 5))


def test_sparse_keeps_the_nonzeros(model, padded):
    dense, sparse = dense_and_sparse(model, padded, [sl.HookSpec(PATTERN, Cache(sparse=True))])
    pattern = dense[PATTERN]
    entry = sparse[PATTERN]
    assert entry.is_sparse and entry._nnz() == int((pattern != 0).sum()) < pattern.numel()
    assert torch.equal(entry.to_dense(), pattern)


def test_top_k_with_sparse_drops_the_zeros_among_the_k():
    tensor = torch.tensor([[[3.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 2.0]]])  # [1, 2, 4]
    assert store(Cache(top_k=3), tensor)._nnz() == 6  # zeros kept: exactly k per position
    entry = store(Cache(top_k=3, sparse=True), tensor)
    assert entry._nnz() == 3 and torch.equal(entry.to_dense(), tensor)
    assert torch.equal(entry.coalesce().indices(), torch.tensor([[0, 0, 0], [0, 0, 1], [0, 3, 3]]))


def test_dtype_and_positions_apply_before_the_sparse_form():
    tensor = torch.randn(2, 6, 10, generator=torch.Generator().manual_seed(0))
    entry = store(Cache(top_k=2, positions=[4, 1], dtype="bfloat16"), tensor)
    assert entry.dtype == torch.bfloat16 and entry.shape == (2, 2, 10)
    assert torch.equal(entry.to_dense(), topk_dense(tensor[:, [4, 1]], 2).bfloat16())


@pytest.mark.parametrize("op", [Cache, CacheGrad])
@pytest.mark.parametrize("options, message", [
    (dict(top_k=0), r"top_k=.*positive int.*got 0"),
    (dict(top_k=2.5), r"top_k=.*got 2.5"),
    (dict(top_k=True), r"top_k=.*got True"),
    (dict(top_k="8"), r"top_k=.*got '8'"),
    (dict(sparse="yes"), r"sparse=.*True or False; got 'yes'"),
])
def test_bad_options_are_refused_at_construction(op, options, message):
    with pytest.raises(ValueError, match=message):
        op(**options)


def test_top_k_larger_than_the_features_names_the_point_and_sizes(model, padded):
    with pytest.raises(ValueError, match=rf"top_k=65 at {MLP}: its last axis has only 64 features"):
        dense_and_sparse(model, padded, [sl.HookSpec(MLP, Cache(top_k=65))])


@pytest.mark.parametrize("op", [Cache, CacheGrad])
def test_specs_with_sparse_options_round_trip_through_json(op):
    spec = sl.HookSpec(MLP, op(top_k=7, sparse=True))
    assert sl.HookSpec.from_json(spec.to_json()) == spec
    assert sl.HookSpec.from_json(spec.to_json()).op.top_k == 7


def gradients(model, padded, specs, names=(MLP,)):
    """The dense gradients of the loss at `names` (a plain incl_bwd run) and a run with `specs`."""
    tokens, mask = padded
    _, dense = model.run_with_cache(tokens, attention_mask=mask, return_type="loss", names_filter=list(names), incl_bwd=True)
    _, cache = model.run_with_cache(tokens, attention_mask=mask, return_type="loss", names_filter=[], incl_bwd=True, fwd_hooks=specs)
    return dense, cache


def test_cache_grad_keeps_what_cache_keeps_of_the_gradient(model, padded):
    first = "blocks.0.mlp.hook_post"
    specs = [sl.HookSpec(MLP, CacheGrad(sparse=True)), sl.HookSpec(first, CacheGrad(top_k=3))]
    dense, cache = gradients(model, padded, specs, names=(MLP, first))
    grad, entry = dense[MLP + "_grad"], cache[MLP + "_grad"]
    assert entry.is_sparse and entry._nnz() == int((grad != 0).sum()) and torch.equal(entry.to_dense(), grad)
    top = cache[first + "_grad"]
    assert top.is_sparse and top._nnz() == 3 * 8 * 3 and torch.equal(top.to_dense(), topk_dense(dense[first + "_grad"], 3))


# ---------------------------------------------------------------------- ActivationCache


def test_cache_methods_keep_sparse_entries(model, padded):
    _, cache = dense_and_sparse(model, padded, [sl.HookSpec("blocks.*.mlp.hook_post", Cache(top_k=3))])
    assert "sparse" in repr(cache)
    moved = cache.to("cpu")
    assert moved[MLP].is_sparse and torch.equal(moved[MLP].to_dense(), cache[MLP].to_dense())
    stacked = cache.stack("blocks.*.mlp.hook_post")
    assert torch.equal(stacked.to_dense(), torch.stack([cache[f"blocks.{i}.mlp.hook_post"].to_dense() for i in range(3)]))


# ---------------------------------------------------------------------- Arrow and Parquet


SPECS = [sl.HookSpec(MLP, Cache(top_k=4)), sl.HookSpec(PATTERN, Cache(sparse=True))]


def expected_dense(dense, name, mask, layout):
    """What a dense read of the sparse entry must give: torch.topk's values (MLP) or the
    pattern, and in layout "token" zero at padding (no row is written there)."""
    value = topk_dense(dense[name], 4) if name == MLP else dense[name].clone()
    if layout == "token":
        keep = mask.bool()[:, None, :, None] if name == PATTERN else mask.bool()[:, :, None]
        value = value * keep
    return value


@pytest.mark.parametrize("layout", ["example", "token"])
def test_parquet_round_trip_dense_and_sparse(model, padded, tmp_path, layout):
    dense, cache = dense_and_sparse(model, padded, SPECS)
    mask = padded[1]
    cache.to_parquet(tmp_path / "acts", layout=layout)
    back = sl.read_cache(tmp_path / "acts")
    for name in (MLP, PATTERN):
        assert not back[name].is_sparse
        assert torch.equal(back[name], expected_dense(dense, name, mask, layout)), name
    sparse = sl.read_cache(tmp_path / "acts", sparse=True)
    for name in (MLP, PATTERN):
        assert sparse[name].is_sparse and sparse[name].is_coalesced()
        assert torch.equal(sparse[name].to_dense(), expected_dense(dense, name, mask, layout))
    if layout == "token":
        assert torch.equal(back.attention_mask, mask)
    topk_entries = sparse[MLP]._nnz()
    assert topk_entries == (int(mask.sum()) if layout == "token" else 3 * 8) * 4  # exactly k per written position


@pytest.mark.parametrize("layout", ["example", "token"])
def test_arrow_round_trip_keeps_indices_and_values_exactly(model, padded, layout):
    from shardlens.tables.arrow import tables_to_cache

    _, cache = dense_and_sparse(model, padded, [sl.HookSpec(MLP, Cache(top_k=4, dtype="bfloat16"))])
    table = cache.to_arrow(layout)[MLP]
    assert "value" not in table.column_names and {"indices", "values"} <= set(table.column_names)
    assert table.schema.field("indices").metadata[b"shardlens.sparse_shape"] == (b"[64]" if layout == "token" else b"[8, 64]")
    back = tables_to_cache(table, sparse=True)[MLP]
    original = cache[MLP].coalesce()
    if layout == "token":  # padding positions are not written
        keep = padded[1].bool()[original.indices()[0], original.indices()[1]]
        original = torch.sparse_coo_tensor(original.indices()[:, keep], original.values()[keep], original.shape, check_invariants=True).coalesce()
    assert back.dtype == torch.bfloat16
    assert torch.equal(back.indices(), original.indices()) and torch.equal(back.values(), original.values())


def test_padding_positions_get_no_rows(model, padded, tmp_path):
    tokens, mask = padded
    _, dense = model.run_with_cache(tokens, attention_mask=mask, names_filter=[MLP])
    _, sparse = dense_and_sparse(model, padded, SPECS)
    dense_rows = dense.to_arrow("token")[MLP]
    sparse_rows = sparse.to_arrow("token")[MLP]
    assert sparse_rows.num_rows == int(mask.sum()) == dense_rows.num_rows
    assert sparse_rows.column("example").equals(dense_rows.column("example"))
    assert sparse_rows.column("pos").to_pylist() == mask.nonzero()[:, 1].tolist()
    sparse.to_parquet(tmp_path / "acts", layout="token")
    on_disk = ds.dataset(tmp_path / "acts" / f"hook={PATTERN}", format="parquet").to_table()
    assert sorted(zip(on_disk.column("example").to_pylist(), on_disk.column("pos").to_pylist())) == [tuple(p) for p in mask.nonzero().tolist()]


def test_a_sink_appends_batches_and_read_cache_filters_them(model, padded, tmp_path):
    tokens, mask = padded
    dense, cache = dense_and_sparse(model, padded, SPECS)
    with sl.ParquetSink(tmp_path / "acts", layout="token") as sink:
        for batch in range(2):
            sink.write(sl.ActivationCache(dict(cache), attention_mask=mask, examples=torch.arange(3) + 3 * batch, batch=batch))
    back = sl.read_cache(tmp_path / "acts", hooks=[MLP], examples=[1, 4, 5])
    assert list(back) == [MLP] and back.examples.tolist() == [1, 4, 5]
    expected = expected_dense(dense, MLP, mask, "token")
    assert torch.equal(back[MLP], expected[[1, 1, 2]])


def test_a_sparse_and_a_dense_entry_of_one_hook_point_are_refused_clearly():
    cache = sl.ActivationCache({MLP: torch.ones(1, 2, 3).to_sparse(), MLP + "_grad": torch.ones(1, 2, 3)})
    with pytest.raises(ValueError, match=rf"{MLP} has a sparse and a dense entry.*sl\.ops\.CacheGrad\(sparse=True\) keeps every non-zero"):
        cache.to_arrow()


@pytest.mark.parametrize("layout", ["example", "token"])
def test_a_sparse_activation_and_its_gradient_share_a_table_and_come_back(model, padded, tmp_path, layout):
    dense, cache = gradients(model, padded, [sl.HookSpec(MLP, Cache(top_k=4)), sl.HookSpec(MLP, CacheGrad(sparse=True))])
    (table,) = cache.to_arrow(layout).values()
    assert sorted(set(table.column("direction").to_pylist())) == ["bwd", "fwd"] and "value" not in table.column_names
    cache.to_parquet(tmp_path / "acts", layout=layout)
    keep = padded[1].bool()[:, :, None] if layout == "token" else True  # padding has no rows in layout "token"
    expected = {MLP: topk_dense(dense[MLP], 4) * keep, MLP + "_grad": dense[MLP + "_grad"] * keep}
    back, sparse = sl.read_cache(tmp_path / "acts"), sl.read_cache(tmp_path / "acts", sparse=True)
    assert sorted(back) == sorted(expected)
    for name, value in expected.items():
        assert not back[name].is_sparse and torch.equal(back[name], value), name
        assert sparse[name].is_sparse and torch.equal(sparse[name].to_dense(), value), name


def test_out_of_range_indices_on_disk_are_refused(model, padded):
    import pyarrow as pa

    from shardlens.tables.arrow import tables_to_cache

    _, cache = dense_and_sparse(model, padded, [sl.HookSpec(MLP, Cache(top_k=2))])
    table = cache.to_arrow("token")[MLP]
    field = table.schema.field("indices").with_metadata({b"shardlens.sparse_shape": b"[8]"})
    table = table.cast(pa.schema([field if f.name == "indices" else f for f in table.schema]))
    with pytest.raises(ValueError, match=r"sparse indices must lie in \[0, 8\)"):
        tables_to_cache(table)


# ---------------------------------------------------------------------- the Tracer


@pytest.mark.parametrize("backend", ["local", "ray"])
def test_a_two_stage_tracer_gives_the_hooked_models_sparse_entries(model, checkpoint, padded, tmp_path, request, backend):
    if backend == "ray":
        request.getfixturevalue("ray_session")  # the entries cross processes through Ray's object store
    tokens, mask = padded
    specs = [sl.HookSpec("blocks.*.mlp.hook_post", Cache(top_k=6)), sl.HookSpec(PATTERN, Cache(sparse=True))]
    _, expected = model.run_with_cache(tokens, attention_mask=mask, names_filter=[], fwd_hooks=specs)
    with sl.Tracer.from_pretrained(checkpoint, stages=2, backend=backend, microbatch_size=2) as tracer:
        _, got = tracer.run_with_cache(tokens, attention_mask=mask, names_filter=[], fwd_hooks=specs)
        _, parts = tracer.write_cache(tokens, tmp_path / "written", attention_mask=mask, names_filter=[], fwd_hooks=specs, layout="token")
    assert sorted(got) == sorted(expected) and len(got) == 4
    for name in expected:
        mine, theirs = got[name], expected[name].coalesce()
        assert mine.is_sparse and mine.is_coalesced() and mine.shape == theirs.shape
        assert torch.equal(mine.indices(), theirs.indices()), name
        assert torch.allclose(mine.values(), theirs.values(), atol=1e-5), name
    expected.to_parquet(tmp_path / "one", layout="token")
    written, one = sl.read_cache(tmp_path / "written", sparse=True), sl.read_cache(tmp_path / "one", sparse=True)
    assert len(parts) == 4 * 2 and sorted(written) == sorted(one)  # a part per hook point per microbatch
    for name in one:
        assert torch.equal(written[name].indices(), one[name].indices()), name
        assert torch.allclose(written[name].values(), one[name].values(), atol=1e-5), name


def test_a_two_stage_tracer_gives_the_hooked_models_sparse_gradients(model, checkpoint, padded):
    tokens, mask = padded
    specs = [sl.HookSpec("blocks.*.mlp.hook_post", Cache(top_k=4)), sl.HookSpec("blocks.*.mlp.hook_post", CacheGrad(sparse=True))]
    run = dict(attention_mask=mask, return_type="loss", names_filter=[], incl_bwd=True, fwd_hooks=specs)
    _, expected = model.run_with_cache(tokens, **run)
    with sl.Tracer.from_pretrained(checkpoint, stages=2, backend="local", microbatch_size=2) as tracer:
        _, got = tracer.run_with_cache(tokens, **run)
    assert sorted(got) == sorted(expected) and len(got) == 6
    for name in expected:
        assert got[name].is_sparse and got[name].is_coalesced(), name
        assert torch.allclose(got[name].to_dense(), expected[name].to_dense(), atol=1e-6), name
