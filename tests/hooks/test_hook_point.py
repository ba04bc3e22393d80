"""HookPoint on its own: hooks, directions, order, levels, reshape, aliases, repr."""

import pytest
import torch
from torch import nn

from shardlens.hooks import HookPoint, LensHandle


def named(name: str = "blocks.3.hook_x") -> HookPoint:
    hp = HookPoint()
    hp.name = name
    return hp


def test_identity_without_hooks():
    x = torch.randn(2, 3)
    assert named()(x) is x


def test_forward_hook_may_replace_or_leave_the_value():
    hp = named()
    seen = []
    hp.add_hook(lambda x, hook: seen.append((hook.name, x.clone())))
    hp.add_hook(lambda x, hook: x + 1)
    x = torch.zeros(2)
    assert torch.equal(hp(x), torch.ones(2))
    assert seen[0][0] == "blocks.3.hook_x" and torch.equal(seen[0][1], x)


def test_prepend_runs_first_in_both_directions():
    hp = named()
    order = []

    def hook(label, transform):
        def fn(x, hook):
            order.append(label)
            return transform(x)

        return fn

    handles = {}
    for d in ("fwd", "bwd"):
        a = hook(f"{d}-a", lambda t: t + 1)
        b = hook(f"{d}-b", lambda t: t * 10)
        c = hook(f"{d}-c", lambda t: t - 3)
        hp.add_hook(a, dir=d)
        hp.add_hook(b, dir=d, prepend=True)  # before a
        hp.add_hook(c, dir=d, prepend=True)  # before b, the latest first
        handles[d] = [c, b, a]
    x = torch.ones(3, requires_grad=True)
    out = hp(x)
    out.sum().backward()
    assert order == ["fwd-c", "fwd-b", "fwd-a", "bwd-c", "bwd-b", "bwd-a"]
    # Each hook sees the previous one's result: (1 - 3) * 10 + 1; appended in order it would be (1 + 1) * 10 - 3.
    assert torch.equal(out, torch.full((3,), -19.0))
    # The bwd chain turns sum()'s gradient, 1, into -19; the fwd chain's slope, 10, carries it to x.
    assert torch.equal(x.grad, torch.full((3,), -190.0))
    assert [h.user_hook for h in hp.fwd_hooks] == handles["fwd"]
    assert [h.user_hook for h in hp.bwd_hooks] == handles["bwd"]


def test_backward_hook_receives_the_gradient_tensor_and_may_replace_it():
    x = torch.randn(4, requires_grad=True)
    hp = named()
    seen = []
    hp.add_hook(lambda g, hook: seen.append(g.clone()), dir="bwd")
    hp.add_hook(lambda g, hook: g * 10, dir="bwd")
    hp.add_hook(lambda g, hook: seen.append(g.clone()), dir="bwd")
    weights = torch.tensor([1.0, 2.0, 3.0, 4.0])
    (hp(x) * weights).sum().backward()
    assert isinstance(seen[0], torch.Tensor)
    assert torch.equal(seen[0], weights)  # d/dy of sum(y * w) is w
    assert torch.equal(seen[1], weights * 10)  # each hook sees the previous replacement
    assert torch.equal(x.grad, weights * 10)


def test_backward_hook_sees_only_the_gradient_through_the_hook_point():
    # x feeds the hook point and, separately, the output: the hook must see d/dy only.
    x = torch.randn(3, requires_grad=True)
    hp = named()
    seen = []
    hp.add_hook(lambda g, hook: seen.append(g.clone()), dir="bwd")
    (2 * hp(x) + 3 * x).sum().backward()
    assert torch.equal(seen[0], torch.full((3,), 2.0))
    assert torch.equal(x.grad, torch.full((3,), 5.0))


def test_backward_hook_does_not_fire_without_grad():
    hp = named()
    fired = []
    hp.add_hook(lambda g, hook: fired.append(1), dir="bwd")
    with torch.no_grad():
        hp(torch.ones(2, requires_grad=True))
    assert fired == []


def test_remove_hooks_by_direction_level_and_permanence():
    hp = named()
    hp.add_hook(lambda x, hook: None, level=1)
    hp.add_hook(lambda x, hook: None, level=2)
    hp.add_hook(lambda x, hook: None, dir="bwd", level=2)
    hp.add_perma_hook(lambda x, hook: None)
    assert hp.has_hooks(level=2) and hp.has_hooks(dir="bwd")
    hp.remove_hooks("fwd", level=2)
    assert [h.context_level for h in hp.fwd_hooks] == [1, None]
    assert hp.has_hooks(dir="bwd", level=2)
    hp.remove_hooks("both")
    assert [h.is_permanent for h in hp.fwd_hooks] == [True] and hp.bwd_hooks == []
    assert hp.has_hooks() and not hp.has_hooks(including_permanent=False)
    hp.remove_hooks("both", including_permanent=True)
    assert not hp.has_hooks()
    assert torch.equal(hp(torch.ones(1)), torch.ones(1))


def test_removed_hooks_no_longer_run():
    hp = named()
    hp.add_hook(lambda x, hook: x * 0)
    hp.add_hook(lambda g, hook: g * 0, dir="bwd")
    hp.remove_hooks("both")
    x = torch.ones(2, requires_grad=True)
    hp(x).sum().backward()
    assert torch.equal(x.grad, torch.ones(2))


def test_lens_handle_records_how_the_hook_was_added():
    hp = named()

    def fn(x, hook):
        return None

    hp.add_hook(fn, level=4)
    handle = hp.fwd_hooks[0]
    assert isinstance(handle, LensHandle)
    assert (handle.user_hook, handle.context_level, handle.is_permanent) == (fn, 4, False)
    assert isinstance(handle.hook, torch.utils.hooks.RemovableHandle)


def test_ctx_is_scratch_space_for_hooks_and_clear_context_empties_it():
    hp = named()
    hp.add_hook(lambda x, hook: hook.ctx.setdefault("seen", []).append(x.sum().item()))
    hp(torch.ones(2))
    hp(torch.ones(3))
    assert hp.ctx == {"seen": [2.0, 3.0]}
    hp.clear_context()
    assert hp.ctx == {}


def test_repr_names_the_point_and_counts_hooks():
    hp = named("blocks.0.hook_x")
    assert repr(hp) == "HookPoint(name='blocks.0.hook_x')"
    hp.add_hook(lambda x, hook: None)
    hp.add_hook(lambda x, hook: None)
    assert repr(hp) == "HookPoint(name='blocks.0.hook_x', 2 fwd)"
    hp.add_hook(lambda x, hook: None, dir="bwd")
    assert repr(hp) == "HookPoint(name='blocks.0.hook_x', 2 fwd, 1 bwd)"


def test_layer():
    assert named("blocks.11.attn.hook_q").layer() == 11
    with pytest.raises(ValueError, match="belongs to no layer"):
        named("hook_embed").layer()
    with pytest.raises(ValueError, match="no name yet"):
        HookPoint().layer()


class SplitHeads:
    """[batch, pos, head * d_head] <-> [batch, pos, head, d_head]"""

    def convert(self, x):
        return x.unflatten(-1, (2, 3))

    def revert(self, x):
        return x.flatten(-2)


def test_enable_reshape_converts_for_the_hook_and_reverts_its_result():
    hp = named()
    hp.enable_reshape(SplitHeads())
    shapes = []

    def zero_head_1(z, hook):
        shapes.append(tuple(z.shape))
        z = z.clone()
        z[:, :, 1] = 0
        return z

    hp.add_hook(zero_head_1)
    x = torch.randn(2, 4, 6)
    out = hp(x)
    assert shapes == [(2, 4, 2, 3)]
    assert out.shape == x.shape
    assert torch.equal(out[..., :3], x[..., :3]) and torch.equal(out[..., 3:], torch.zeros(2, 4, 3))
    hp.enable_reshape(None)
    hp.remove_hooks()
    hp.add_hook(lambda x, hook: shapes.append(tuple(x.shape)))
    hp(x)
    assert shapes[-1] == (2, 4, 6)
    with pytest.raises(TypeError, match="convert"):
        hp.enable_reshape(object())


def test_alias_names_call_the_hook_once_per_name():
    hp = named("blocks.2.hook_resid_pre")
    calls = []

    def record_and_add_one(x, hook):
        calls.append((hook.name, hook.layer()))
        return x + 1

    hp.add_hook(record_and_add_one, alias_names=["blocks.2.hook_a", "blocks.7.hook_b"])
    assert torch.equal(hp(torch.zeros(1)), torch.full((1,), 2.0))  # each call sees the last result
    assert calls == [("blocks.2.hook_a", 2), ("blocks.7.hook_b", 7)]


@pytest.mark.parametrize("call", [lambda hp: hp.add_hook(lambda x, hook: None, dir="forward"),
                                  lambda hp: hp.remove_hooks("sideways"),
                                  lambda hp: hp.has_hooks(dir="up")])
def test_bad_direction_is_refused_with_the_valid_ones(call):
    with pytest.raises(ValueError, match="'fwd'"):
        call(named())


def test_non_callable_hook_is_refused():
    with pytest.raises(TypeError, match="callable"):
        named().add_hook("not a function")


def test_hook_point_inside_a_module_sees_the_live_graph():
    # A forward hook may return a tensor built from the activation: gradients flow through it.
    layer = nn.Linear(3, 3)
    hp = named()
    hp.add_hook(lambda x, hook: x * 3)
    x = torch.randn(2, 3)
    hp(layer(x)).sum().backward()
    expected = 3 * x.sum(0)
    assert torch.allclose(layer.weight.grad, expected.expand(3, 3), atol=1e-6)
