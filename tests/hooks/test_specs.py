"""HookSpec: validation, JSON round trips, selectors, installation."""

import json
import re

import pytest
import torch

import shardlens as sl
from shardlens.hooks import HookNameError
from shardlens.hooks.toy import ToyTransformer

ops = sl.ops
T = torch.arange(12, dtype=torch.float32).reshape(3, 4)
SAE = sl.dictionaries.Dictionary({"W_enc": torch.eye(4), "b_enc": torch.zeros(4), "W_dec": torch.eye(4).double(), "b_dec": torch.zeros(4),
                                   "threshold": torch.full((4,), 0.5)}, architecture="jumprelu", normalize_activations="layer_norm")

EVERY_OP = [
    ops.Cache(positions=[[1, 2], [3]], reduce="mean", dtype="bfloat16", device="cpu"),
    ops.Cache(positions=slice(1, None, 2), heads=[0, 2], batch=0),
    ops.CacheGrad(positions=-1),
    ops.NormStats(positions=[0, 1]),
    ops.AttnPatternBlocks([[1, 2, 3], [4]], rows=[[0, 1]], reduce="baseline_ratio", heads=1),
    ops.ProjectedHeads(heads=[1], bias=True),
    ops.Patch(T.to(torch.bfloat16), positions=[1]),
    ops.Patch(from_cache="clean", entry="blocks.0.hook_resid_pre", batch=[0, 1]),
    ops.Ablate("zero", heads=[1, 3]),
    ops.Ablate("mean", mean=T[0].half()),
    ops.Add(T[0], scale=-2.5, positions=slice(-1, None)),
    ops.Scale(0.5),
    ops.Scale(T[0]),
    ops.AttnEdit(0.0, q_positions=[5], k_positions=[1, 2], heads=0, renormalize=True),
    ops.ScaleGrad(3.0, positions=[2]),
    ops.StopGrad(batch=1),
    ops.Chain([ops.Scale(2.0), ops.Cache()]),
    ops.FwdBwd(fwd=[ops.Scale(2.0)], bwd=[ops.CacheGrad(), ops.ScaleGrad(0.5)], fwd2=[ops.Add(T[1])]),
    ops.AtLayers(ops.Ablate("zero"), layers=range(1, 3)),
    ops.Splice(SAE, error="drop"),
    ops.Splice(SAE, write="blocks.1.hook_mlp_out", error="freeze"),
    ops.Ablate("zero", features=[3, 5]),
]


@pytest.mark.parametrize("op", EVERY_OP, ids=lambda op: type(op).__name__)
def test_json_round_trip_is_exact(op):
    spec = sl.HookSpec(sl.points("resid_post", layers=[1, 2]), op, level=2, prepend=True)
    text = spec.to_json()
    back = sl.HookSpec.from_json(text)
    assert back == spec
    assert back.to_json() == text
    assert "pickle" not in text
    json.loads(text)  # plain JSON


def test_round_trip_keeps_tensor_dtypes_and_values():
    values = torch.randn(2, 3).to(torch.bfloat16)
    back = sl.HookSpec.from_json(sl.HookSpec("hook_embed", ops.Patch(values)).to_json())
    assert back.op.values.dtype == torch.bfloat16 and torch.equal(back.op.values, values)
    assert back != sl.HookSpec("hook_embed", ops.Patch(values.float()))  # dtype is part of the value


def test_points_forms_round_trip():
    for points in ["blocks.0.hook_z", "blocks.*.hook_z", ["hook_embed", "blocks.*.hook_z"], sl.points("z")]:
        spec = sl.HookSpec(points, ops.Cache())
        assert sl.HookSpec.from_json(spec.to_json()) == spec


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: sl.HookSpec(3, ops.Cache()), "points"),
        (lambda: sl.HookSpec("", ops.Cache()), "points"),
        (lambda: sl.HookSpec("x", lambda t, hook: t), "op"),
        (lambda: sl.HookSpec("x", ops.Cache(), dir="forward"), "dir"),
        (lambda: sl.HookSpec("x", ops.Cache(), dir="bwd"), "dir='bwd'"),
        (lambda: sl.HookSpec("x", ops.CacheGrad(), dir="fwd"), "acts on gradients"),
        (lambda: sl.HookSpec("x", ops.Cache(), level=-1), "level"),
        (lambda: sl.HookSpec("x", ops.Cache(), level=1, permanent=True), "permanent"),
        (lambda: sl.HookSpec("x", ops.Cache(), prepend="yes"), "prepend"),
        (lambda: ops.Cache(reduce="max"), "reduce"),
        (lambda: ops.Cache(dtype="float99"), "dtype"),
        (lambda: ops.Cache(positions="last"), "positions"),
        (lambda: ops.Cache(heads=[[0, 1]]), "heads"),
        (lambda: ops.Ablate("random"), "mode"),
        (lambda: ops.Ablate("zero", mean=torch.ones(1)), "mean="),
        (lambda: ops.Patch(), "exactly one of values= and from_cache="),
        (lambda: ops.Patch(torch.ones(1), from_cache="clean"), "exactly one"),
        (lambda: ops.Patch("values"), "values"),
        (lambda: ops.AttnPatternBlocks([[1]], reduce="max"), "reduce"),
        (lambda: ops.Chain([ops.Cache(), ops.CacheGrad()]), "mixes forward and backward"),
        (lambda: ops.FwdBwd(bwd=[ops.Cache()]), "FwdBwd.bwd"),
        (lambda: ops.AtLayers("op"), "AtLayers"),
        (lambda: ops.Splice(torch.eye(2)), "Splice takes an sl.dictionaries.Dictionary"),
        (lambda: ops.Ablate("zero", features=[[1, 2]]), "features takes an int"),
        (lambda: ops.Code(3), "callable"),
        (lambda: sl.points(""), "kind"),
    ],
)
def test_bad_fields_raise_value_error_naming_them(make, field):
    with pytest.raises(ValueError, match=re.escape(field)):
        make()


def test_specs_are_frozen():
    spec = sl.HookSpec("x", ops.Cache())
    with pytest.raises(AttributeError):
        spec.points = "y"
    with pytest.raises(AttributeError):
        spec.op.positions = 3


def test_unknown_json_type_is_refused():
    text = json.dumps({"__type__": "Exec", "cmd": "rm -rf /"})
    with pytest.raises(ValueError, match="unknown type 'Exec'"):
        sl.HookSpec.from_json(text)


def test_code_serialises_only_when_allowed():
    spec = sl.HookSpec("hook_embed", ops.Code(lambda x, hook: x * 2))
    with pytest.raises(ValueError, match="pickles code"):
        spec.to_json()
    text = spec.to_json(allow_code=True)
    with pytest.raises(ValueError, match="allow_code=True"):
        sl.HookSpec.from_json(text)
    back = sl.HookSpec.from_json(text, allow_code=True)
    assert torch.equal(back.op(torch.ones(2), None, None), torch.full((2,), 2.0))


# ---------------------------------------------------------------- resolution and installation


@pytest.fixture
def toy():
    torch.manual_seed(0)
    return ToyTransformer(n_layers=3, d_model=16, n_heads=4, d_vocab=23)


def test_resolve_names_globs_lists_and_selectors(toy):
    names = toy.hook_names()
    assert sl.HookSpec(sl.points("resid_post", layers=range(1, 3)), ops.Cache()).resolve(names) == [
        "blocks.1.hook_resid_post", "blocks.2.hook_resid_post"]
    assert sl.HookSpec(sl.points("z"), ops.Cache()).resolve(names) == [f"blocks.{i}.attn.hook_z" for i in range(3)]
    assert sl.HookSpec(["hook_embed", "blocks.2.*mlp*"], ops.Cache()).resolve(names) == [
        "hook_embed", "blocks.2.mlp.hook_pre", "blocks.2.mlp.hook_post", "blocks.2.hook_mlp_out"]


def test_unknown_points_raise_hook_name_error_with_closest(toy):
    with pytest.raises(HookNameError, match="blocks.1.hook_resid_post"):
        sl.HookSpec("blocks.1.hook_resid_pots", ops.Cache()).resolve(toy.hook_names())
    with pytest.raises(HookNameError, match="blocks.7.hook_resid_post"):
        sl.HookSpec(sl.points("resid_post", layers=[7]), ops.Cache()).resolve(toy.hook_names())
    tokens = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(HookNameError):
        toy.run_with_cache(tokens, fwd_hooks=[sl.HookSpec("blocks.*.hook_nothing", ops.Ablate())])
    assert not toy.has_hooks()


def test_reading_spec_needs_somewhere_to_put_results(toy):
    tokens = torch.zeros(1, 3, dtype=torch.long)
    spec = sl.HookSpec("hook_embed", ops.Cache())
    with pytest.raises(ValueError, match="store="):
        toy.run_with_hooks(tokens, fwd_hooks=[spec])
    store = {}
    toy.run_with_hooks(tokens, fwd_hooks=[spec], store=store)
    assert torch.equal(store["hook_embed"], toy.embed.weight[tokens])
    assert not toy.has_hooks()


def test_specs_take_the_block_level_and_permanence(toy):
    with toy.hooks(fwd_hooks=[sl.HookSpec("hook_embed", ops.Scale(1.0))]):
        with toy.hooks(fwd_hooks=[sl.HookSpec("hook_embed", ops.Scale(2.0), prepend=True),
                                  sl.HookSpec("hook_pos_embed", ops.Scale(0.0), permanent=True)]):
            handles = toy.list_hooks()["hook_embed"]
            assert [h.level for h in handles] == [2, 1]
            assert handles[0].op == ops.Scale(2.0)
    assert list(toy.list_hooks()) == ["hook_pos_embed"]
    toy.reset_hooks(including_permanent=True)
    toy.add_spec(sl.HookSpec("hook_embed", ops.Scale(3.0), level=5))
    assert toy.list_hooks()["hook_embed"][0].level == 5
    toy.reset_hooks(level=5)
    assert not toy.has_hooks()
