"""Several clients' runs as one pipeline run (serve.batching): which runs may share a batch,
and that a shared run gives each run exactly what it gives alone.

The reference for a shared run is each request run alone on the same runner: a HookedModel
in this process and a 2-stage Tracer in this process."""

import pytest
import torch

import shardlens as sl
from shardlens.hooks.run import BaseRun, Destination, Resume
from shardlens.serve import batching
from tests.serve.service import assert_same_result

FAMILY = "llama_gqa"
ATOL = 1e-5
D_MODEL, D_HEAD, D_MLP = 32, 8, 64

READ_POINTS = ("blocks.1.hook_resid_pre", "blocks.2.attn.hook_pattern", "ln_final.hook_normalized")
READ = sl.HookSpec(READ_POINTS, sl.ops.Cache())


def tokens_of(batch, seed, seq_len=7):
    return torch.randint(3, 97, (batch, seq_len), generator=torch.Generator().manual_seed(seed))


def spec(point, op):
    return sl.HookSpec(point, op)


@pytest.fixture(scope="module")
def model(tiny_checkpoints):
    return sl.HookedModel.from_pretrained(tiny_checkpoints[FAMILY])


@pytest.fixture(scope="module")
def names(model):
    return model.hook_names()


@pytest.fixture(scope="module", params=["hooked_model", "tracer_local"])
def runner(request, tiny_checkpoints, model):
    if request.param == "hooked_model":
        yield model
        return
    with sl.Tracer.from_pretrained(tiny_checkpoints[FAMILY], stages=2, backend="local") as tracer:
        yield tracer


# ---------------------------------------------------------------------- share_key


def not_shareable(model, tmp_path):
    """Requests that must run alone, by why."""
    tokens = tokens_of(2, 0)
    base = BaseRun(tokens, None, torch.zeros(2, 7, 97))
    return {
        "kv_cache": sl.RunRequest(tokens, specs=(READ,), kv_cache=model.init_kv_cache(2)),
        "resume": sl.RunRequest(tokens, specs=(READ,), resume=Resume(base, 1)),
        "sources": sl.RunRequest(tokens, specs=(READ,), sources={"clean": {"blocks.0.hook_resid_post": torch.zeros(2, 7, D_MODEL)}}),
        "write": sl.RunRequest(tokens, specs=(READ,), write=Destination(str(tmp_path / "dataset"))),
        "grads": sl.RunRequest(tokens, specs=(READ,), grads=True),
        "weight_grads": sl.RunRequest(tokens, specs=(READ,), weight_grads=True),
        "cache_grad": sl.RunRequest(tokens, specs=(READ, spec("blocks.0.hook_resid_post", sl.ops.CacheGrad()))),
        "metric": sl.RunRequest(tokens, specs=(READ,), metric=sl.metrics.loss()),
        "return_metric": sl.RunRequest(tokens, specs=(READ,), return_type="metric", metric=sl.metrics.loss()),
        "return_loss": sl.RunRequest(tokens, specs=(READ,), return_type="loss"),
        "return_both": sl.RunRequest(tokens, specs=(READ,), return_type="both"),
        "sparse_cache": sl.RunRequest(tokens, specs=(spec("blocks.0.mlp.hook_post", sl.ops.Cache(sparse=True)),)),
        "top_k_cache": sl.RunRequest(tokens, specs=(spec("blocks.0.mlp.hook_post", sl.ops.Cache(top_k=4)),)),
        "batch_selector_write": sl.RunRequest(tokens, specs=(READ, spec("blocks.0.hook_resid_post", sl.ops.Scale(2.0, batch=0)))),
        "batch_selector_read": sl.RunRequest(tokens, specs=(spec("blocks.0.hook_resid_post", sl.ops.Cache(batch=[1])),)),
        "reading_op_not_cache": sl.RunRequest(tokens, specs=(spec("blocks.0.hook_resid_post", sl.ops.NormStats()),)),
        "writing_op_not_simple": sl.RunRequest(tokens, specs=(READ, spec("blocks.0.attn.hook_pattern", sl.ops.AttnEdit(0.5)))),
        "bwd_write": sl.RunRequest(tokens, specs=(READ, sl.HookSpec("blocks.0.hook_resid_post", sl.ops.StopGrad()))),
    }


NOT_SHAREABLE = [
    "kv_cache", "resume", "sources", "write", "grads", "weight_grads", "cache_grad", "metric", "return_metric", "return_loss",
    "return_both", "sparse_cache", "top_k_cache", "batch_selector_write", "batch_selector_read", "reading_op_not_cache",
    "writing_op_not_simple", "bwd_write",
]


@pytest.mark.parametrize("why", NOT_SHAREABLE)
def test_run_that_must_run_alone_has_no_share_key(why, model, names, tmp_path):
    request = not_shareable(model, tmp_path)[why]

    assert batching.share_key(request, tokens_of(2, 0), names) is None


def test_runs_differing_only_in_writing_specs_share_a_key(names):
    requests = [
        sl.RunRequest(tokens_of(2, 0), specs=(READ,)),
        sl.RunRequest(tokens_of(1, 1), specs=(spec("blocks.0.hook_resid_post", sl.ops.Scale(0.5)), READ)),
        sl.RunRequest(tokens_of(3, 2), attention_mask=torch.ones(3, 7, dtype=torch.long),
                      specs=(READ, spec("blocks.1.mlp.hook_post", sl.ops.Patch(torch.zeros(D_MLP), positions=[1, 2])))),
        sl.RunRequest(tokens_of(2, 3), specs=(spec("blocks.0.attn.hook_z", sl.ops.Ablate("mean", heads=1)), READ.with_level(3))),
    ]

    keys = [batching.share_key(r, r.input, names) for r in requests]

    assert keys[0] is not None
    assert keys == [keys[0]] * 4


def test_different_seq_len_gives_a_different_key(names):
    short, long = sl.RunRequest(tokens_of(2, 0, 7), specs=(READ,)), sl.RunRequest(tokens_of(2, 0, 8), specs=(READ,))

    assert batching.share_key(short, short.input, names) != batching.share_key(long, long.input, names)


@pytest.mark.parametrize("other", [
    sl.HookSpec(READ_POINTS[:2], sl.ops.Cache()),
    sl.HookSpec(READ_POINTS, sl.ops.Cache(dtype="bfloat16")),
    sl.HookSpec(READ_POINTS, sl.ops.Cache(positions=-1)),
], ids=["other_points", "other_dtype", "other_positions"])
def test_different_cache_specs_give_different_keys(other, names):
    tokens = tokens_of(2, 0)

    assert batching.share_key(sl.RunRequest(tokens, specs=(READ,)), tokens, names) != batching.share_key(sl.RunRequest(tokens, specs=(other,)), tokens, names)


def test_different_return_types_give_different_keys(names):
    tokens = tokens_of(2, 0)

    assert batching.share_key(sl.RunRequest(tokens, specs=(READ,)), tokens, names) != batching.share_key(
        sl.RunRequest(tokens, specs=(READ,), return_type=None), tokens, names)


POINT = "blocks.1.hook_resid_post"
OTHER_POINT = "blocks.0.hook_resid_post"


def ordered(tokens, scale=0.5, vector=None, mask=None, **scale_options):
    """A run that reads POINT between two writes there (and READ_POINTS after them)."""
    vector = torch.linspace(-2, 2, D_MODEL) if vector is None else vector
    return sl.RunRequest(tokens, attention_mask=mask, specs=(
        spec(POINT, sl.ops.Scale(scale, **scale_options)), spec(POINT, sl.ops.Cache()), spec(POINT, sl.ops.Add(vector)), READ))


def test_runs_reading_where_they_write_share_a_key_with_the_same_order(names):
    requests = [ordered(tokens_of(2, 0)), ordered(tokens_of(1, 1), scale=3.0, positions=[2, 4], vector=torch.ones(D_MODEL)),
                ordered(tokens_of(3, 2), scale=torch.tensor([0.5, 1.0, 2.0]).reshape(3, 1, 1), mask=torch.ones(3, 7, dtype=torch.long))]

    keys = [batching.share_key(r, r.input, names) for r in requests]

    assert keys[0] is not None
    assert keys == [keys[0]] * 3


def other_orders():
    """Runs reading where they write whose specs differ from ordered()'s in order, op type,
    points or prepend; and a run that reads POINT the same way but writes elsewhere."""
    cache, add, scale = spec(POINT, sl.ops.Cache()), spec(POINT, sl.ops.Add(torch.ones(D_MODEL))), spec(POINT, sl.ops.Scale(0.5))
    return {
        "order": (cache, scale, add, READ),
        "op_type": (spec(POINT, sl.ops.Ablate()), cache, add, READ),
        "points": (spec((POINT, OTHER_POINT), sl.ops.Scale(0.5)), cache, add, READ),
        "prepend": (sl.HookSpec(POINT, sl.ops.Scale(0.5), prepend=True), cache, add, READ),
        "no_write_where_read": (spec(OTHER_POINT, sl.ops.Scale(0.5)), cache, spec(OTHER_POINT, sl.ops.Add(torch.ones(D_MODEL))), READ),
    }


@pytest.mark.parametrize("how", sorted(other_orders()))
def test_runs_reading_where_they_write_in_another_way_have_other_keys(how, names):
    tokens = tokens_of(2, 0)
    other = sl.RunRequest(tokens, specs=other_orders()[how])

    assert batching.share_key(other, tokens, names) is not None
    assert batching.share_key(other, tokens, names) != batching.share_key(ordered(tokens), tokens, names)


# ---------------------------------------------------------------------- merged and split


def left_padded(batch, pads):
    """An attention mask [batch, 7] whose row i starts with pads[i] padding tokens."""
    mask = torch.ones(batch, 7, dtype=torch.long)
    for row, pad in enumerate(pads):
        mask[row, :pad] = 0
    return mask


def sharing_requests():
    """Four runs that share a key: different writing specs, the same reading spec, batches
    of different sizes, with and without attention masks (left padding)."""
    steer = torch.linspace(-1, 1, D_HEAD)
    per_row = torch.stack([torch.full((1, D_MLP), 3.0), torch.full((1, D_MLP), -2.0)])  # [2, 1, d_mlp]: one value per row
    return [
        sl.RunRequest(tokens_of(2, 10), specs=(spec("blocks.0.hook_resid_post", sl.ops.Scale(0.5)), READ)),
        sl.RunRequest(tokens_of(1, 11), attention_mask=left_padded(1, [2]),
                      specs=(READ, spec("blocks.0.attn.hook_z", sl.ops.Add(steer, heads=1, scale=4.0)))),
        sl.RunRequest(tokens_of(2, 12), attention_mask=left_padded(2, [1, 0]),
                      specs=(READ, spec("blocks.1.mlp.hook_post", sl.ops.Patch(per_row, positions=[3, 5])))),
        sl.RunRequest(tokens_of(3, 13), specs=(READ, spec("blocks.2.hook_mlp_out", sl.ops.Ablate("mean", positions=slice(1, None))))),
    ]


def merge(requests, names, tokens=None, masks=None):
    """batching.merged of `requests`, under the key they share."""
    tokens = [torch.as_tensor(r.input) for r in requests] if tokens is None else tokens
    masks = [r.attention_mask for r in requests] if masks is None else masks
    key = batching.share_key(requests[0], tokens[0], names)
    assert key is not None and all(batching.share_key(r, t, names) == key for r, t in zip(requests, tokens))
    return batching.merged(requests, tokens, masks, key)


def shared(runner, requests):
    """Each request's part of one run of all of them on `runner`."""
    places = [runner.tokens_of(r.input, r.attention_mask) for r in requests]
    masks = [m for _, m in places]
    request, rows = merge(requests, runner.hook_names(), [t for t, _ in places], masks)
    return batching.split(runner.run(request), rows, masks)


def test_sharing_requests_share_a_key(names):
    requests = sharing_requests()

    keys = {batching.share_key(r, r.input, names) for r in requests}

    assert len(keys) == 1 and None not in keys


def test_merged_request_stacks_the_batches(names):
    requests = sharing_requests()
    tokens = [torch.as_tensor(r.input) for r in requests]

    merged, rows = merge(requests, names)

    assert rows == [slice(0, 2), slice(2, 3), slice(3, 5), slice(5, 8)]
    assert torch.equal(merged.input, torch.cat(tokens))
    assert torch.equal(merged.attention_mask, torch.cat([torch.ones(2, 7), left_padded(1, [2]), left_padded(2, [1, 0]), torch.ones(3, 7)]).long())
    assert merged.whole_batch
    assert [s for s in merged.specs if isinstance(s.op, sl.ops.Cache)] == [READ]  # read once for every run
    assert [s.op.batch for s in merged.specs if not isinstance(s.op, sl.ops.Cache)] == [slice(0, 2), slice(2, 3), slice(3, 5), slice(5, 8)]


def test_merged_request_without_masks_has_none(names):
    requests = [sl.RunRequest(tokens_of(2, 0), specs=(READ,)), sl.RunRequest(tokens_of(1, 1), specs=(READ,))]

    merged, _ = merge(requests, names)

    assert merged.attention_mask is None
    assert not merged.whole_batch


def test_shared_run_gives_each_run_what_it_gives_alone(runner):
    requests = sharing_requests()
    parts = shared(runner, requests)

    assert len(parts) == len(requests)
    for part, request in zip(parts, requests):
        assert_same_result(part, runner.run(request))


def test_shared_run_of_reading_only_runs_gives_each_its_own_rows(runner):
    requests = [sl.RunRequest(tokens_of(2, 20), specs=(READ,)), sl.RunRequest(tokens_of(3, 21), attention_mask=left_padded(3, [0, 3, 1]), specs=(READ,))]
    parts = shared(runner, requests)

    for part, request in zip(parts, requests):
        assert_same_result(part, runner.run(request))


def test_shared_run_returning_nothing_gives_each_its_cache(runner):
    requests = [sl.RunRequest(tokens_of(1, 30), return_type=None, specs=(READ, spec("blocks.0.hook_resid_post", sl.ops.Ablate()))),
                sl.RunRequest(tokens_of(2, 31), return_type=None, specs=(READ,))]
    parts = shared(runner, requests)

    for part, request in zip(parts, requests):
        alone = runner.run(request)
        assert part.output is None and alone.output is None
        assert sorted(part.cache) == sorted(alone.cache) == sorted(READ_POINTS)
        for name in READ_POINTS:
            torch.testing.assert_close(part.cache[name], alone.cache[name], atol=ATOL, rtol=0)


def test_merged_request_of_runs_reading_where_they_write_keeps_their_order(names):
    requests = [ordered(tokens_of(2, 0)), ordered(tokens_of(1, 1), scale=3.0)]

    merged, rows = merge(requests, names)

    ops = [(type(s.op).__name__, s.op.batch) for s in merged.specs]
    assert ops == [("Scale", rows[0]), ("Scale", rows[1]), ("Cache", None), ("Add", rows[0]), ("Add", rows[1]), ("Cache", None)]
    assert merged.specs[2] == spec(POINT, sl.ops.Cache()) and merged.specs[5] == READ


def test_shared_run_of_runs_reading_where_they_write_gives_each_what_it_gives_alone(runner):
    requests = [
        ordered(tokens_of(2, 40)),
        ordered(tokens_of(1, 41), scale=3.0, positions=[2, 4], vector=torch.ones(D_MODEL), mask=left_padded(1, [3])),
        ordered(tokens_of(3, 42), scale=torch.tensor([0.5, 1.0, 2.0]).reshape(3, 1, 1), mask=left_padded(3, [0, 1, 2])),
    ]

    parts = shared(runner, requests)

    for part, request in zip(parts, requests):
        assert_same_result(part, runner.run(request))


def test_a_runner_that_splits_batches_shares_writing_runs_only_when_they_ask_for_their_whole_batch(names, tiny_checkpoints):
    tokens = tokens_of(2, 40)
    ablate = spec("blocks.1.hook_mlp_out", sl.ops.Ablate("mean"))  # its mean is over the batch it sees
    writing, whole = sl.RunRequest(tokens, specs=(ablate,)), sl.RunRequest(tokens, specs=(ablate,), whole_batch=True)
    reading = sl.RunRequest(tokens, specs=(READ,))

    keys = {name: batching.share_key(r, tokens, names, splits=True) for name, r in (("writing", writing), ("whole", whole), ("reading", reading))}

    assert keys["writing"] is None and keys["whole"] is not None and keys["reading"] is not None
    assert batching.share_key(writing, tokens, names, splits=False) is not None
    with sl.Tracer.from_pretrained(tiny_checkpoints[FAMILY], stages=2, backend="local", microbatch_size=1) as split:
        alone, whole_alone = split.run(writing), split.run(whole)
        (together,) = shared(split, [whole])
    assert not torch.allclose(alone.output, whole_alone.output, atol=1e-3)  # why: per microbatch, the mean is another
    assert_same_result(together, whole_alone)
