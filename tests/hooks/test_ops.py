"""Each op against an independent reference on tiny models: plain slicing of a full cache,
explicit loops, torch autograd, and the weights themselves."""

import pytest
import torch

import shardlens as sl
from tests.hooks.reference import grad_through_leaf

ops = sl.ops
Spec = sl.HookSpec
RESID = "blocks.1.hook_resid_pre"


@pytest.fixture(scope="module")
def llama(tiny_checkpoints):
    return sl.HookedModel.from_pretrained(tiny_checkpoints["llama_gqa"])


@pytest.fixture
def tokens():
    return torch.randint(3, 97, (3, 8), generator=torch.Generator().manual_seed(0))


def full_cache(model, tokens, names, **kwargs):
    return model.run_with_cache(tokens, names_filter=names, **kwargs)[1]


def grad_at(model, tokens, name, fwd_hooks=()):
    """d loss / d activation at `name`, by plain autograd through a leaf."""
    return grad_through_leaf(model, name, lambda: model(tokens, return_type="loss"), fwd_hooks=fwd_hooks)[1]


# ---------------------------------------------------------------- reading ops


def test_cache_selectors(llama, tokens):
    ref = full_cache(llama, tokens, [RESID, "blocks.1.attn.hook_z"])
    _, cache = llama.run_with_cache(tokens, names_filter=[], fwd_hooks=[
        Spec(RESID, ops.Cache(positions=[6, 1], batch=[2, 0])),
        Spec("blocks.1.attn.hook_z", ops.Cache(positions=slice(2, 5), heads=3, dtype="float16")),
    ])
    assert torch.equal(cache[RESID], ref[RESID][[2, 0]][:, [6, 1]])
    assert cache["blocks.1.attn.hook_z"].dtype == torch.float16
    assert torch.equal(cache["blocks.1.attn.hook_z"], ref["blocks.1.attn.hook_z"][:, 2:5, 3:4].half())


@pytest.mark.parametrize("reduce", ["mean", "sum", None])
def test_cache_token_groups(llama, tokens, reduce):
    ref = full_cache(llama, tokens, RESID)[RESID]
    groups = [[0, 1, 2], [5], [3, 7]]
    _, cache = llama.run_with_cache(tokens, names_filter=[], fwd_hooks=[Spec(RESID, ops.Cache(positions=groups, reduce=reduce))])
    if reduce is None:
        expected = ref[:, [0, 1, 2, 5, 3, 7]]
    else:
        parts = [ref[:, g].mean(1) if reduce == "mean" else ref[:, g].sum(1) for g in groups]
        expected = torch.stack(parts, dim=1)
    assert torch.allclose(cache[RESID], expected, atol=1e-6)


def test_cache_grad(llama, tokens):
    _, cache = llama.run_with_cache(tokens, return_type="loss", names_filter=[], incl_bwd=True,
                                    fwd_hooks=[Spec(RESID, ops.CacheGrad(positions=[-1, 0]))])
    assert torch.allclose(cache[RESID + "_grad"], grad_at(llama, tokens, RESID)[:, [-1, 0]], atol=1e-7)


def test_norm_stats(llama, tokens):
    x = full_cache(llama, tokens, RESID)[RESID]
    _, cache = llama.run_with_cache(tokens, names_filter=[], fwd_hooks=[Spec(RESID, ops.NormStats(positions=[[1, 2], [4]], reduce="mean"))])
    for key, per_token in (
        ("mean", x.mean(-1, keepdim=True)),
        ("variance", x.var(-1, unbiased=False, keepdim=True)),
        ("second_moment", (x * x).mean(-1, keepdim=True)),
    ):
        expected = torch.stack([per_token[:, [1, 2]].mean(1), per_token[:, [4]].mean(1)], dim=1)
        assert torch.allclose(cache[f"{RESID}.{key}"], expected, atol=1e-6), key


@pytest.mark.parametrize("reduce", ["none", "mean", "sum", "baseline_ratio"])
def test_attn_pattern_blocks(llama, tokens, reduce):
    name = "blocks.0.attn.hook_pattern"
    pattern = full_cache(llama, tokens, name)[name]
    columns, rows = [[1, 2, 3], [4]], [[4, 5], [6, 7]]
    _, cache = llama.run_with_cache(tokens, names_filter=[], fwd_hooks=[Spec(name, ops.AttnPatternBlocks(columns, rows=rows, reduce=reduce, heads=[0, 2]))])
    got = cache[name + ".blocks"]
    p = pattern[:, [0, 2]]
    if reduce == "none":
        assert torch.equal(got, p[:, :, [4, 5, 6, 7]][:, :, :, [1, 2, 3, 4]])
        return
    assert got.shape == (3, 2, 2, 2)
    for i, r in enumerate(rows):
        for j, c in enumerate(columns):
            block = p[:, :, r][:, :, :, c]  # naive: [batch, head, R, C]
            if reduce == "mean":
                expected = block.mean((-2, -1))
            elif reduce == "sum":
                expected = block.sum((-2, -1))
            else:
                observed = torch.stack([p[:, :, q, c].sum(-1) for q in r], -1).mean(-1)
                uniform = sum(len([k for k in c if k <= q]) / (q + 1) for q in r) / len(r)
                expected = observed / uniform
            assert torch.allclose(got[:, :, i, j], expected, atol=1e-6), (i, j)


def test_baseline_ratio_of_uniform_attention_is_one(llama, tokens):
    uniform = torch.tril(torch.ones(8, 8))
    uniform = (uniform / uniform.sum(-1, keepdim=True)).expand(3, 4, 8, 8)
    name = "blocks.0.attn.hook_pattern"
    _, cache = llama.run_with_cache(tokens, names_filter=[], fwd_hooks=[
        Spec(name, ops.Patch(uniform)), Spec(name, ops.AttnPatternBlocks([[0, 1], [2, 3, 4]], rows=[[5, 6, 7]], reduce="baseline_ratio"))])
    assert torch.allclose(cache[name + ".blocks"], torch.ones(3, 4, 1, 2), atol=1e-6)


@pytest.mark.parametrize("point", ["hook_q", "hook_v"])
def test_projected_heads(llama, tokens, point):
    name = f"blocks.1.attn.{point}"
    x = full_cache(llama, tokens, name)[name]  # [batch, pos, heads or kv heads, d_head]
    o_proj = llama.model.model.layers[1].self_attn.o_proj.weight  # [d_model, head * d_head]
    _, cache = llama.run_with_cache(tokens, names_filter=[], fwd_hooks=[Spec(name, ops.ProjectedHeads(heads=[1, 2], positions=[-1]))])
    got = cache[name + ".projected"]
    assert got.shape == (3, 1, 2, 32)
    for i, head in enumerate([1, 2]):
        source_head = head if point == "hook_q" else head // 2  # 4 query heads share 2 kv heads
        expected = x[:, -1, source_head] @ o_proj[:, head * 8:(head + 1) * 8].T
        assert torch.allclose(got[:, 0, i], expected, atol=1e-6)


# ---------------------------------------------------------------- writing ops


def test_patching_every_position_from_a_clean_run_restores_clean_logits(gpt2):
    clean = torch.randint(3, 97, (2, 8), generator=torch.Generator().manual_seed(1))
    corrupt = torch.randint(3, 97, (2, 8), generator=torch.Generator().manual_seed(2))
    clean_logits, clean_cache = gpt2.run_with_cache(clean, names_filter="blocks.0.hook_resid_pre")
    spec = Spec("blocks.0.hook_resid_pre", ops.Patch(from_cache="clean"))
    patched = gpt2.run_with_hooks(corrupt, fwd_hooks=[spec], sources={"clean": clean_cache})
    assert torch.equal(patched, clean_logits)
    assert not torch.allclose(gpt2(corrupt), clean_logits, atol=1e-3)


def test_patch_values_at_selected_positions_and_heads(llama, tokens):
    values = torch.randn(3, 2, 1, 8)
    name = "blocks.0.attn.hook_z"
    ref = full_cache(llama, tokens, name)[name]
    _, cache = llama.run_with_cache(tokens, names_filter=name, fwd_hooks=[Spec(name, ops.Patch(values, positions=[2, 5], heads=3))])
    expected = ref.clone()
    expected[:, 2, 3], expected[:, 5, 3] = values[:, 0, 0], values[:, 1, 0]
    assert torch.equal(cache[name], expected)


def test_patch_shape_errors(llama, tokens):
    with pytest.raises(ValueError, match=r"end in 5.*\[batch, pos, 32\]"):
        llama.run_with_hooks(tokens, fwd_hooks=[Spec(RESID, ops.Patch(torch.ones(5)))])  # before the forward
    assert not llama.has_hooks()
    bad = Spec("blocks.0.attn.hook_pattern", ops.Patch(torch.ones(3, 4, 7, 8)))  # shape known only at run time
    with pytest.raises(ValueError, match=r"Patch at blocks.0.attn.hook_pattern: values of shape \[3, 4, 7, 8\] do not fit the selection of shape \[3, 4, 8, 8\]"):
        llama.run_with_hooks(tokens, fwd_hooks=[bad])
    with pytest.raises(ValueError, match="no head axis"):
        llama.run_with_hooks(tokens, fwd_hooks=[Spec(RESID, ops.Ablate(heads=1))])


def test_ablate_zero_and_mean(llama, tokens):
    name = "blocks.0.attn.hook_z"
    ref = full_cache(llama, tokens, name)[name]
    _, zeroed = llama.run_with_cache(tokens, names_filter=name, fwd_hooks=[Spec(name, ops.Ablate("zero", heads=[0, 2]))])
    assert torch.count_nonzero(zeroed[name][:, :, [0, 2]]) == 0
    assert torch.equal(zeroed[name][:, :, [1, 3]], ref[:, :, [1, 3]])
    _, meaned = llama.run_with_cache(tokens, names_filter=RESID, fwd_hooks=[Spec(RESID, ops.Ablate("mean", positions=[3]))])
    resid = full_cache(llama, tokens, RESID)[RESID]
    assert torch.allclose(meaned[RESID][:, 3], resid[:, 3].mean(0).expand(3, -1), atol=1e-6)
    given = torch.randn(32)
    _, fixed = llama.run_with_cache(tokens, names_filter=RESID, fwd_hooks=[Spec(RESID, ops.Ablate("mean", mean=given))])
    assert torch.equal(fixed[RESID], given.expand(3, 8, 32))


def test_add_and_scale(llama, tokens):
    vector = torch.randn(32)
    resid = full_cache(llama, tokens, RESID)[RESID]
    _, added = llama.run_with_cache(tokens, names_filter=RESID, fwd_hooks=[Spec(RESID, ops.Add(vector, scale=2.0, positions=[-1]))])
    expected = resid.clone()
    expected[:, -1] += 2.0 * vector
    assert torch.equal(added[RESID], expected)
    name = "blocks.0.attn.hook_pattern"
    pattern = full_cache(llama, tokens, name)[name]
    _, scaled = llama.run_with_cache(tokens, names_filter=name, fwd_hooks=[Spec(name, ops.Scale(0.5, heads=1))])
    assert torch.equal(scaled[name][:, 1], pattern[:, 1] * 0.5) and torch.equal(scaled[name][:, 0], pattern[:, 0])


def test_attn_edit(llama, tokens):
    name = "blocks.0.attn.hook_pattern"
    pattern = full_cache(llama, tokens, name)[name]
    _, cache = llama.run_with_cache(tokens, names_filter=name, fwd_hooks=[Spec(name, ops.AttnEdit(0.0, q_positions=[6, 7], k_positions=[0, 1], heads=2, renormalize=True))])
    edited = cache[name]
    expected_rows = pattern[:, 2, 6:8].clone()
    expected_rows[..., :2] = 0
    expected_rows /= expected_rows.sum(-1, keepdim=True)
    assert torch.allclose(edited[:, 2, 6:8], expected_rows, atol=1e-6)
    assert torch.equal(edited[:, 2, :6], pattern[:, 2, :6]) and torch.equal(edited[:, [0, 1, 3]], pattern[:, [0, 1, 3]])


def test_scale_grad_and_stop_grad(llama, tokens):
    llama.zero_grad()
    llama(tokens, return_type="loss").backward()
    reference = llama.model.model.embed_tokens.weight.grad.clone()
    llama.zero_grad()
    with llama.hooks(fwd_hooks=[Spec("blocks.0.hook_resid_pre", ops.ScaleGrad(3.0))]):
        llama(tokens, return_type="loss").backward()
    assert torch.allclose(llama.model.model.embed_tokens.weight.grad, 3 * reference, atol=1e-6)
    llama.zero_grad()
    with llama.hooks(fwd_hooks=[Spec("blocks.0.hook_resid_pre", ops.StopGrad())]):
        llama(tokens, return_type="loss").backward()
    assert torch.count_nonzero(llama.model.model.embed_tokens.weight.grad) == 0
    llama.zero_grad()


# ---------------------------------------------------------------- composition


def test_chain_runs_in_order_and_at_layers_picks_layers(llama, tokens):
    resid = full_cache(llama, tokens, RESID)[RESID]
    _, cache = llama.run_with_cache(tokens, names_filter=[], fwd_hooks=[
        Spec(RESID, ops.Chain([ops.Scale(2.0), ops.Cache(), ops.Add(torch.ones(32))]))])
    assert torch.equal(cache[RESID], resid * 2)
    _, cache = llama.run_with_cache(tokens, names_filter=[], fwd_hooks=[
        Spec("blocks.*.hook_resid_pre", ops.AtLayers(ops.Cache(), layers=[0, 2]))])
    assert sorted(cache) == ["blocks.0.hook_resid_pre", "blocks.2.hook_resid_pre"]


def test_fwd_bwd_gradient_op_sees_the_intermediate_gradient(llama, tokens):
    # out = 3 * (2 * x): the bwd op between the edits sees d loss / d(2x) = 3 * d loss / d out.
    spec = Spec(RESID, ops.FwdBwd(fwd=[ops.Scale(2.0)], bwd=[ops.CacheGrad()], fwd2=[ops.Scale(3.0)]))
    _, cache = llama.run_with_cache(tokens, return_type="loss", names_filter=[], fwd_hooks=[spec], incl_bwd=True)
    grad_out = grad_at(llama, tokens, RESID, fwd_hooks=[(RESID, lambda x, hook: 3 * (2 * x))])
    assert torch.allclose(cache[RESID + "_grad"], 3 * grad_out, atol=1e-6)
    # and a gradient edit there reaches the layers below
    halve = Spec(RESID, ops.FwdBwd(bwd=[ops.ScaleGrad(0.5)]))
    _, plain = llama.run_with_cache(tokens, return_type="loss", names_filter="blocks.0.hook_resid_pre", incl_bwd=True)
    _, halved = llama.run_with_cache(tokens, return_type="loss", names_filter="blocks.0.hook_resid_pre", incl_bwd=True, fwd_hooks=[halve])
    assert torch.allclose(halved["blocks.0.hook_resid_pre_grad"], 0.5 * plain["blocks.0.hook_resid_pre_grad"], atol=1e-7)


def test_code_op_runs_in_one_process(llama, tokens):
    _, cache = llama.run_with_cache(tokens, names_filter=RESID, fwd_hooks=[Spec(RESID, ops.Code(lambda x, hook: x * 0))])
    assert torch.count_nonzero(cache[RESID]) == 0
