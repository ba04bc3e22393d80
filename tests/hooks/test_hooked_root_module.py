"""HookedRootModule on a toy transformer, checked against an independent forward pass."""


import pytest
import torch

import shardlens as sl
from shardlens.hooks import HookedRootModule, HookIntrospectionMixin, HookNameError, HookPoint
from tests.hooks.reference import grad_through_leaf, logits_from_resid, toy_reference

ATOL = 1e-5


def grads_by_autograd(model, tokens, names):
    """d loss / d activation for each name, by plain autograd through a leaf, one run per name."""
    return {name: grad_through_leaf(model, name, lambda: model(tokens, return_type="loss"))[1] for name in names}


# ---------------------------------------------------------------- setup and names


def test_setup_indexes_modules_and_hook_points(model):
    assert set(model.hook_dict) == set(toy_reference(model, torch.zeros(1, 2, dtype=torch.long)))
    assert model.hook_names() == list(model.hook_dict)
    assert all(isinstance(hp, HookPoint) and hp.name == name for name, hp in model.hook_dict.items())
    assert model.mod_dict["blocks.1.attn"] is model.blocks[1].attn
    assert list(model.hook_points()) == list(model.hook_dict.values())


def test_public_names_are_importable_both_ways():
    assert sl.HookPoint is HookPoint and sl.HookedRootModule is HookedRootModule
    assert sl.LensHandle is sl.hooks.LensHandle and sl.HookIntrospectionMixin is HookIntrospectionMixin
    assert issubclass(sl.HookNameError, KeyError)


def test_unknown_name_raises_hook_name_error_with_closest_names(model):
    with pytest.raises(HookNameError) as info:
        model.add_hook("blocks.0.hook_resid_pots", lambda x, hook: None)
    assert "blocks.0.hook_resid_post" in str(info.value)
    assert info.value.closest[0] == "blocks.0.hook_resid_post"
    with pytest.raises(KeyError):  # still a KeyError for TransformerLens code
        model.add_hook("nope", lambda x, hook: None)
    with pytest.raises(HookNameError, match="matches the glob 'blocks.\\*.hook_nothing'"):
        model.run_with_cache(torch.zeros(1, 2, dtype=torch.long), names_filter="blocks.*.hook_nothing")
    assert not model.has_hooks()


# ---------------------------------------------------------------- adding hooks


def test_add_hook_by_name_glob_predicate(model, tokens):
    seen = []
    record = lambda x, hook: seen.append(hook.name)  # noqa: E731
    model.add_hook("blocks.1.hook_resid_pre", record)
    model.add_hook("blocks.*.hook_mlp_out", record)
    model.add_hook(lambda name: name.endswith("hook_pattern"), record)
    model(tokens)
    assert seen == ["blocks.0.attn.hook_pattern", "blocks.0.hook_mlp_out", "blocks.1.hook_resid_pre",
                    "blocks.1.attn.hook_pattern", "blocks.1.hook_mlp_out"]
    model.reset_hooks()
    assert not model.has_hooks()


def test_check_hooks_to_add_can_refuse_a_hook(model):
    class Strict(type(model)):
        def check_hooks_to_add(self, hook_point, hook_point_name, hook, dir="fwd", is_permanent=False, prepend=False):
            if dir == "bwd":
                raise ValueError(f"no backward hooks on {hook_point_name}")

    strict = Strict(n_layers=1, d_model=8, n_heads=2, d_vocab=5)
    strict.add_hook("hook_embed", lambda x, hook: None)
    with pytest.raises(ValueError, match="no backward hooks on hook_embed"):
        strict.add_hook("hook_embed", lambda x, hook: None, dir="bwd")


def test_permanent_hooks_survive_reset(model, tokens):
    model.add_perma_hook("hook_embed", lambda x, hook: x * 0)
    model.add_hook("hook_pos_embed", lambda x, hook: x * 0)
    model.reset_hooks()
    assert list(model.list_hooks()) == ["hook_embed"]
    logits = model(tokens)
    with torch.no_grad():
        # embeddings zeroed: every position starts from the positional embedding alone
        expected = toy_reference(model, tokens)
    assert not torch.allclose(logits, expected["hook_logits"])
    with model.hooks():
        pass
    assert model.has_hooks(including_permanent=True) and not model.has_hooks(including_permanent=False)
    model.reset_hooks(including_permanent=True)
    assert torch.allclose(model(tokens), expected["hook_logits"], atol=ATOL)


def test_prepend_order_on_the_root(model, tokens):
    order = []
    model.add_hook("hook_embed", lambda x, hook: order.append("a"))
    model.add_hook("hook_embed", lambda x, hook: order.append("b"))
    model.add_hook("hook_embed", lambda x, hook: order.append("first"), prepend=True)
    model(tokens)
    assert order == ["first", "a", "b"]


# ---------------------------------------------------------------- context levels


def test_nested_contexts_remove_only_their_level_also_when_raising(model, tokens):
    model.add_hook("hook_logits", lambda x, hook: None)  # level None: no block owns it
    model.add_perma_hook("hook_embed", lambda x, hook: None)
    with model.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", lambda x, hook: None)]):
        assert model.context_level == 1
        with pytest.raises(RuntimeError, match="inside"):
            with model.hooks(fwd_hooks=[("blocks.1.hook_resid_pre", lambda x, hook: None)],
                             bwd_hooks=[("blocks.1.hook_resid_pre", lambda g, hook: None)]):
                assert model.context_level == 2
                assert model.has_hooks(level=2) and model.has_hooks(dir="bwd", level=2)
                raise RuntimeError("inside")
        assert model.context_level == 1
        assert not model.has_hooks(level=2)
        assert set(model.list_hooks()) == {"hook_logits", "hook_embed", "blocks.0.hook_resid_pre"}
        assert model.list_hooks()["blocks.0.hook_resid_pre"][0].level == 1
    assert model.context_level == 0
    assert set(model.list_hooks()) == {"hook_logits", "hook_embed"}


def test_a_failing_hook_list_leaves_nothing_behind(model):
    with pytest.raises(HookNameError):
        with model.hooks(fwd_hooks=[("hook_embed", lambda x, hook: None), ("hook_embd", lambda x, hook: None)]):
            pass
    assert not model.has_hooks() and model.context_level == 0


def test_hooks_refuses_what_is_not_a_pair(model):
    with pytest.raises(TypeError, match="fwd_hooks takes"):
        with model.hooks(fwd_hooks=["hook_embed"]):
            pass


def test_hooks_without_reset_keeps_the_hooks(model):
    with model.hooks(fwd_hooks=[("hook_embed", lambda x, hook: None)], reset_hooks_end=False):
        pass
    assert list(model.list_hooks()) == ["hook_embed"]


def test_reset_clears_contexts_only_when_asked(model, tokens):
    def remember(x, hook):
        hook.ctx["n"] = hook.ctx.get("n", 0) + 1

    with model.hooks(fwd_hooks=[("hook_embed", remember)], clear_contexts=False):
        model(tokens)
    assert model.hook_dict["hook_embed"].ctx == {"n": 1}
    with model.hooks(fwd_hooks=[("hook_embed", remember)], clear_contexts=True):
        model(tokens)
    assert model.hook_dict["hook_embed"].ctx == {}


# ---------------------------------------------------------------- run_with_hooks


def test_run_with_hooks_patches_and_then_removes(model, tokens):
    replacement = torch.randn(2, 6, 16)
    logits = model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.hook_resid_post", lambda x, hook: replacement)])
    assert torch.allclose(logits, logits_from_resid(model, replacement), atol=ATOL)
    assert not model.has_hooks()
    assert torch.allclose(model(tokens), toy_reference(model, tokens)["hook_logits"], atol=ATOL)


def test_run_with_hooks_passes_keyword_arguments(model, tokens):
    loss = model.run_with_hooks(tokens, return_type="loss")
    logits = toy_reference(model, tokens)["hook_logits"]
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 23), tokens[:, 1:].reshape(-1))
    assert torch.allclose(loss, expected, atol=ATOL)


def test_run_with_hooks_warns_that_reset_drops_backward_hooks(model, tokens):
    with pytest.warns(UserWarning, match="reset_hooks_end=False"):
        model.run_with_hooks(tokens, bwd_hooks=[("hook_embed", lambda g, hook: None)])


def test_backward_hooks_with_reset_hooks_end_false(model, tokens):
    grads = {}
    loss = model.run_with_hooks(
        tokens, return_type="loss", reset_hooks_end=False,
        bwd_hooks=[("blocks.0.hook_mlp_out", lambda g, hook: grads.setdefault(hook.name, g))],
    )
    loss.backward()
    model.reset_hooks()
    expected = grads_by_autograd(model, tokens, ["blocks.0.hook_mlp_out"])["blocks.0.hook_mlp_out"]
    assert torch.allclose(grads["blocks.0.hook_mlp_out"], expected, atol=1e-6)


def test_backward_hook_returning_a_tensor_changes_upstream_gradients(model, tokens):
    model(tokens, return_type="loss").backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    with model.hooks(bwd_hooks=[("blocks.1.hook_resid_pre", lambda g, hook: g * 2)]):
        model(tokens, return_type="loss").backward()
    for name, param in model.named_parameters():
        upstream = name.startswith(("embed", "pos_embed", "blocks.0."))
        expected = reference[name] * 2 if upstream else reference[name]
        assert torch.allclose(param.grad, expected, atol=1e-6), name
    model.zero_grad()
    with model.hooks(bwd_hooks=[("blocks.1.hook_resid_pre", lambda g, hook: torch.zeros_like(g))]):
        model(tokens, return_type="loss").backward()
    assert torch.count_nonzero(model.embed.weight.grad) == 0
    assert torch.count_nonzero(model.blocks[0].mlp.up.weight.grad) == 0
    assert torch.allclose(model.unembed.weight.grad, reference["unembed.weight"], atol=1e-6)


def test_backward_hook_returning_none_changes_nothing(model, tokens):
    model(tokens, return_type="loss").backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    with model.hooks(bwd_hooks=[(lambda n: True, lambda g, hook: None)]):
        model(tokens, return_type="loss").backward()
    for name, param in model.named_parameters():
        assert torch.equal(param.grad, reference[name]), name


# ---------------------------------------------------------------- run_with_cache


@pytest.mark.parametrize(
    "names_filter, expected",
    [
        ("blocks.0.hook_resid_post", ["blocks.0.hook_resid_post"]),
        ("blocks.*.hook_resid_post", ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]),
        (["hook_embed", "blocks.1.attn.hook_*"], ["hook_embed"] + [f"blocks.1.attn.hook_{n}" for n in
                                                                   ("q", "k", "v", "attn_scores", "pattern", "z")]),
        (lambda name: name.endswith("mlp.hook_post"), ["blocks.0.mlp.hook_post", "blocks.1.mlp.hook_post"]),
    ],
)
def test_run_with_cache_names_filter(model, tokens, names_filter, expected):
    logits, cache = model.run_with_cache(tokens, names_filter=names_filter)
    assert sorted(cache) == sorted(expected)
    reference = toy_reference(model, tokens)
    for name in expected:
        assert torch.allclose(cache[name], reference[name], atol=ATOL), name
    assert not model.has_hooks()


def test_run_with_cache_everything_matches_the_reference(model, tokens):
    logits, cache = model.run_with_cache(tokens)
    reference = toy_reference(model, tokens)
    assert set(cache) == set(reference)
    for name, value in reference.items():
        assert cache[name].shape == value.shape, name
        assert torch.allclose(cache[name], value, atol=ATOL), name
        assert not cache[name].requires_grad
    assert torch.allclose(logits, reference["hook_logits"], atol=ATOL)


def test_run_with_cache_device_and_remove_batch_dim(model, tokens):
    one = tokens[:1]
    _, cache = model.run_with_cache(one, names_filter=["hook_embed", "blocks.0.attn.hook_z"], device="cpu",
                                    remove_batch_dim=True)
    reference = toy_reference(model, one)
    assert cache["hook_embed"].shape == (6, 16) and cache["blocks.0.attn.hook_z"].shape == (6, 4, 4)
    assert torch.allclose(cache["blocks.0.attn.hook_z"], reference["blocks.0.attn.hook_z"][0], atol=ATOL)
    with pytest.raises(ValueError, match="batch of 2"):
        model.run_with_cache(tokens, names_filter="hook_embed", remove_batch_dim=True)
    assert not model.has_hooks()


def test_run_with_cache_incl_bwd_caches_gradients(model, tokens):
    names = ["blocks.0.hook_resid_post", "blocks.1.attn.hook_z", "blocks.0.attn.hook_pattern"]
    loss, cache = model.run_with_cache(tokens, return_type="loss", names_filter=names, incl_bwd=True)
    assert sorted(cache) == sorted(names + [n + "_grad" for n in names])
    expected = grads_by_autograd(model, tokens, names)
    for name in names:
        assert torch.allclose(cache[name + "_grad"], expected[name], atol=1e-6), name
    assert not model.has_hooks()


def test_run_with_cache_incl_bwd_needs_a_scalar(model, tokens):
    with pytest.raises(ValueError, match="must be a scalar"):
        model.run_with_cache(tokens, names_filter="hook_embed", incl_bwd=True)
    assert not model.has_hooks() and model.context_level == 0
    with torch.no_grad(), pytest.raises(ValueError, match="requires grad"):
        model.run_with_cache(tokens, return_type="loss", names_filter="hook_embed", incl_bwd=True)


@pytest.mark.parametrize(
    "pos_slice, index",
    [(3, [3]), (-1, [5]), ((2,), [0, 1]), ((1, 4), [1, 2, 3]), ((0, 6, 2), [0, 2, 4]),
     (slice(4, None), [4, 5]), ([5, 0], [5, 0]), (torch.tensor([2, 3]), [2, 3]), (sl.Slice([1]), [1])],
)
def test_run_with_cache_pos_slice(model, tokens, pos_slice, index):
    names = ["blocks.0.hook_resid_pre", "blocks.0.attn.hook_q", "blocks.0.attn.hook_z",
             "blocks.0.attn.hook_attn_scores", "blocks.0.hook_resid_post"]
    loss, cache = model.run_with_cache(tokens, return_type="loss", names_filter=names, pos_slice=pos_slice, incl_bwd=True)
    reference = toy_reference(model, tokens)
    assert torch.allclose(cache["blocks.0.hook_resid_pre"], reference["blocks.0.hook_resid_pre"][:, index], atol=ATOL)
    for per_head in ("blocks.0.attn.hook_q", "blocks.0.attn.hook_z"):  # [batch, pos, head, d_head]: axis -3
        assert torch.allclose(cache[per_head], reference[per_head][:, index], atol=ATOL)
    # attention scores [batch, head, q_pos, k_pos]: the query axis (-2) is sliced
    assert torch.allclose(cache["blocks.0.attn.hook_attn_scores"], reference["blocks.0.attn.hook_attn_scores"][:, :, index])
    full_grad = grads_by_autograd(model, tokens, ["blocks.0.hook_resid_post"])["blocks.0.hook_resid_post"]
    assert torch.allclose(cache["blocks.0.hook_resid_post_grad"], full_grad[:, index], atol=1e-6)


def test_run_with_cache_keeps_hooks_when_asked(model, tokens):
    _, cache = model.run_with_cache(tokens, names_filter="hook_embed", reset_hooks_end=False)
    assert list(model.list_hooks()) == ["hook_embed"]
    model.reset_hooks()
    assert not model.is_caching


def test_run_with_cache_removes_hooks_when_the_forward_raises(model):
    with pytest.raises(IndexError):
        model.run_with_cache(torch.full((1, 3), 10_000), names_filter="blocks.*.hook_resid_post")
    assert not model.has_hooks() and model.context_level == 0


def test_cache_lookup_of_a_missing_name_names_the_closest(model, tokens):
    _, cache = model.run_with_cache(tokens, names_filter="blocks.*.hook_resid_post")
    with pytest.raises(HookNameError, match="blocks.1.hook_resid_post"):
        cache["blocks.1.hook_resid_pots"]


def test_get_and_add_caching_hooks(model, tokens):
    cache, fwd, bwd = model.get_caching_hooks("blocks.*.hook_mlp_out", incl_bwd=True)
    assert [n for n, _ in fwd] == [n for n, _ in bwd] == ["blocks.0.hook_mlp_out", "blocks.1.hook_mlp_out"]
    assert not model.has_hooks() and model.is_caching
    filled = model.add_caching_hooks("hook_embed")
    model(tokens)
    assert torch.allclose(filled["hook_embed"], toy_reference(model, tokens)["hook_embed"])
    model.reset_hooks()
    assert not model.has_hooks()


# ---------------------------------------------------------------- introspection


def test_list_hooks_filters(model):
    model.add_hook("hook_embed", lambda x, hook: None)
    model.add_hook("hook_embed", lambda g, hook: None, dir="bwd")
    model.add_perma_hook("blocks.0.hook_resid_pre", lambda x, hook: None)
    assert {n: len(h) for n, h in model.list_hooks().items()} == {"hook_embed": 2, "blocks.0.hook_resid_pre": 1}
    assert list(model.list_hooks(dir="bwd")) == ["hook_embed"]
    assert list(model.list_hooks(including_permanent=False)) == ["hook_embed"]
    assert list(model.list_hooks("blocks.*")) == ["blocks.0.hook_resid_pre"]
    assert list(model.list_hooks(["hook_embed"], dir="fwd")) == ["hook_embed"]
    assert model.list_hooks(lambda n: n.startswith("ln")) == {}


def test_introspection_mixin_works_for_any_class_with_hook_dict():
    class Holder(HookIntrospectionMixin):
        def __init__(self):
            self._points = {"a": HookPoint(), "b": HookPoint()}

        @property
        def hook_dict(self):
            return self._points

    holder = Holder()
    holder.hook_dict["b"].add_hook(lambda x, hook: None)
    assert list(holder.list_hooks()) == ["b"]


def test_transformer_lens_style_code_runs_unchanged(model, tokens):
    # As written for transformer_lens.hook_points: partial hooks, hook.name, hooks() blocks.
    from functools import partial

    store = {}

    def save(act, hook, key):
        store[key] = act.detach()

    def ablate_head(z, hook, head):
        z[:, :, head, :] = 0.0
        return z

    fwd = [("blocks.0.attn.hook_z", partial(ablate_head, head=1)),
           (lambda n: n.endswith("hook_z"), partial(save, key="z"))]
    with model.hooks(fwd_hooks=fwd) as hooked:
        hooked(tokens)
    assert torch.count_nonzero(store["z"][:, :, 1]) > 0  # the last hook_z saved was layer 1's
    model.add_hook("blocks.0.attn.hook_z", partial(save, key="z0"))
    model.add_hook("blocks.0.attn.hook_z", partial(ablate_head, head=1), prepend=True)
    model(tokens)
    assert torch.count_nonzero(store["z0"][:, :, 1]) == 0
    model.reset_hooks()
