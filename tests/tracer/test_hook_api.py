"""The whole hook API, run the same way against every runner: a HookedModel in this process,
a 2-stage Tracer in this process, a 2-stage Tracer on Ray (two replicas), and a client
connected to the tracing service (Ray Serve) hosting that Tracer. The service runs no Python
code, so where a test hooks a Python function the client must refuse it instead.

Each test compares with references that share no code with the runners: the plain
transformers model (its logits, hidden states and autograd gradients) and plain torch hooks.
"""

import pyarrow.parquet as pq
import pytest
import torch

import shardlens as sl
from shardlens.errors import HookNameError
from shardlens.cluster.worker import StageWorker
from shardlens.serve import Client
from shardlens.sharding.plan import hf_path
from tests.serve.service import config_of, running
from tests.tiny_models import load_reference

FAMILY = "llama_gqa"
ATOL = 1e-5
RUNNERS = ["hooked_model", "tracer_local", "tracer_ray", "client"]
TOKEN = "test-token"


@pytest.fixture(scope="module", params=RUNNERS)
def runner(request, tiny_checkpoints):
    source = tiny_checkpoints[FAMILY]
    if request.param == "hooked_model":
        yield sl.HookedModel.from_pretrained(source)
        return
    if request.param == "client":
        request.getfixturevalue("ray_session")
        yield from connected(source)
        return
    if request.param == "tracer_local":
        options = dict(stages=2, backend="local")
    else:
        request.getfixturevalue("ray_session")
        options = dict(stages=2, replicas=2, backend="ray", microbatch_size=1)
    with sl.Tracer.from_pretrained(source, allow_code=True, **options) as tracer:
        yield tracer


def connected(source):
    """A client of a service hosting the model at `source` as the Ray Tracer above."""
    config = config_of(source, tokens={"tester": (TOKEN, None)}, stages=2, replicas=2, backend="ray", microbatch_size=1)
    with running(config) as url:
        yield sl.connect(url, model="tiny", token=TOKEN)


def runs_no_code(runner) -> bool:
    return isinstance(runner, Client)


@pytest.fixture(scope="module")
def hf(tiny_checkpoints):
    return load_reference(tiny_checkpoints[FAMILY])


@pytest.fixture
def tokens():
    return torch.randint(3, 97, (2, 7), generator=torch.Generator().manual_seed(0))


def test_hook_names_and_cfg_are_the_models(runner, hf):
    assert len(runner.hook_names()) == len(set(runner.hook_names()))
    layers = hf.config.num_hidden_layers
    assert [f"blocks.{layer}.hook_resid_post" for layer in range(layers)] == [n for n in runner.hook_names() if n.endswith("hook_resid_post")]
    assert (runner.cfg.n_layers, runner.cfg.d_model, runner.cfg.n_key_value_heads) == (layers, hf.config.hidden_size, hf.config.num_key_value_heads)


def test_run_with_cache_gives_the_models_logits_and_hidden_states(runner, hf, tokens):
    with torch.no_grad():
        out = hf(tokens, output_hidden_states=True)
    logits, cache = runner.run_with_cache(tokens, names_filter="blocks.*.hook_resid_pre")
    assert torch.allclose(logits, out.logits, atol=ATOL)
    assert sorted(cache) == [f"blocks.{layer}.hook_resid_pre" for layer in range(hf.config.num_hidden_layers)]
    for layer in range(hf.config.num_hidden_layers):
        assert torch.allclose(cache[f"blocks.{layer}.hook_resid_pre"], out.hidden_states[layer], atol=ATOL)


def test_incl_bwd_gives_autograds_gradients(runner, hf, tokens):
    out = hf(tokens, labels=tokens, output_hidden_states=True)
    for hidden in out.hidden_states:
        hidden.retain_grad()
    out.loss.backward()
    loss, cache = runner.run_with_cache(tokens, return_type="loss", names_filter="blocks.1.hook_resid_pre", incl_bwd=True)
    assert torch.allclose(loss, out.loss, atol=ATOL)
    assert torch.allclose(cache["blocks.1.hook_resid_pre_grad"], out.hidden_states[1].grad, atol=ATOL)
    hf.zero_grad()


def parameters_with_grad(runner) -> int:
    if isinstance(runner, sl.HookedModel):
        return sum(p.grad is not None for p in runner.parameters())
    return sum(stats["parameters_with_grad"] for stats in runner.stats())


def test_gradient_runs_compute_no_weight_gradients_unless_asked(runner, hf, tokens):
    out = hf(tokens, labels=tokens)
    out.loss.backward()
    expected = {name: p.grad.clone() for name, p in hf.named_parameters()}
    hf.zero_grad(set_to_none=True)
    _, cache = runner.run_with_cache(tokens, return_type="loss", names_filter="blocks.1.hook_resid_pre", incl_bwd=True)
    assert cache["blocks.1.hook_resid_pre_grad"].abs().sum() > 0
    if runs_no_code(runner):  # a shared service keeps no weight gradients on its workers
        with pytest.raises(ValueError, match="no weight gradients"):
            runner.run_with_cache(tokens, return_type="loss", names_filter="blocks.1.hook_resid_pre", incl_bwd=True, weight_grads=True)
        return
    assert parameters_with_grad(runner) == 0
    runner.run_with_cache(tokens, return_type="loss", names_filter="blocks.1.hook_resid_pre", incl_bwd=True, weight_grads=True)
    if isinstance(runner, sl.HookedModel):
        got = dict(runner.model.named_parameters())
        assert all(torch.allclose(got[name].grad, grad, atol=ATOL) for name, grad in expected.items())
        runner.zero_grad(set_to_none=True)
    else:
        assert parameters_with_grad(runner) == len(expected) * runner.coordinator.replicas + int(hf.config.tie_word_embeddings)
        if isinstance(runner.coordinator.workers[0][0], StageWorker):  # the local backend: the stages are here to read
            for worker in runner.coordinator.workers[0]:
                for name, parameter in worker.stage.named_parameters():
                    assert torch.allclose(parameter.grad, expected[hf_path(name, runner.architecture)], atol=ATOL), name
                worker.stage.zero_grad(set_to_none=True)


def scaled_reference(hf, tokens, layer, factor):
    """The logits with decoder layer `layer`'s output scaled, by a plain torch forward hook."""
    handle = hf.model.layers[layer].register_forward_hook(lambda module, args, output: output * factor)
    try:
        with torch.no_grad():
            return hf(tokens).logits
    finally:
        handle.remove()


@pytest.mark.parametrize("hook", ["spec", "op", "function"])
def test_run_with_hooks_takes_specs_ops_and_functions(runner, hf, tokens, hook):
    name, op = "blocks.0.hook_resid_post", sl.ops.Scale(0.5)
    item = {"spec": sl.HookSpec(name, op), "op": (name, op), "function": (name, lambda x, hook: x * 0.5)}[hook]
    if hook == "function" and runs_no_code(runner):
        with pytest.raises(ValueError, match="runs no client code"):
            runner.run_with_hooks(tokens, fwd_hooks=[item])
        assert not runner.has_hooks()
        return
    logits = runner.run_with_hooks(tokens, fwd_hooks=[item])
    assert torch.allclose(logits, scaled_reference(hf, tokens, 0, 0.5), atol=ATOL)
    assert not runner.has_hooks()


def test_levels_nest_unwind_and_list_the_same_way(runner):
    runner.add_hook("blocks.0.hook_resid_post", sl.ops.Scale(1.0))  # level None
    runner.add_perma_hook("hook_embed", sl.ops.Scale(1.0))
    with runner.hooks(fwd_hooks=[("blocks.1.hook_resid_pre", sl.ops.Scale(1.0))]):
        with pytest.raises(RuntimeError, match="inside"):
            with runner.hooks(fwd_hooks=[("blocks.2.hook_resid_pre", sl.ops.Scale(1.0))], bwd_hooks=[sl.HookSpec("blocks.2.hook_resid_pre", sl.ops.CacheGrad())]):
                assert runner.context_level == 2 and runner.has_hooks(level=2) and runner.has_hooks(dir="bwd", level=2)
                raise RuntimeError("inside")
        assert runner.context_level == 1 and not runner.has_hooks(level=2)
        listed = runner.list_hooks()
        assert {name: [(s.op, s.dir, s.level, s.permanent) for s in specs] for name, specs in listed.items()} == {
            "hook_embed": [(sl.ops.Scale(1.0), "fwd", None, True)],
            "blocks.0.hook_resid_post": [(sl.ops.Scale(1.0), "fwd", None, False)],
            "blocks.1.hook_resid_pre": [(sl.ops.Scale(1.0), "fwd", 1, False)],
        }
        assert list(runner.list_hooks(including_permanent=False, name_filter="blocks.*")) == ["blocks.0.hook_resid_post", "blocks.1.hook_resid_pre"]
    runner.reset_hooks()
    assert list(runner.list_hooks()) == ["hook_embed"]
    runner.reset_hooks(including_permanent=True)
    assert not runner.has_hooks() and runner.context_level == 0


def test_reading_specs_fill_the_blocks_store_and_patches_read_sources(runner, hf, tokens):
    store: dict = {}
    with runner.hooks(fwd_hooks=[sl.HookSpec("blocks.1.hook_resid_pre", sl.ops.Cache())], store=store):
        runner(tokens)
    with torch.no_grad():
        hidden = hf(tokens, output_hidden_states=True).hidden_states
    assert torch.allclose(store["blocks.1.hook_resid_pre"], hidden[1], atol=ATOL)
    with pytest.raises(ValueError, match="keeps no results"):
        runner.run_with_hooks(tokens, fwd_hooks=[sl.HookSpec("blocks.1.hook_resid_pre", sl.ops.Cache())])
    scaled = {"blocks.0.hook_resid_post": hidden[1] * 0.5}  # resid_post of layer 0 is layer 1's input
    patch = sl.HookSpec("blocks.0.hook_resid_post", sl.ops.Patch(from_cache="scaled"))
    logits = runner.run_with_hooks(tokens, fwd_hooks=[patch], sources={"scaled": scaled})
    assert torch.allclose(logits, scaled_reference(hf, tokens, 0, 0.5), atol=ATOL)


def test_pos_slice_remove_batch_dim_and_device(runner, hf, tokens):
    with torch.no_grad():
        hidden = hf(tokens[:1], output_hidden_states=True).hidden_states
    _, cache = runner.run_with_cache(tokens[:1], names_filter="blocks.2.hook_resid_pre", pos_slice=(2, 5), remove_batch_dim=True, device="meta")
    assert cache["blocks.2.hook_resid_pre"].device.type == "meta" and cache["blocks.2.hook_resid_pre"].shape == (3, hf.config.hidden_size)
    _, cache = runner.run_with_cache(tokens[:1], names_filter="blocks.2.hook_resid_pre", pos_slice=-1, remove_batch_dim=True)
    assert torch.allclose(cache["blocks.2.hook_resid_pre"], hidden[2][0, -1:], atol=ATOL)
    with pytest.raises(ValueError, match="batch of one"):
        runner.run_with_cache(tokens, names_filter="blocks.2.hook_resid_pre", remove_batch_dim=True)


def test_a_backward_hook_may_return_a_one_tuple(runner, tokens):
    # TransformerLens' own test_backward_hook_runs_successfully returns (grad,)
    seen = {}
    cache_grad = sl.HookSpec("blocks.0.hook_resid_post", sl.ops.CacheGrad())
    _, reference = runner.run_with_cache(tokens, return_type="loss", names_filter=[], incl_bwd=True, bwd_hooks=[cache_grad])
    if runs_no_code(runner):
        with pytest.raises(ValueError, match="runs no client code"):
            runner.run_with_cache(tokens, return_type="loss", names_filter=[], incl_bwd=True, bwd_hooks=[("blocks.0.hook_resid_post", lambda grad, hook: (grad * 2,))])
        assert reference["blocks.0.hook_resid_post_grad"].abs().sum() > 0
        return
    _, cache = runner.run_with_cache(
        tokens, return_type="loss", names_filter=[], incl_bwd=True,
        bwd_hooks=[("blocks.0.hook_resid_post", lambda grad, hook: (grad * 2,)), cache_grad],
    )
    seen["grad"] = cache["blocks.0.hook_resid_post_grad"]
    assert torch.allclose(seen["grad"], reference["blocks.0.hook_resid_post_grad"] * 2, atol=ATOL)


def test_generation_is_transformers_greedy_generation(runner, hf, tokens):
    expected = hf.generate(tokens, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(runner.generate(tokens, max_new_tokens=4, stop_at_eos=False), expected)
    store: dict = {}
    runner.generate(tokens, max_new_tokens=2, stop_at_eos=False, fwd_hooks=[sl.HookSpec("hook_logits", sl.ops.Cache())], store=store)
    assert sorted(store) == ["hook_logits.step0", "hook_logits.step1"]
    assert torch.allclose(store["hook_logits.step0"][:, -1], hf(tokens).logits[:, -1], atol=ATOL)


def test_a_frozen_key_value_prefix_gives_the_whole_forward(runner, hf, tokens):
    with torch.no_grad():
        expected = hf(tokens).logits
    with runner.init_kv_cache(tokens.shape[0]) as cache:
        runner(tokens[:, :4], past_kv_cache=cache)
        cache.freeze()
        logits, acts = runner.run_with_cache(tokens[:, 4:], past_kv_cache=cache, names_filter="hook_logits")
        again = runner(tokens[:, 4:], past_kv_cache=cache)
    assert torch.allclose(logits, expected[:, 4:], atol=ATOL) and torch.allclose(again, expected[:, 4:], atol=ATOL)
    assert torch.allclose(acts["hook_logits"], expected[:, 4:], atol=ATOL)


def test_write_cache_writes_what_run_with_cache_returns(runner, tokens, tmp_path):
    _, cache = runner.run_with_cache(tokens, names_filter="blocks.*.hook_resid_post")
    _, parts = runner.write_cache(tokens, tmp_path, names_filter="blocks.*.hook_resid_post", return_type=None, name="b0")
    assert parts and all(part.startswith(str(tmp_path)) for part in parts)
    back = sl.read_cache(tmp_path)
    assert sorted(back) == sorted(cache)
    for name in cache:
        assert torch.equal(back[name], cache[name])
    assert pq.read_schema(parts[0]).metadata  # the model's metadata in every part


def test_run_variants_run_each_request_with_its_own_specs(runner, hf, tokens):
    requests = [sl.RunRequest(tokens, specs=(sl.HookSpec("blocks.1.hook_resid_post", sl.ops.Scale(f)),)) for f in (0.5, 2.0, 0.0)]
    with torch.no_grad():
        results = runner.run_variants(requests)
    for factor, result in zip((0.5, 2.0, 0.0), results):
        assert torch.allclose(result.output, scaled_reference(hf, tokens, 1, factor), atol=ATOL)
    assert not runner.has_hooks()


def test_bad_input_gets_the_same_clear_error(runner, tokens):
    with pytest.raises(HookNameError, match="blocks.0.hook_resid_post"):
        runner.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_resid_pots", sl.ops.Scale(1.0))])
    with pytest.raises(HookNameError, match="predicate"):
        runner.run_with_hooks(tokens, fwd_hooks=[(lambda name: False, sl.ops.Scale(1.0))])
    with pytest.raises(ValueError, match="return_type must be one of"):
        runner(tokens, return_type="probs")
    with pytest.raises(ValueError, match="needs metric="):
        runner(tokens, return_type="metric")
    with pytest.raises(TypeError, match="integer tensor"):
        runner(tokens.float())
    assert not runner.has_hooks() and runner.context_level == 0


def test_what_a_block_reads_goes_to_its_store_and_nowhere_else(runner, hf, tokens):
    with torch.no_grad():
        hidden = hf(tokens, output_hidden_states=True).hidden_states
    store: dict = {}
    with runner.hooks(fwd_hooks=[sl.HookSpec("blocks.0.hook_resid_pre", sl.ops.Cache())], store=store):
        _, cache = runner.run_with_cache(tokens, names_filter="blocks.2.hook_resid_pre")
    assert list(store) == ["blocks.0.hook_resid_pre"] and sorted(cache) == ["blocks.2.hook_resid_pre"]
    assert torch.allclose(store["blocks.0.hook_resid_pre"], hidden[0], atol=ATOL)
    assert torch.allclose(cache["blocks.2.hook_resid_pre"], hidden[2], atol=ATOL)
    kept: dict = {}
    runner.add_spec(sl.HookSpec("blocks.1.hook_resid_pre", sl.ops.Cache(), permanent=True), store=kept)
    runner(tokens)
    runner.reset_hooks()  # a permanent spec, and its store, stay
    runner(tokens[:1])
    assert torch.allclose(kept["blocks.1.hook_resid_pre"], hidden[1][:1], atol=ATOL)
    runner.reset_hooks(including_permanent=True)
    with pytest.raises(ValueError, match="keeps no results"):
        with runner.hooks(fwd_hooks=[sl.HookSpec("blocks.1.hook_resid_pre", sl.ops.Cache())]):
            runner(tokens)


def test_sources_and_a_store_together(runner, hf, tokens):
    with torch.no_grad():
        hidden = hf(tokens, output_hidden_states=True).hidden_states
    scaled = {"blocks.0.hook_resid_post": hidden[1] * 0.5}
    specs = [sl.HookSpec("blocks.0.hook_resid_post", sl.ops.Patch(from_cache="scaled")), sl.HookSpec("blocks.1.hook_resid_post", sl.ops.Cache())]
    store: dict = {}
    logits = runner.run_with_hooks(tokens, fwd_hooks=specs, sources={"scaled": scaled}, store=store)
    assert torch.allclose(logits, scaled_reference(hf, tokens, 0, 0.5), atol=ATOL)
    with runner.hooks(fwd_hooks=specs[:1], sources={"scaled": scaled}):
        _, cache = runner.run_with_cache(tokens, names_filter="blocks.1.hook_resid_post", fwd_hooks=specs[1:])
    assert torch.allclose(cache["blocks.1.hook_resid_post"], store["blocks.1.hook_resid_post"], atol=ATOL)


def test_a_requests_gradient_spec_makes_it_backpropagate(runner, hf, tokens):
    out = hf(tokens, labels=tokens, output_hidden_states=True)
    out.hidden_states[2].retain_grad()
    out.loss.backward()
    hf.zero_grad()
    result = runner.run(sl.RunRequest(tokens, return_type="loss", specs=(sl.HookSpec("blocks.2.hook_resid_pre", sl.ops.CacheGrad()),)))
    assert torch.allclose(result.cache["blocks.2.hook_resid_pre_grad"], out.hidden_states[2].grad, atol=ATOL)


def test_a_runs_own_specs_leave_the_users_levels_alone(runner, hf, tokens):
    runner.add_hook("blocks.1.hook_resid_post", sl.ops.Scale(2.0), level=1)
    try:
        runner.run(sl.RunRequest(tokens, specs=(sl.HookSpec("hook_embed", sl.ops.Scale(1.0)),)))
        assert [s.level for s in runner.list_hooks()["blocks.1.hook_resid_post"]] == [1]
        assert torch.allclose(runner(tokens), scaled_reference(hf, tokens, 1, 2.0), atol=ATOL)
    finally:
        runner.reset_hooks()


def test_a_failed_variant_leaves_nothing_behind(runner, hf, tokens):
    good = sl.RunRequest(tokens, specs=(sl.HookSpec("blocks.1.hook_resid_post", sl.ops.Scale(0.0)),))
    bad = sl.RunRequest(tokens, specs=(sl.HookSpec("blocks.1.hook_resid_post", sl.ops.Patch(from_cache="missing")),))  # fails as it runs
    with pytest.raises(Exception, match="missing"):
        runner.run_variants([bad, good])  # the good one, in flight on another replica, is undone too
    with torch.no_grad():
        assert torch.allclose(runner(tokens), hf(tokens).logits, atol=ATOL)
    assert not runner.has_hooks()


def test_list_hooks_gives_each_point_its_own_spec(runner):
    with runner.hooks(fwd_hooks=[sl.HookSpec("blocks.*.hook_resid_post", sl.ops.Scale(1.0), prepend=True)]):
        listed = runner.list_hooks()
    assert listed == {
        f"blocks.{layer}.hook_resid_post": [sl.HookSpec(f"blocks.{layer}.hook_resid_post", sl.ops.Scale(1.0), level=1, prepend=True)]
        for layer in range(3)
    }


def test_a_run_resumed_inside_a_base_run_is_the_whole_forward(runner, hf, tokens):
    mask = torch.ones_like(tokens)
    mask[0, :2] = 0  # left padding
    layers = hf.config.num_hidden_layers
    with runner.base_run(tokens, attention_mask=mask) as base:
        with torch.no_grad():
            assert torch.allclose(base.logits, hf(tokens, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits, atol=ATOL)
        for layer, position in [(0, 0), (1, 3), (2, 6)]:
            # one copy unchanged, one with layer 2's output scaled from `position` on
            specs = (sl.HookSpec("blocks.2.hook_resid_post", sl.ops.Scale(0.5, batch=[2, 3])),)
            request = sl.RunRequest(tokens.repeat(2, 1), attention_mask=mask.repeat(2, 1), specs=specs, resume=sl.hooks.Resume(base, layer, position, repeat=2))
            logits = runner.run(request).output
            assert logits.shape == (4, tokens.shape[1] - position, hf.config.vocab_size)
            real = mask[:, position:].bool()
            assert torch.allclose(logits[:2][real], base.logits[:, position:][real], atol=ATOL)
            with torch.no_grad():
                scaled = hf_scaled(hf, tokens, mask, layers - 1, 0.5)
            assert torch.allclose(logits[2:][real], scaled[:, position:][real], atol=ATOL)
    assert not runner.has_hooks()


def hf_scaled(hf, tokens, mask, layer, factor):
    handle = hf.model.layers[layer].register_forward_hook(lambda module, args, output: output * factor)
    try:
        return hf(tokens, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    finally:
        handle.remove()


def test_bad_resumes_are_refused(runner, tokens):
    with runner.base_run(tokens) as base:
        with pytest.raises(ValueError, match="layer 7"):
            runner.run(sl.RunRequest(tokens, resume=sl.hooks.Resume(base, 7)))
        with pytest.raises(ValueError, match=r"takes a batch of \(4, 7\)"):
            runner.run(sl.RunRequest(tokens, resume=sl.hooks.Resume(base, 1, repeat=2)))
        with pytest.raises(TypeError, match="Resume.base must be a BaseRun"):
            sl.hooks.Resume(torch.zeros(2, 7, 32), 1)
        with pytest.raises(ValueError, match="base run's attention mask"):
            runner.run(sl.RunRequest(tokens, attention_mask=torch.ones_like(tokens).index_fill(1, torch.tensor([0]), 0), resume=sl.hooks.Resume(base, 1)))
        with pytest.raises(ValueError, match="next-token loss reads position 0, before Resume.position 3"):
            runner.run(sl.RunRequest(tokens, return_type="loss", resume=sl.hooks.Resume(base, 1, position=3)))
        with pytest.raises(ValueError, match="metric reads position 6, before Resume.position 7|position must be 0..6"):
            sl.hooks.Resume(base, 1, position=7)
        other = sl.hooks.BaseRun(tokens, None, torch.zeros(2, 7, 5))
        with pytest.raises(TypeError, match="base run of this"):
            runner.run(sl.RunRequest(tokens, resume=sl.hooks.Resume(other, 1)))
