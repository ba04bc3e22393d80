"""ActivationCache helpers against the model's own computation."""

import pytest
import torch

import shardlens as sl
from shardlens.hooks import HookNameError


@pytest.fixture(scope="module", params=["gpt2", "llama_gqa"])
def run(request, tiny_checkpoints):
    model = sl.HookedModel.from_pretrained(tiny_checkpoints[request.param])
    tokens = torch.randint(3, 97, (2, 6), generator=torch.Generator().manual_seed(0))
    logits, cache = model.run_with_cache(tokens)
    return model, logits, cache


def test_stack_by_list_and_glob(run):
    _, _, cache = run
    stacked = cache.stack("blocks.*.hook_resid_post")
    assert stacked.shape == (3, 2, 6, 32)
    assert torch.equal(stacked[1], cache["blocks.1.hook_resid_post"])
    assert torch.equal(cache.stack(["hook_embed", "blocks.0.hook_attn_out"])[1], cache["blocks.0.hook_attn_out"])
    with pytest.raises(HookNameError, match="blocks.0.hook_resid_post"):
        cache.stack(["blocks.0.hook_resid_pots"])


def test_accumulated_resid(run):
    _, _, cache = run
    resid = cache.accumulated_resid()
    assert resid.shape == (4, 2, 6, 32)
    assert torch.equal(resid[0], cache["blocks.0.hook_resid_pre"]) and torch.equal(resid[-1], cache["blocks.2.hook_resid_post"])
    with_mid = cache.accumulated_resid(layer=2, incl_mid=True)
    assert with_mid.shape == (4, 2, 6, 32) and torch.equal(with_mid[1], cache["blocks.0.hook_resid_mid"])


def test_decompose_resid_sums_to_the_residual_stream(run):
    _, _, cache = run
    parts, labels = cache.decompose_resid(layer=2, return_labels=True)
    assert labels[-1] == "blocks.1.hook_mlp_out"
    assert torch.allclose(parts.sum(0), cache["blocks.2.hook_resid_pre"], atol=1e-5)


def test_logit_lens_ends_at_the_logits(run):
    _, logits, cache = run
    lens = cache.logit_lens()
    assert lens.shape == (4, 2, 6, 97)
    assert torch.allclose(lens[-1], logits, atol=1e-5)


def test_apply_ln_matches_the_final_norms_normalized(run):
    _, _, cache = run
    final = cache.accumulated_resid(apply_ln=True)[-1]
    assert torch.allclose(final, cache["ln_final.hook_normalized"], atol=1e-5)


def test_to_device_copies_and_keeps_context(run):
    _, _, cache = run
    before = {name: t.clone() for name, t in cache.items()}
    moved = cache.to("cpu")
    assert moved is not cache and set(moved) == set(cache) and moved.readout is cache.readout
    assert all(torch.equal(moved[name], before[name]) for name in before)
    # To another device ("meta": shapes and dtypes, no data) the copy moves and the original stays put.
    meta = cache.to("meta")
    assert all(t.device.type == "meta" for t in meta.values())
    assert {name: (t.shape, t.dtype) for name, t in meta.items()} == {name: (t.shape, t.dtype) for name, t in before.items()}
    assert all(cache[name].device.type == "cpu" and torch.equal(cache[name], before[name]) for name in before)
    assert meta.readout is cache.readout and meta.norm == cache.norm and meta.scales == cache.scales
    assert "ActivationCache(" in repr(cache) and "hook_embed: [2, 6, 32] float32" in repr(cache)
