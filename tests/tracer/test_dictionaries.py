"""A spliced SAE (on the last stage) and a transcoder (on the first) give a 2-stage Tracer the
same latents, logits and per-latent attributions as one process, and the weights reach the
workers by reference: the driver reads only the files' headers."""

from unittest import mock

import pytest
import torch
from safetensors.torch import save_file

import shardlens as sl
from shardlens.hooks.dictionaries import WeightsRef
from tests.tracer.test_hook_api import FAMILY

SAE_POINT = "blocks.2.hook_resid_mid"  # layer 2: the last stage
READ, WRITE = "blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out"  # layer 0: the first stage
LATENTS = [f"{WRITE}.sae.hook_latents", f"{SAE_POINT}.sae.hook_latents"]
ATOL = 1e-5


def _weights(seed: int, *, skip: bool) -> dict:
    g = torch.Generator().manual_seed(seed)
    tensors = {"W_enc": torch.randn(32, 48, generator=g) * 0.3, "b_enc": torch.randn(48, generator=g) * 0.1,
               "W_dec": torch.randn(48, 32, generator=g) * 0.3, "b_dec": torch.randn(32, generator=g) * 0.1,
               "threshold": torch.rand(48, generator=g) * 0.2}
    if skip:
        tensors["W_skip"] = torch.randn(32, 32, generator=g) * 0.1
    return tensors


@pytest.fixture(scope="module")
def specs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dictionaries")
    save_file(_weights(0, skip=False), folder / "sae.safetensors")
    save_file(_weights(1, skip=True), folder / "transcoder.safetensors")
    with mock.patch.object(WeightsRef, "tensors", side_effect=AssertionError("the driver built the weights")):
        return [sl.dictionaries.load(folder / "sae.safetensors", point=SAE_POINT),
                sl.dictionaries.load(folder / "transcoder.safetensors", point=READ, write=WRITE)]


@pytest.fixture(scope="module")
def reference(tiny_checkpoints):
    return sl.HookedModel.from_pretrained(tiny_checkpoints[FAMILY])


@pytest.fixture(scope="module", params=["tracer_local", "tracer_ray"])
def tracer(request, tiny_checkpoints):
    options = dict(stages=2, backend="local")
    if request.param == "tracer_ray":
        request.getfixturevalue("ray_session")
        options = dict(stages=2, replicas=2, backend="ray", microbatch_size=1)
    with sl.Tracer.from_pretrained(tiny_checkpoints[FAMILY], **options) as tracer:
        yield tracer


@pytest.fixture
def tokens():
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, 97, (2, 7), generator=g), torch.randint(3, 97, (2, 7), generator=g)


def test_latents_and_logits_equal_one_process(tracer, reference, specs, tokens):
    clean, _ = tokens
    with reference.hooks(fwd_hooks=specs):
        expected_logits, expected = reference.run_with_cache(clean, names_filter=LATENTS)
    with tracer.hooks(fwd_hooks=specs):
        assert set(LATENTS) <= set(tracer.hook_names())
        logits, cache = tracer.run_with_cache(clean, names_filter=LATENTS)
    torch.testing.assert_close(logits, expected_logits, rtol=0, atol=ATOL)
    torch.testing.assert_close(logits, reference(clean), rtol=0, atol=ATOL)  # the error term: unchanged
    for name in LATENTS:
        assert (expected[name] > 0).any()
        torch.testing.assert_close(cache[name], expected[name], rtol=0, atol=ATOL)


@pytest.mark.parametrize("method", ["atp", "integrated_gradients", "grad_x_act"])
def test_per_latent_attributions_equal_one_process(tracer, reference, specs, tokens, method):
    clean, corrupt = tokens
    metric = sl.metrics.logit_diff(torch.tensor([5, 6]), torch.tensor([7, 8]))
    function = getattr(sl.attribution, method)
    arguments = (clean,) if method == "grad_x_act" else (clean, corrupt)
    options = dict(points=LATENTS, metric=metric, over=("layer", "feature"), **({"steps": 4} if method == "integrated_gradients" else {}))
    with reference.hooks(fwd_hooks=specs):
        expected = function(reference, *arguments, **options)
    with tracer.hooks(fwd_hooks=specs):
        got = function(tracer, *arguments, **options)
    assert got.grid.shape == (2, 48) and got.points == tuple(LATENTS)
    assert expected.grid.abs().max() > 1e-3
    torch.testing.assert_close(got.grid, expected.grid, rtol=0, atol=ATOL)
    if method == "grad_x_act":  # each latent's sum over batch and positions, from the cache
        with reference.hooks(fwd_hooks=specs):
            _, cache = reference.run_with_cache(clean, names_filter=LATENTS, incl_bwd=True, return_type="metric", metric=metric)
        for row, name in enumerate(LATENTS):
            torch.testing.assert_close(expected.grid[row], (cache[name] * cache[name + "_grad"]).sum((0, 1)), rtol=0, atol=1e-6)


def test_feature_sweep_of_the_top_latents_equals_one_process_and_a_naive_loop(tracer, reference, specs, tokens):
    clean, corrupt = tokens
    metric = sl.metrics.logit_diff(torch.tensor([5, 6]), torch.tensor([7, 8]))
    with reference.hooks(fwd_hooks=specs):
        expected = sl.patching.feature_sweep(reference, clean, corrupt, points=LATENTS, metric=metric, top=3)
        scores = sl.attribution.atp(reference, clean, corrupt, points=LATENTS, metric=metric, over=("layer", "feature")).grid
        _, clean_cache = reference.run_with_cache(clean, names_filter=LATENTS)
        for row, name in enumerate(LATENTS):
            swept = (~expected.grid[row].isnan()).nonzero().flatten().tolist()
            assert swept == sorted(scores[row].abs().topk(3).indices.tolist())  # the top 3 by |AtP|
            for latent in swept[:2]:  # the naive loop: one patched run per cell
                patch = sl.HookSpec(name, sl.ops.Patch(clean_cache[name][..., [latent]], features=[latent]))
                naive = metric(reference.run_with_hooks(corrupt, fwd_hooks=[patch]), None, corrupt)
                assert expected.grid[row, latent] == pytest.approx(float(naive.detach()), abs=ATOL)
    with tracer.hooks(fwd_hooks=specs):
        got = sl.patching.feature_sweep(tracer, clean, corrupt, points=LATENTS, metric=metric, top=3)
    torch.testing.assert_close(got.grid, expected.grid, rtol=0, atol=ATOL, equal_nan=True)
    assert got.table.num_rows == 6 and set(got.table.column("feature").to_pylist()) <= set(range(48))


def test_a_sweep_inside_a_splice_at_resid_pre_passes_its_hooks_once(tracer, reference, tmp_path, tokens):
    # A resumed run enters at the patched layer's resid_pre: the base run keeps that value as
    # it was before the hooks there, so a dropped error (or any edit) is applied once, not twice.
    save_file(_weights(2, skip=False), tmp_path / "sae.safetensors")
    point = "blocks.1.hook_resid_pre"
    latents = point + ".sae.hook_latents"
    drop = sl.dictionaries.load(tmp_path / "sae.safetensors", point=point, error="drop")
    clean, corrupt = tokens
    metric = sl.metrics.logit_diff(torch.tensor([5, 6]), torch.tensor([7, 8]))
    chosen = {latents: [3, 11, 30]}
    with reference.hooks(fwd_hooks=[drop]):
        _, clean_cache = reference.run_with_cache(clean, names_filter=latents)
        naive = []
        for latent in chosen[latents]:
            patch = sl.HookSpec(latents, sl.ops.Patch(clean_cache[latents][..., [latent]], features=[latent]))
            naive.append(float(metric(reference.run_with_hooks(corrupt, fwd_hooks=[patch]), None, corrupt).detach()))
    for runner in (reference, tracer):
        with runner.hooks(fwd_hooks=[drop]):
            got = sl.patching.feature_sweep(runner, clean, corrupt, points=[latents], metric=metric, features=chosen)
            whole = sl.patching.sweep(runner, clean, corrupt, points=point, metric=metric, reuse=False)
            resumed = sl.patching.sweep(runner, clean, corrupt, points=point, metric=metric)
        assert got.grid[0, chosen[latents]].tolist() == pytest.approx(naive, abs=ATOL)
        torch.testing.assert_close(resumed.grid, whole.grid, rtol=0, atol=ATOL)


def test_the_points_a_splice_makes_go_when_its_block_ends(tracer, specs):
    before = tracer.hook_names()
    with tracer.hooks(fwd_hooks=specs[:1]):
        assert set(tracer.hook_names()) - set(before) == {f"{SAE_POINT}.sae.hook_latents", f"{SAE_POINT}.sae.hook_reconstruction", f"{SAE_POINT}.sae.hook_error"}
        with tracer.hooks(fwd_hooks=specs[1:]):
            assert f"{WRITE}.sae.hook_latents" in tracer.hook_names()
        assert f"{WRITE}.sae.hook_latents" not in tracer.hook_names() and f"{SAE_POINT}.sae.hook_latents" in tracer.hook_names()
    assert tracer.hook_names() == before
