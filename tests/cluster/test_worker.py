"""StageWorker without Ray: levels, forward/backward/take, errors."""

import pytest
import torch

import shardlens as sl
from shardlens.cluster import StageWorker
from shardlens.cluster.worker import pack, unpack
from shardlens.errors import RemoteHookError
from shardlens.sharding import ShardPlan, StageIO

Spec, ops = sl.HookSpec, sl.ops


@pytest.fixture
def workers(tiny_checkpoints):
    source = str(tiny_checkpoints["llama_gqa"])
    plan = ShardPlan.for_model(source, stages=2)
    return [StageWorker(source, plan.to_json(), i, replica=0) for i in range(2)]


@pytest.fixture
def tokens():
    return torch.randint(3, 97, (2, 7), generator=torch.Generator().manual_seed(0))


def test_levels_install_and_remove(workers):
    first, _ = workers
    first.install(1, [Spec("hook_embed", ops.Scale(1.0)).to_json()])
    first.install(2, [Spec("blocks.0.hook_resid_pre", ops.Scale(1.0)).to_json()])
    first.install(None, [Spec("blocks.1.hook_resid_pre", ops.Scale(1.0), permanent=True).to_json()])
    listed = first.list_hooks()
    assert {name: [(s.op, s.level, s.permanent) for s in specs] for name, specs in listed.items()} == {
        "hook_embed": [(ops.Scale(1.0), 1, False)],
        "blocks.0.hook_resid_pre": [(ops.Scale(1.0), 2, False)],
        "blocks.1.hook_resid_pre": [(ops.Scale(1.0), None, True)],
    }
    first.remove(2)
    assert "blocks.0.hook_resid_pre" not in first.list_hooks()
    first.remove(None)
    assert list(first.list_hooks()) == ["blocks.1.hook_resid_pre"]
    first.remove(None, including_permanent=True)
    assert first.list_hooks() == {}


def test_forward_backward_take(workers, tokens, tiny_checkpoints):
    first, last = workers
    for w in workers:
        w.install(1, [Spec(sl.points("resid_pre"), ops.Cache()).to_json(), Spec(sl.points("resid_pre"), ops.CacheGrad()).to_json()])
    io = last.forward("b0", first.forward("b0", StageIO(input_ids=tokens, labels=tokens), keep_graph=True), keep_graph=True)
    grad = last.backward("b0", torch.tensor(1.0))
    assert first.backward("b0", grad) is None
    results = {name: unpack(packed) for name, packed in {**first.take("b0"), **last.take("b0")}.items()}
    model = sl.HookedModel.from_pretrained(tiny_checkpoints["llama_gqa"])
    loss, expected = model.run_with_cache(tokens, return_type="loss", names_filter=sl.HookSpec(sl.points("resid_pre"), ops.Cache()).resolve(model.hook_names()), incl_bwd=True)
    assert torch.allclose(io.loss, loss, atol=1e-6)
    for name in expected:
        assert torch.allclose(results[name], expected[name], atol=1e-5), name
    assert first.take("b0") == {} and first.stats()["pending_graphs"] == 0


def test_a_raising_hook_becomes_remote_hook_error(workers, tokens):
    first, _ = workers
    first.install(1, [Spec("blocks.0.attn.hook_pattern", ops.Patch(torch.ones(5))).to_json()])  # wrong size: fails when it runs
    with pytest.raises(RemoteHookError) as info:
        first.forward("b7", StageIO(input_ids=tokens))
    error = info.value
    assert (error.hook, error.stage, error.replica, error.batch) == ("blocks.0.attn.hook_pattern", 0, 0, "b7")
    assert "Patch at blocks.0.attn.hook_pattern" in str(error)


def test_code_specs_need_allow_code(tiny_checkpoints):
    source = str(tiny_checkpoints["llama_gqa"])
    plan = ShardPlan.for_model(source, stages=1)
    worker = StageWorker(source, plan.to_json(), 0)
    text = Spec("hook_embed", ops.Code(lambda x, hook: x)).to_json(allow_code=True)
    with pytest.raises(ValueError, match="allow_code=True"):
        worker.install(1, [text])
    StageWorker(source, plan.to_json(), 0, allow_code=True).install(1, [text])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64])
def test_packed_results_come_back_exactly(dtype):
    tensor = (torch.randn(3, 4, 5) * 100).to(dtype)
    back = unpack(pack(tensor[:, 1:]))  # a view, not contiguous
    assert back.dtype == dtype and torch.equal(back, tensor[:, 1:])
