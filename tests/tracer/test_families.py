"""Every supported family through the Tracer: two stages against one process."""

import pytest
import torch

import shardlens as sl
from shardlens.tracer import Tracer, attribution, patching
from tests.tiny_models import FAMILIES


@pytest.fixture
def tokens():
    return torch.randint(3, 97, (4, 9), generator=torch.Generator().manual_seed(0))


def assert_same_cache(cache, expected, atol=1e-5):
    assert sorted(cache) == sorted(expected)
    for name in expected:
        assert torch.allclose(cache[name].float(), expected[name].float(), atol=atol), name


@pytest.mark.parametrize("name", FAMILIES)
def test_two_stages_on_the_local_backend_equal_one_process(tiny_checkpoints, tokens, name):
    model = sl.HookedModel.from_pretrained(tiny_checkpoints[name])
    logits_ref, every_ref = model.run_with_cache(tokens)
    loss_ref, grads_ref = model.run_with_cache(tokens, return_type="loss", names_filter="blocks.*.hook_resid_pre", incl_bwd=True)
    with Tracer.from_pretrained(tiny_checkpoints[name], stages=2, backend="local", microbatch_size=2) as tracer:
        assert sorted(tracer.hook_names()) == sorted(model.hook_names())
        logits, every = tracer.run_with_cache(tokens)
        loss, grads = tracer.run_with_cache(tokens, return_type="loss", names_filter="blocks.*.hook_resid_pre", incl_bwd=True)
        generated = tracer.generate(tokens[:2, :4], max_new_tokens=6)  # past the 4-token sliding windows
    assert torch.equal(generated, model.generate(tokens[:2, :4], max_new_tokens=6))
    assert torch.allclose(logits, logits_ref, atol=1e-5)
    assert_same_cache(every, every_ref)
    assert torch.allclose(every.decompose_resid(layer=2), every_ref.decompose_resid(layer=2), atol=1e-5)  # Granite's scales too
    assert torch.allclose(loss, loss_ref, atol=1e-6)
    assert_same_cache(grads, grads_ref, atol=1e-6)


@pytest.mark.parametrize("name", ["gemma2", "mixtral", "falcon"])
def test_two_stages_on_ray_equal_one_process(ray_session, tiny_checkpoints, tokens, name):
    model = sl.HookedModel.from_pretrained(tiny_checkpoints[name])
    loss_ref, cache_ref = model.run_with_cache(tokens, return_type="loss", names_filter="blocks.*.hook_resid_post", incl_bwd=True)
    with Tracer.from_pretrained(tiny_checkpoints[name], stages=2, backend="ray") as tracer:
        loss, cache = tracer.run_with_cache(tokens, return_type="loss", names_filter="blocks.*.hook_resid_post", incl_bwd=True)
        generated = tracer.generate(tokens[:2], max_new_tokens=6)
    assert torch.allclose(loss, loss_ref, atol=1e-6)
    assert_same_cache(cache, cache_ref, atol=1e-6)
    assert torch.equal(generated, model.generate(tokens[:2], max_new_tokens=6))


@pytest.mark.parametrize("name", ["gemma2", "olmo2", "qwen2_moe"])
def test_sweeps_and_attribution_on_a_tracer_equal_one_process(tiny_checkpoints, tokens, name):
    model = sl.HookedModel.from_pretrained(tiny_checkpoints[name])
    clean, corrupt = tokens[:2], tokens[2:]
    metric = sl.metrics.logit_diff([5, 6], [7, 8])
    with Tracer.from_pretrained(tiny_checkpoints[name], stages=2, backend="local") as tracer:
        for run in (
            lambda m: patching.sweep(m, clean, corrupt, points="resid_pre", metric=metric),
            lambda m: patching.sweep(m, clean, corrupt, points="z", over=("layer", "head"), metric=metric, positions=[6, 8]),
            lambda m: attribution.atp(m, clean, corrupt, points="z", over=("layer", "head"), metric=metric),
        ):
            assert torch.allclose(run(tracer).grid, run(model).grid, atol=1e-5)
        if name == "qwen2_moe":
            swept = patching.expert_sweep(tracer, clean, metric=metric, renormalize=True)
            assert torch.allclose(swept.grid, patching.expert_sweep(model, clean, metric=metric, renormalize=True).grid, atol=1e-5)


@pytest.mark.parametrize("name", ["deepseek_v3", "gpt_oss", "gemma2"])
def test_in_bfloat16_a_tracer_equals_one_process(tiny_checkpoints, tokens, tmp_path, name):
    # DeepSeek-V3 keeps its router in float32 (transformers' _keep_in_fp32_modules_strict): so must a stage
    from tests.tiny_models import load_reference

    reference = load_reference(tiny_checkpoints[name])
    kept = {n: p.detach().clone() for n, p in reference.named_parameters() if n.endswith("mlp.gate.weight")}
    reference.to(torch.bfloat16)
    for n, p in reference.named_parameters():  # a checkpoint as DeepSeek ships it: the router in float32
        if n in kept and name == "deepseek_v3":
            p.data = kept[n]
    reference.save_pretrained(tmp_path)
    model = sl.HookedModel.from_pretrained(tmp_path)
    assert model.model.dtype == torch.bfloat16
    logits_ref, cache_ref = model.run_with_cache(tokens, names_filter="blocks.*.hook_resid_post")
    with Tracer.from_pretrained(tmp_path, stages=2, backend="local") as tracer:
        assert tracer.plan.dtype == "bfloat16"
        logits, cache = tracer.run_with_cache(tokens, names_filter="blocks.*.hook_resid_post")
    assert torch.equal(logits, logits_ref)
    assert_same_cache(cache, cache_ref, atol=0)
