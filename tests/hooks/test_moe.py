"""Mixture-of-experts hook points and routing ops against the unwrapped HF model's own router."""

import pytest
import torch

import shardlens as sl
from shardlens.tracer import patching
from tests.tiny_models import MOE_FAMILIES, load_reference

Spec, ops = sl.HookSpec, sl.ops


@pytest.fixture(params=MOE_FAMILIES)
def family(request):
    return request.param


@pytest.fixture
def pair(tiny_checkpoints, family):
    return sl.HookedModel.from_pretrained(tiny_checkpoints[family]), load_reference(tiny_checkpoints[family])


@pytest.fixture
def tokens():
    return torch.randint(3, 97, (2, 9), generator=torch.Generator().manual_seed(0))


def moe_layers(model):
    return [layer for layer in range(model.config.num_hidden_layers) if model.architecture.block_at(layer).moe is not None]


def routers(model, reference):
    """Each MoE layer's router module in the reference model."""
    blocks = reference.get_submodule(model.architecture.blocks)
    return {layer: blocks[layer].get_submodule(model.architecture.block_at(layer).moe.router) for layer in moe_layers(model)}


def run_reference(reference, model, tokens, edit=None):
    """The reference's logits and each router's (logits, weights, indices); `edit(layer,
    weights, indices)` may replace the routing the experts get."""
    seen, handles = {}, []
    for layer, router in routers(model, reference).items():
        def hook(module, args, output, layer=layer):
            logits, weights, indices = output
            seen[layer] = (logits.detach(), weights.detach(), indices.detach())
            return output if edit is None else (logits, *edit(layer, weights, indices))

        handles.append(router.register_forward_hook(hook))
    try:
        with torch.no_grad():
            return reference(tokens).logits, seen
    finally:
        for handle in handles:
            handle.remove()


def test_routing_points_equal_the_routers_outputs(pair, tokens):
    model, reference = pair
    expected_logits, routing = run_reference(reference, model, tokens)
    logits, cache = model.run_with_cache(tokens, names_filter=lambda name: ".mlp." in name)  # routing and any shared expert
    assert torch.allclose(logits, expected_logits, atol=1e-5)
    moe = model.architecture.block_at(moe_layers(model)[0]).moe
    for layer, (router_logits, weights, indices) in routing.items():
        p = f"blocks.{layer}.mlp."
        assert cache[p + "hook_router_logits"].shape == (2, 9, moe.n_experts)
        assert cache[p + "hook_expert_indices"].shape == cache[p + "hook_expert_weights"].shape == (2, 9, moe.top_k)
        assert torch.allclose(cache[p + "hook_router_logits"].flatten(0, 1), router_logits.to(torch.float32), atol=1e-5)
        assert torch.equal(cache[p + "hook_expert_indices"].flatten(0, 1), indices)
        assert torch.allclose(cache[p + "hook_expert_weights"].flatten(0, 1), weights, atol=1e-6)
    for name in cache:
        assert cache[name].shape[2:] == model.hook_shape(name), name


@pytest.mark.parametrize("renormalize", [False, True])
def test_ablating_experts_equals_zeroing_their_weights_in_the_router(pair, tokens, renormalize):
    model, reference = pair
    layer = moe_layers(model)[-1]
    ablated = (1, 2)

    def edit(at, weights, indices):
        if at != layer:
            return weights, indices
        kept = weights.masked_fill(torch.isin(indices, torch.tensor(ablated)), 0)
        if renormalize:  # a token that lost every expert keeps weight zero
            left = kept.sum(-1, keepdim=True)
            kept = torch.where(left > 0, kept * weights.sum(-1, keepdim=True) / left, kept)
        return kept, indices

    expected, _ = run_reference(reference, model, tokens, edit)
    spec = Spec(f"blocks.{layer}.mlp.hook_expert_weights", ops.AblateExperts(list(ablated), renormalize=renormalize))
    logits = model.run_with_hooks(tokens, fwd_hooks=[spec])
    assert torch.allclose(logits, expected, atol=1e-5)
    assert not torch.allclose(logits, model(tokens), atol=1e-4)


def test_forcing_a_routing_equals_the_router_choosing_it(pair, tokens):
    model, reference = pair
    layer = moe_layers(model)[0]
    top_k = model.architecture.block_at(layer).moe.top_k
    forced = [3, 0][:top_k]

    def edit(at, weights, indices):
        if at != layer:
            return weights, indices
        indices = indices.clone().view(2, 9, -1)
        indices[1, 4:] = torch.tensor(forced)
        return weights, indices.view(-1, top_k)

    expected, _ = run_reference(reference, model, tokens, edit)
    spec = Spec(f"blocks.{layer}.mlp.hook_expert_indices", ops.RouteTo(forced, batch=[1], positions=slice(4, None)))
    assert torch.allclose(model.run_with_hooks(tokens, fwd_hooks=[spec]), expected, atol=1e-5)


def test_routing_statistics_count_each_experts_tokens(pair, tokens):
    model, reference = pair
    _, routing = run_reference(reference, model, tokens)
    _, cache = model.run_with_cache(tokens, names_filter=[], fwd_hooks=[Spec("blocks.*.mlp.hook_expert_weights", ops.RoutingStats())])
    for layer, (_, weights, indices) in routing.items():
        name = f"blocks.{layer}.mlp.hook_expert_weights"
        n_experts = model.architecture.block_at(layer).moe.n_experts
        for example in range(2):
            rows = indices.view(2, 9, -1)[example].flatten()
            expected = torch.bincount(rows, minlength=n_experts).float()
            assert torch.equal(cache[name + ".expert_counts"][example], expected)
            summed = torch.zeros(n_experts).index_add_(0, rows, weights.view(2, 9, -1)[example].flatten().float())
            assert torch.allclose(cache[name + ".expert_weight_sums"][example], summed, atol=1e-6)


def test_routing_ops_refuse_wrong_points_and_experts(tiny_checkpoints):
    model = sl.HookedModel.from_pretrained(tiny_checkpoints["mixtral"])
    with pytest.raises(ValueError, match="hook_expert_weights"):
        model.add_spec(Spec("blocks.0.hook_resid_post", ops.AblateExperts([0])))
    with pytest.raises(ValueError, match="the block has 4"):
        model.add_spec(Spec("blocks.0.mlp.hook_expert_weights", ops.AblateExperts([4])))
    with pytest.raises(ValueError, match="routes each token to 2"):
        model.add_spec(Spec("blocks.0.mlp.hook_expert_indices", ops.RouteTo([1, 2, 3])))
    assert not model.has_hooks()
    with pytest.raises(ValueError, match="expert indices"):
        ops.AblateExperts([-1])
    with pytest.raises(ValueError, match="name one twice"):
        ops.RouteTo([1, 1])
    with pytest.raises(ValueError, match="no head axis"):
        model.add_spec(Spec("blocks.0.mlp.hook_expert_weights", ops.AblateExperts([0], heads=[1])))
    assert ops.AblateExperts([1], renormalize=True) == sl.HookSpec.from_json(Spec("x", ops.AblateExperts([1], renormalize=True)).to_json()).op


@pytest.mark.parametrize("renormalize", [False, True])
def test_expert_sweep_equals_one_run_per_cell(tiny_checkpoints, tokens, renormalize):
    model = sl.HookedModel.from_pretrained(tiny_checkpoints["qwen2_moe"])  # layer 1 is dense (mlp_only_layers)
    metric = sl.metrics.logit_diff([5, 6], [7, 8])
    result = patching.expert_sweep(model, tokens, metric=metric, renormalize=renormalize, max_batch=6)
    assert result.points == ("blocks.0.mlp.hook_expert_weights", "blocks.2.mlp.hook_expert_weights")
    assert result.grid.shape == (2, 4)
    for row, name in enumerate(result.points):
        for expert in range(4):
            logits = model.run_with_hooks(tokens, fwd_hooks=[Spec(name, ops.AblateExperts([expert], renormalize=renormalize))])
            assert result.grid[row, expert] == pytest.approx(float(metric(logits.detach())), abs=1e-5), (name, expert)
    with torch.no_grad():
        assert result.baseline == pytest.approx(float(metric(model(tokens))), abs=1e-6)
    assert result.table.column_names == ["point", "layer", "pos", "head", "expert", "value"]
    with pytest.raises(ValueError, match="no mixture-of-experts block"):
        patching.expert_sweep(model, tokens, metric=metric, layers=[1])
    dense = sl.HookedModel.from_pretrained(tiny_checkpoints["llama_gqa"])
    with pytest.raises(ValueError, match="needs a mixture-of-experts model; a llama model has no"):
        patching.expert_sweep(dense, tokens, metric=metric)


@pytest.mark.parametrize("name", [f for f in MOE_FAMILIES if f != "gpt_oss"])
def test_each_expert_on_request(tiny_checkpoints, tokens, name):
    model = sl.HookedModel.from_pretrained(tiny_checkpoints[name], point_options=sl.PointOptions(expert_points=True))
    reference = load_reference(tiny_checkpoints[name])
    layer = moe_layers(model)[-1]
    moe = model.architecture.block_at(layer).moe
    experts_out = {}
    module = reference.get_submodule(model.architecture.blocks)[layer].get_submodule(moe.experts)
    handle = module.register_forward_hook(lambda m, args, out: experts_out.__setitem__("out", out.detach()))
    expected, routing = run_reference(reference, model, tokens)
    handle.remove()
    logits, cache = model.run_with_cache(tokens, names_filter=f"blocks.{layer}.mlp.*")
    assert torch.allclose(logits, expected, atol=1e-5)
    p = f"blocks.{layer}.mlp."
    outs = torch.stack([cache[f"{p}experts.{e}.hook_out"] for e in range(moe.n_experts)])  # [expert, batch, pos, d_model]
    assert torch.allclose(outs.sum(0).flatten(0, 1), experts_out["out"], atol=1e-5)  # what the experts module returns
    routed = torch.stack([(cache[p + "hook_expert_indices"] == e).any(-1) for e in range(moe.n_experts)])
    for e in range(moe.n_experts):
        for point in ("hook_pre", "hook_pre_linear", "hook_post", "hook_out"):
            value = cache[f"{p}experts.{e}.{point}"]
            assert value.shape[2:] == model.hook_shape(f"{p}experts.{e}.{point}")
            assert torch.count_nonzero(value[~routed[e]]) == 0, (e, point)  # only its routed tokens
    gate = cache[f"{p}experts.0.hook_pre"]
    act = module.act_fn
    assert torch.allclose(cache[f"{p}experts.0.hook_post"][routed[0]], (act(gate) * cache[f"{p}experts.0.hook_pre_linear"])[routed[0]], atol=1e-6)
    # zeroing an expert's output is taking it out of the routing without renormalising
    zeroed = model.run_with_hooks(tokens, fwd_hooks=[(f"{p}experts.2.hook_out", lambda x, hook: torch.zeros_like(x))])
    ablated = model.run_with_hooks(tokens, fwd_hooks=[Spec(p + "hook_expert_weights", ops.AblateExperts([2]))])
    assert torch.allclose(zeroed, ablated, atol=1e-5) and not torch.allclose(zeroed, logits, atol=1e-4)


def test_experts_of_another_form_have_no_points(tiny_checkpoints):
    with pytest.raises(NotImplementedError, match="gpt_oss models have no per-expert hook points"):
        sl.HookedModel.from_pretrained(tiny_checkpoints["gpt_oss"], point_options=sl.PointOptions(expert_points=True))


def test_routing_statistics_of_chosen_positions(tiny_checkpoints, tokens):
    model = sl.HookedModel.from_pretrained(tiny_checkpoints["mixtral"])
    spec = Spec("blocks.1.mlp.hook_expert_weights", ops.RoutingStats(positions=[[0, 1], [5]], batch=[1]))
    _, cache = model.run_with_cache(tokens, names_filter="blocks.1.mlp.hook_expert_indices", fwd_hooks=[spec])
    chosen = cache["blocks.1.mlp.hook_expert_indices"][1, [0, 1, 5]].flatten()
    assert torch.equal(cache["blocks.1.mlp.hook_expert_weights.expert_counts"], torch.bincount(chosen, minlength=4).float()[None])
