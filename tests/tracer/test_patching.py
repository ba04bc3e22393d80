"""Sweeps and attribution against naive loops, autograd identities, and across stages."""

import gc

import numpy as np
import pytest
import torch

import shardlens as sl
from shardlens.tracer import attribution, patching
from tests.hooks.reference import grad_through_leaf


@pytest.fixture(scope="module")
def model(tiny_checkpoints):
    return sl.HookedModel.from_pretrained(tiny_checkpoints["llama_gqa"])


@pytest.fixture(scope="module")
def task(model):
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(3, 97, (3, 6), generator=g)
    corrupt = clean.clone()
    corrupt[:, 2] = torch.randint(3, 97, (3,), generator=g)
    with torch.no_grad():
        answer = model(clean)[:, -1].argmax(-1).tolist()
    return clean, corrupt, sl.metrics.logit_diff(answer, [5, 6, 7])


def naive_sweep(model, clean, corrupt, metric, names, over, mask=None, positions=None):
    """One forward per cell, patching with a plain function (no specs); head cells at
    `positions` only, when given."""
    _, cache = model.run_with_cache(clean, names_filter=names, attention_mask=mask)
    at = slice(None) if positions is None else positions
    rows = []
    for name in names:
        count = cache[name].shape[1] if over == "pos" else cache[name].shape[2]
        row = []
        for i in range(count):
            def patch(x, hook, i=i, name=name):
                x = x.clone()
                if over == "pos":
                    x[:, i] = cache[name][:, i]
                else:
                    x[:, at, i] = cache[name][:, at, i]
                return x

            with torch.no_grad():
                row.append(metric(model.run_with_hooks(corrupt, fwd_hooks=[(name, patch)], attention_mask=mask), mask))
        rows.append(torch.stack(row))
    return torch.stack(rows)


@pytest.mark.parametrize("points, over", [("resid_pre", "pos"), ("z", "head"), ("blocks.*.hook_mlp_out", "pos")])
@pytest.mark.parametrize("max_batch", [64, 3])
def test_sweep_equals_the_naive_loop(model, task, points, over, max_batch):
    clean, corrupt, metric = task
    result = patching.sweep(model, clean, corrupt, points=points, metric=metric, over=("layer", over), max_batch=max_batch)
    expected = naive_sweep(model, clean, corrupt, metric, list(result.points), over)
    assert result.grid.shape == expected.shape
    assert torch.allclose(result.grid, expected, atol=1e-5)
    with torch.no_grad():
        assert result.baseline == pytest.approx(float(metric(model(corrupt))), abs=1e-6)
    table = result.table
    assert table.column_names == ["point", "layer", "pos", "head", "value"] and table.num_rows == expected.numel()
    assert table.column(over).null_count == 0


@pytest.mark.parametrize("points, over, positions", [
    ("resid_pre", "pos", None), ("attn_out", "pos", None), ("blocks.*.hook_mlp_out", "pos", None), ("z", "head", None), ("z", "head", [2, 4]),
])
@pytest.mark.parametrize("side", ["left", "right"])
def test_a_padded_sweep_equals_the_naive_loop(model, task, points, over, positions, side):
    clean, corrupt, metric = task
    mask = torch.ones_like(clean)
    mask[0, :2] = 0
    mask[1, :1] = 0
    if side == "right":  # the metric reads example 0 at position 3: cells after it change nothing there
        mask = mask.flip(-1)
    kwargs = dict(points=points, metric=metric, over=("layer", over), attention_mask=mask, positions=positions)
    result = patching.sweep(model, clean, corrupt, max_batch=clean.shape[0], **kwargs)  # one cell per run: each from its own position
    assert torch.allclose(result.grid, patching.sweep(model, clean, corrupt, **kwargs).grid, atol=1e-5)
    expected = naive_sweep(model, clean, corrupt, metric, list(result.points), over, mask, positions)
    assert torch.allclose(result.grid, expected, atol=1e-5)
    with torch.no_grad():
        assert result.baseline == pytest.approx(float(metric(model(corrupt, attention_mask=mask), mask)), abs=1e-6)


def test_patching_the_clean_run_into_itself_changes_nothing(model, task):
    clean, corrupt, metric = task
    with torch.no_grad():
        clean_value, corrupt_value = float(metric(model(clean))), float(metric(model(corrupt)))
    assert abs(clean_value - corrupt_value) > 1  # so a cell that did not patch cannot pass for one that did
    itself = patching.sweep(model, clean, clean, points="resid_pre", metric=metric)
    assert torch.allclose(itself.grid, torch.full_like(itself.grid, clean_value), atol=1e-5)
    # Into corrupt, which differs from clean only at position 2: under the causal mask, positions 0 and 1 hold
    # the clean run's own activations at every layer, so patching them changes nothing; patching position 2
    # before the first layer makes corrupt the clean run. A sweep that ignored its patches gives corrupt_value
    # everywhere.
    into_corrupt = patching.sweep(model, clean, corrupt, points="resid_pre", metric=metric)
    assert torch.allclose(into_corrupt.grid[:, :2], torch.full_like(into_corrupt.grid[:, :2], corrupt_value), atol=1e-5)
    assert float(into_corrupt.grid[0, 2]) == pytest.approx(clean_value, abs=1e-5)


def test_integrated_gradients_are_complete(model, task):
    clean, corrupt, metric = task
    ig = attribution.integrated_gradients(model, clean, corrupt, points="resid_pre", metric=metric, steps=32)
    with torch.no_grad():
        total = float(metric(model(clean)) - metric(model(corrupt)))
    # patching a whole resid_pre moves the metric from corrupt to clean: the IG over its cells sums to that
    for row in ig.grid:
        assert float(row.sum()) == pytest.approx(total, rel=0.01)


def test_grad_x_act_is_activation_times_autograd_gradient(model, task):
    clean, _, metric = task
    result = attribution.grad_x_act(model, clean, points="blocks.1.hook_resid_pre", metric=metric)
    act, grad = grad_through_leaf(model, "blocks.1.hook_resid_pre", lambda: model(clean, return_type="metric", metric=metric))
    assert torch.allclose(result.grid[0], (act * grad).sum((0, 2)), atol=1e-6)


def test_atp_tracks_head_patching_effects(model, task):
    clean, corrupt, metric = task
    swept = patching.sweep(model, clean, corrupt, points="z", metric=metric, over=("layer", "head"))
    estimate = attribution.atp(model, clean, corrupt, points="z", metric=metric, over=("layer", "head"))
    effects = (swept.grid - swept.baseline).flatten().numpy()
    correlation = np.corrcoef(estimate.grid.flatten().numpy(), effects)[0, 1]
    assert correlation > 0.9  # measured 0.99 on this model and task
    assert estimate.baseline == pytest.approx(swept.baseline, abs=1e-5)


def test_across_stages_equal_one_process(tiny_checkpoints, model, task):
    clean, corrupt, metric = task
    expected = {
        "sweep": patching.sweep(model, clean, corrupt, points="resid_pre", metric=metric),
        "atp": attribution.atp(model, clean, corrupt, points="z", metric=metric, over=("layer", "head")),
        "ig": attribution.integrated_gradients(model, clean, corrupt, points="resid_pre", metric=metric, steps=4),
    }
    with sl.Tracer.from_pretrained(tiny_checkpoints["llama_gqa"], stages=2, replicas=2, backend="local") as tracer:
        got = {
            "sweep": patching.sweep(tracer, clean, corrupt, points="resid_pre", metric=metric),
            "atp": attribution.atp(tracer, clean, corrupt, points="z", metric=metric, over=("layer", "head")),
            "ig": attribution.integrated_gradients(tracer, clean, corrupt, points="resid_pre", metric=metric, steps=4),
        }
    for key in expected:
        assert torch.allclose(got[key].grid, expected[key].grid, atol=1e-5), key


def test_bad_requests(model, task):
    clean, corrupt, metric = task
    with pytest.raises(ValueError, match="over must be"):
        patching.sweep(model, clean, corrupt, points="resid_pre", metric=metric, over=("pos",))
    with pytest.raises(ValueError, match="hook_z"):
        patching.sweep(model, clean, corrupt, points="resid_pre", metric=metric, over=("layer", "head"))
    with pytest.raises(ValueError, match="same shape"):
        patching.sweep(model, clean, corrupt[:, :4], points="resid_pre", metric=metric)
    with pytest.raises(ValueError, match="needs answer"):
        sl.metrics.Metric("prob")


def test_a_tracer_sweep_spreads_its_runs_over_the_replicas(ray_session, tiny_checkpoints, model, task):
    clean, corrupt, metric = task
    expected = patching.sweep(model, clean, corrupt, points="resid_pre", metric=metric, max_batch=6)
    with sl.Tracer.from_pretrained(tiny_checkpoints["llama_gqa"], stages=1, replicas=2, backend="ray") as tracer:
        got = patching.sweep(tracer, clean, corrupt, points="resid_pre", metric=metric, max_batch=6)
        before = [s["forwards"] for s in tracer.stats()]
        specs = [sl.HookSpec("blocks.0.hook_resid_pre", sl.ops.Scale(float(k))) for k in range(2)]
        logits = [r.output for r in tracer.run_variants([sl.RunRequest(corrupt, specs=(spec,)) for spec in specs])]
        after = [s["forwards"] for s in tracer.stats()]
    assert torch.allclose(got.grid, expected.grid, atol=1e-5)
    assert [a - b for a, b in zip(after, before)] == [1, 1]  # one variant on each replica
    for spec, variant_logits in zip(specs, logits):
        assert torch.allclose(variant_logits, model.run_with_hooks(corrupt, fwd_hooks=[spec]), atol=1e-5)


@pytest.mark.parametrize("positions", [[-1], [3, 5]])
def test_a_shared_prefix_is_computed_once_and_changes_nothing(model, task, positions):
    clean, corrupt, metric = task
    reused = patching.sweep(model, clean, corrupt, points="z", metric=metric, over=("layer", "head"), positions=positions)
    full = patching.sweep(model, clean, corrupt, points="z", metric=metric, over=("layer", "head"), positions=positions, reuse=False)
    assert torch.allclose(reused.grid, full.grid, atol=1e-5)
    _, cache = model.run_with_cache(clean, names_filter="blocks.*.attn.hook_z")
    naive = []
    for name in reused.points:
        row = []
        for head in range(4):
            def patch(z, hook, head=head, name=name):
                z = z.clone()
                z[:, positions, head] = cache[name][:, positions, head]
                return z

            with torch.no_grad():
                row.append(float(metric(model.run_with_hooks(corrupt, fwd_hooks=[(name, patch)]))))
        naive.append(row)
    assert torch.allclose(reused.grid, torch.tensor(naive), atol=1e-5)


def test_run_with_cache_against_a_frozen_prefix(model, task):
    clean, _, _ = task
    cache = sl.KeyValueCache.init_cache(model.config, batch_size=3)
    with torch.no_grad():
        model(clean[:, :4], past_kv_cache=cache)
    cache.freeze()
    logits, acts = model.run_with_cache(clean[:, 4:], past_kv_cache=cache, names_filter="blocks.1.hook_resid_post")
    full_logits, full = model.run_with_cache(clean, names_filter="blocks.1.hook_resid_post")
    assert torch.allclose(logits, full_logits[:, 4:], atol=1e-5)
    assert torch.allclose(acts["blocks.1.hook_resid_post"], full["blocks.1.hook_resid_post"][:, 4:], atol=1e-5)


def cell_starts(clean, over, n_layers, heads, positions=None):
    """(layer, first position) each cell of a sweep can start at, for a metric read at the
    last position: its layer, and its (earliest) patched position."""
    length = clean.shape[1]
    if over == "pos":
        return [(layer, p) for layer in range(n_layers) for p in range(length)]
    return [(layer, min(positions) if positions else 0) for layer in range(n_layers) for _ in range(heads)]


@pytest.mark.parametrize("points, over, positions", [("resid_pre", "pos", None), ("z", "head", [3, 5]), ("z", "head", None)])
def test_each_cell_runs_only_its_layers_from_its_position(model, task, points, over, positions):
    clean, corrupt, metric = task
    batch, length, n_layers = clean.shape[0], clean.shape[1], model.config.num_hidden_layers
    computed = [0] * n_layers  # example-positions each decoder layer ran
    handles = [
        block.register_forward_pre_hook(lambda module, args, kwargs, layer=layer: computed.__setitem__(layer, computed[layer] + args[0].shape[:2].numel()) if args else None, with_kwargs=True)
        for layer, block in enumerate(model.model.model.layers)
    ]
    kwargs = dict(points=points, metric=metric, over=("layer", over), positions=positions, max_batch=batch)  # one cell per run
    try:
        result = patching.sweep(model, clean, corrupt, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    assert torch.allclose(result.grid, patching.sweep(model, clean, corrupt, reuse=False, **kwargs).grid, atol=1e-5)
    starts = cell_starts(clean, over, n_layers, model.config.num_attention_heads, positions)
    # the clean run and the corrupted (base) run whole, then each cell from its (layer, position)
    assert computed == [2 * batch * length + sum(batch * (length - p) for start, p in starts if start <= layer) for layer in range(n_layers)]


def test_a_tracer_sweep_starts_each_cell_at_its_stage_and_position(tiny_checkpoints, model, task):
    clean, corrupt, metric = task
    batch, length, heads = clean.shape[0], clean.shape[1], model.config.num_attention_heads
    kwargs = dict(points="z", metric=metric, over=("layer", "head"), positions=[4, 5], max_batch=batch)
    expected = patching.sweep(model, clean, corrupt, reuse=False, **kwargs)
    with sl.Tracer.from_pretrained(tiny_checkpoints["llama_gqa"], stages=2, replicas=2, backend="local") as tracer:
        before = tracer.stats()
        got = patching.sweep(tracer, clean, corrupt, **kwargs)
        after = tracer.stats()
        assert [s["sessions"] for s in after] == [0] * 4  # each replica's base run was freed
        last_of_stage = [stage.layers[-1] for stage in tracer.plan.stages]
    assert torch.allclose(got.grid, expected.grid, atol=1e-5)
    assert got.baseline == pytest.approx(expected.baseline, abs=1e-6)
    tokens = [sum(a["tokens"] - b["tokens"] for a, b in zip(after, before) if a["stage"] == s) for s in range(2)]
    starts = cell_starts(clean, "head", model.config.num_hidden_layers, heads, [4, 5])
    # per stage, over both replicas: the clean run (split between them), the base run (on each), and the
    # cells whose layer is on this stage or before, each from its position
    assert tokens == [batch * length + 2 * batch * length + sum(batch * (length - p) for layer, p in starts if layer <= last) for last in last_of_stage]


def test_a_padded_tracer_sweep_equals_one_process(tiny_checkpoints, model, task):
    clean, corrupt, metric = task
    mask = torch.ones_like(clean)
    mask[0, :2] = 0
    kwargs = dict(points="resid_pre", metric=metric, attention_mask=mask, max_batch=clean.shape[0])
    expected = patching.sweep(model, clean, corrupt, reuse=False, **kwargs)
    with sl.Tracer.from_pretrained(tiny_checkpoints["llama_gqa"], stages=2, replicas=2, backend="local") as tracer:
        got = patching.sweep(tracer, clean, corrupt, **kwargs)
    assert torch.allclose(got.grid, expected.grid, atol=1e-5)


def test_a_base_run_failing_on_one_replica_leaves_nothing(tiny_checkpoints, task):
    clean, _, _ = task
    with sl.Tracer.from_pretrained(tiny_checkpoints["llama_gqa"], stages=2, replicas=2, backend="local") as tracer:
        worker = tracer.coordinator.workers[1][1]

        def failing(*args, **kwargs):
            raise RuntimeError("stage 1 of replica 1 failed")

        worker.forward = failing
        with pytest.raises(RuntimeError, match="replica 1 failed"):
            tracer.base_run(clean)
        del worker.forward
        assert [(s["sessions"], s["pending_results"]) for s in tracer.stats()] == [(0, 0)] * 4
        assert all(w.list_hooks() == {} for row in tracer.coordinator.workers for w in row)


def test_a_base_run_dropped_without_close_is_freed(tiny_checkpoints, task):
    clean, _, _ = task
    with sl.Tracer.from_pretrained(tiny_checkpoints["llama_gqa"], stages=2, backend="local") as tracer:
        base = tracer.base_run(clean)
        assert [s["sessions"] for s in tracer.stats()] == [1, 1]
        del base
        gc.collect()
        assert [s["sessions"] for s in tracer.stats()] == [0, 0]


def test_bad_sweeps_are_refused(model, task):
    clean, corrupt, metric = task
    with pytest.raises(ValueError, match=r"positions=\[6\] but the batch has 6 tokens: valid positions are -6..5"):
        patching.sweep(model, clean, corrupt, points="z", metric=metric, over=("layer", "head"), positions=[6])
    with pytest.raises(ValueError, match="pass whole_batch=True"):
        sl.RunRequest(clean.repeat(2, 1), return_type="metric", metric=metric.per_copy(2))


def test_a_failed_sweep_frees_its_base_run(tiny_checkpoints, task, monkeypatch):
    clean, corrupt, metric = task

    def failing(model, requests):
        raise RuntimeError("a variant failed")

    monkeypatch.setattr(patching, "_run_all", failing)
    with sl.Tracer.from_pretrained(tiny_checkpoints["llama_gqa"], stages=2, replicas=2, backend="local") as tracer:
        with pytest.raises(RuntimeError, match="a variant failed"):
            patching.sweep(tracer, clean, corrupt, points="resid_pre", metric=metric)
        assert [s["sessions"] for s in tracer.stats()] == [0] * 4
