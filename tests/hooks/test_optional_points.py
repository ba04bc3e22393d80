"""TransformerLens' optional hook points (per-head attention inputs, hook_mlp_in, hook_tokens)
on every family: exact when unpatched, and a patch reaches what TransformerLens says it does."""

import pytest
import torch

import shardlens as sl
from tests.tiny_models import FAMILIES, load_reference

ALL = sl.PointOptions(split_qkv_input=True, attn_in=True, hook_mlp_in=True, hook_tokens=True)
PER_HEAD = [name for name in FAMILIES if name != "deepseek_v3"]  # latent attention: no per-head inputs


@pytest.fixture
def tokens():
    return torch.randint(3, 97, (2, 9), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def other():
    return torch.randint(3, 97, (2, 9), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", PER_HEAD)
def test_switched_on_and_cached_they_change_nothing(tiny_checkpoints, tokens, name):
    model = sl.HookedModel.from_pretrained(tiny_checkpoints[name], point_options=ALL)
    with torch.no_grad():
        expected = load_reference(tiny_checkpoints[name])(tokens).logits
    logits, cache = model.run_with_cache(tokens)
    assert torch.allclose(logits, expected, atol=1e-5)
    n_heads, n_kv = model.config.num_attention_heads, cache["blocks.1.attn.hook_k"].shape[2]
    d_model = model.config.hidden_size
    resid_pre = cache["blocks.1.hook_resid_pre"]
    assert torch.equal(cache["blocks.1.hook_attn_in"], resid_pre[:, :, None].expand(2, 9, n_heads, d_model))
    assert torch.equal(cache["blocks.1.hook_q_input"], resid_pre[:, :, None].expand(2, 9, n_heads, d_model))
    assert torch.equal(cache["blocks.1.hook_k_input"], resid_pre[:, :, None].expand(2, 9, n_kv, d_model))
    mlp_reads = resid_pre if model.architecture.block_at(1).parallel else cache["blocks.1.hook_resid_mid"]
    assert torch.equal(cache["blocks.1.hook_mlp_in"], mlp_reads)
    assert torch.equal(cache["hook_tokens"], tokens)
    for point in ("blocks.0.hook_q_input", "blocks.0.hook_mlp_in"):
        assert cache[point].shape[2:] == model.hook_shape(point), point


@pytest.mark.parametrize("name", PER_HEAD)
@pytest.mark.parametrize("point, attn_point", [("hook_q_input", "hook_q"), ("hook_k_input", "hook_k"), ("hook_v_input", "hook_v")])
def test_a_patch_of_one_heads_input_reaches_that_head_only(tiny_checkpoints, tokens, other, name, point, attn_point):
    # In layer 0 a head's q (k, v) depends only on its input at that position (and the position),
    # so patching head h's input with another prompt's embeddings gives that prompt's q for head h.
    model = sl.HookedModel.from_pretrained(tiny_checkpoints[name], point_options=ALL)
    attention = model.model.get_submodule(model.architecture.blocks)[0].get_submodule(model.architecture.block.attn)
    q_norm = getattr(attention, "q_norm", None)
    if q_norm is not None and q_norm.weight.shape == (model.config.hidden_size,) and attn_point != "hook_v":
        pytest.skip("q and k are normalised over all heads together (OLMo-2, OLMo-3, OLMoE): one head's input moves every head's norm")
    names = ["blocks.0.hook_resid_pre", f"blocks.0.attn.{attn_point}"]
    _, base = model.run_with_cache(tokens, names_filter=names)
    _, swapped = model.run_with_cache(other, names_filter=names)
    head = 1 if base[names[1]].shape[2] > 1 else 0  # multi-query Falcon has one key/value head

    def patch(x, hook):
        x[:, :, head] = swapped["blocks.0.hook_resid_pre"]
        return x

    with model.hooks(fwd_hooks=[(f"blocks.0.{point}", patch)]):
        _, patched = model.run_with_cache(tokens, names_filter=names)
    got, before, after = patched[names[1]], base[names[1]], swapped[names[1]]
    assert torch.allclose(got[:, :, head], after[:, :, head], atol=1e-5)
    others = [h for h in range(got.shape[2]) if h != head]
    assert torch.allclose(got[:, :, others], before[:, :, others], atol=1e-5)
    assert not torch.allclose(got[:, :, head], before[:, :, head], atol=1e-3)


@pytest.mark.parametrize("name", FAMILIES)
def test_hook_mlp_in_changes_what_the_mlp_reads_and_nothing_else(tiny_checkpoints, tokens, other, name):
    model = sl.HookedModel.from_pretrained(tiny_checkpoints[name], point_options=sl.PointOptions(hook_mlp_in=True))
    block = model.architecture.block_at(1)
    names = ["blocks.1.hook_resid_pre", "blocks.1.hook_attn_out", "blocks.1.hook_mlp_out", "blocks.1.hook_resid_post"]
    _, source = model.run_with_cache(other, names_filter=["blocks.1.hook_resid_pre"])
    replacement = source["blocks.1.hook_resid_pre"]
    with model.hooks(fwd_hooks=[("blocks.1.hook_mlp_in", lambda x, hook: replacement)]):
        _, cache = model.run_with_cache(tokens, names_filter=names)
    hf_block = model.model.get_submodule(model.architecture.blocks)[1]
    norm = block.ln2 or (block.ln1 if block.parallel else None)
    with torch.no_grad():
        mlp_in = replacement if norm is None else hf_block.get_submodule(norm)(replacement)
        out = hf_block.get_submodule(block.mlp)(mlp_in)
        out = out[0] if isinstance(out, tuple) else out
        if block.ln2_post:
            out = hf_block.get_submodule(block.ln2_post)(out)
    assert torch.allclose(cache["blocks.1.hook_mlp_out"], out, atol=1e-5)
    multiplier = getattr(model.config, "residual_multiplier", 1.0)
    resid_pre, attn_out, mlp_out = (cache[n] for n in names[:3])
    assert torch.allclose(cache["blocks.1.hook_resid_post"], resid_pre + multiplier * (attn_out + mlp_out), atol=1e-5)


def test_hook_tokens_can_replace_the_tokens(tiny_checkpoints, tokens, other):
    model = sl.HookedModel.from_pretrained(tiny_checkpoints["gemma2"])
    model.set_use_hook_tokens(True)
    logits = model.run_with_hooks(tokens, fwd_hooks=[("hook_tokens", lambda t, hook: other)])
    assert torch.allclose(logits, model(other), atol=1e-6)


def test_switching_points_on_and_off(tiny_checkpoints, tokens):
    model = sl.HookedModel.from_pretrained(tiny_checkpoints["llama_gqa"])
    assert "blocks.0.hook_q_input" not in model.hook_names()
    model.set_use_split_qkv_input(True)
    model.set_use_attn_in(True)
    assert {"blocks.2.hook_q_input", "blocks.2.hook_k_input", "blocks.2.hook_v_input", "blocks.2.hook_attn_in"} <= set(model.hook_names())
    model.add_hook("blocks.0.hook_q_input", lambda x, hook: x)
    with pytest.raises(RuntimeError, match="reset_hooks"):
        model.set_use_hook_mlp_in(True)
    model.reset_hooks()
    model.set_use_split_qkv_input(False)
    model.set_use_attn_in(False)
    assert not any(n.endswith(("_input", "hook_attn_in")) for n in model.hook_names())
    with torch.no_grad():
        assert torch.equal(model(tokens), load_reference(tiny_checkpoints["llama_gqa"])(tokens).logits)


def test_latent_attention_has_no_per_head_inputs(tiny_checkpoints):
    with pytest.raises(NotImplementedError, match="deepseek_v3 models have no per-head attention inputs"):
        sl.HookedModel.from_pretrained(tiny_checkpoints["deepseek_v3"], point_options=sl.PointOptions(split_qkv_input=True))
    model = sl.HookedModel.from_pretrained(tiny_checkpoints["deepseek_v3"], point_options=sl.PointOptions(hook_mlp_in=True))
    assert "blocks.0.hook_mlp_in" in model.hook_names()


@pytest.mark.parametrize("name", ["llama_gqa", "phi", "falcon"])
def test_stages_and_tracers_take_the_same_points(tiny_checkpoints, tokens, other, name):
    from shardlens.tracer import Tracer

    model = sl.HookedModel.from_pretrained(tiny_checkpoints[name], point_options=ALL)
    patch = sl.HookSpec("blocks.1.hook_q_input", sl.ops.Ablate(heads=[0]))
    expected = model.run_with_hooks(tokens, fwd_hooks=[patch])
    with Tracer.from_pretrained(tiny_checkpoints[name], stages=2, backend="local", point_options=ALL) as tracer:
        assert sorted(tracer.hook_names()) == sorted(model.hook_names())
        assert torch.allclose(tracer.run_with_hooks(tokens, fwd_hooks=[patch]), expected, atol=1e-5)


def test_attn_in_feeds_each_query_head_and_each_groups_first_head_feeds_its_keys(tiny_checkpoints, tokens, other):
    model = sl.HookedModel.from_pretrained(tiny_checkpoints["llama_gqa"], point_options=sl.PointOptions(attn_in=True))  # 4 heads, 2 kv
    names = ["blocks.0.hook_resid_pre", "blocks.0.attn.hook_q", "blocks.0.attn.hook_k"]
    _, base = model.run_with_cache(tokens, names_filter=names)
    _, swapped = model.run_with_cache(other, names_filter=names)

    def run(copy):
        def patch(x, hook):
            x[:, :, copy] = swapped["blocks.0.hook_resid_pre"]
            return x

        with model.hooks(fwd_hooks=[("blocks.0.hook_attn_in", patch)]):
            return model.run_with_cache(tokens, names_filter=names)[1]

    first_of_group_1 = run(2)  # query head 2, and kv head 1's keys and values
    assert torch.allclose(first_of_group_1["blocks.0.attn.hook_q"][:, :, 2], swapped["blocks.0.attn.hook_q"][:, :, 2], atol=1e-5)
    assert torch.allclose(first_of_group_1["blocks.0.attn.hook_k"][:, :, 1], swapped["blocks.0.attn.hook_k"][:, :, 1], atol=1e-5)
    assert torch.allclose(first_of_group_1["blocks.0.attn.hook_k"][:, :, 0], base["blocks.0.attn.hook_k"][:, :, 0], atol=1e-6)
    second_of_group_0 = run(1)  # query head 1 only
    assert torch.allclose(second_of_group_0["blocks.0.attn.hook_q"][:, :, 1], swapped["blocks.0.attn.hook_q"][:, :, 1], atol=1e-5)
    assert torch.allclose(second_of_group_0["blocks.0.attn.hook_k"], base["blocks.0.attn.hook_k"], atol=1e-6)
