"""What only a Tracer does, on both backends, against the one-process HookedModel: stages,
replicas, microbatches, workers writing datasets, restarts, sessions on the stages. The hook
API every runner shares is tested once for all of them in test_hook_api.py."""

import json
import os
import threading
import time

import pyarrow.parquet as pq
import pytest
import torch

import shardlens as sl
from shardlens.cluster.worker import StageWorker
from shardlens.errors import RemoteHookError
from shardlens.hooks import HookNameError
from shardlens.tables import parquet as parquet_module
from shardlens.tracer import Tracer

Spec, ops = sl.HookSpec, sl.ops
RESID_POST = "blocks.*.hook_resid_post"


@pytest.fixture
def tokens():
    return torch.randint(3, 97, (4, 9), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def reference(tiny_checkpoints):
    models = {name: sl.HookedModel.from_pretrained(tiny_checkpoints[name]) for name in ("llama_gqa", "gpt2")}
    return models


def expected(reference, name, tokens, **kwargs):
    return reference[name].run_with_cache(tokens, return_type="loss", names_filter=RESID_POST, incl_bwd=True, **kwargs)


def assert_matches(cache, expected_cache, atol=1e-5):
    assert sorted(cache) == sorted(expected_cache)
    for key in expected_cache:
        assert torch.allclose(cache[key], expected_cache[key], atol=atol), key


@pytest.mark.parametrize("name", ["llama_gqa", "gpt2"])
@pytest.mark.parametrize("stages, replicas, microbatch", [(1, 1, None), (2, 1, 2), (3, 1, 1), (2, 2, None)])
def test_local_backend_equals_one_process(tiny_checkpoints, reference, tokens, name, stages, replicas, microbatch):
    loss_ref, cache_ref = expected(reference, name, tokens)
    with Tracer.from_pretrained(tiny_checkpoints[name], stages=stages, replicas=replicas, backend="local", microbatch_size=microbatch) as tracer:
        loss, cache = tracer.run_with_cache(tokens, return_type="loss", names_filter=RESID_POST, incl_bwd=True)
        assert torch.allclose(loss, loss_ref, atol=1e-6)
        assert_matches(cache, cache_ref)
        logits = tracer(tokens)
    assert torch.allclose(logits, reference[name](tokens), atol=1e-5)


@pytest.mark.parametrize("stages, replicas", [(1, 1), (2, 1), (3, 1), (1, 2)])
def test_ray_backend_equals_one_process(ray_session, tiny_checkpoints, reference, tokens, stages, replicas):
    loss_ref, cache_ref = expected(reference, "llama_gqa", tokens)
    with Tracer.from_pretrained(tiny_checkpoints["llama_gqa"], stages=stages, replicas=replicas, backend="ray") as tracer:
        loss, cache = tracer.run_with_cache(tokens, return_type="loss", names_filter=RESID_POST, incl_bwd=True)
    assert torch.allclose(loss, loss_ref, atol=1e-6)
    assert_matches(cache, cache_ref)


def test_forward_only_results_leave_each_stage_microbatch_by_microbatch(tiny_checkpoints, reference, tokens, monkeypatch):
    held = []  # how many microbatches' results a stage holds when the next forward starts
    forward = StageWorker.forward

    def counting(self, batch_id, *args, **kwargs):
        held.append(len(self._contexts))
        return forward(self, batch_id, *args, **kwargs)

    monkeypatch.setattr(StageWorker, "forward", counting)
    logits_ref, cache_ref = reference["gpt2"].run_with_cache(tokens, names_filter=RESID_POST)
    with Tracer.from_pretrained(tiny_checkpoints["gpt2"], stages=2, backend="local", microbatch_size=1) as tracer:
        logits, cache = tracer.run_with_cache(tokens, names_filter=RESID_POST)
    assert torch.allclose(logits, logits_ref, atol=1e-5)
    assert_matches(cache, cache_ref)
    assert held == [0] * 8  # 4 microbatches x 2 stages, each taken before the next forward


def test_logits_come_back_only_when_asked_for(tiny_checkpoints, reference, tokens, monkeypatch):
    sent = []  # whether each last-stage forward sent logits to the driver
    forward = StageWorker.forward

    def recording(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        if self.index == 1:
            sent.append(out.logits is not None)
        return out

    monkeypatch.setattr(StageWorker, "forward", recording)
    loss_ref, cache_ref = expected(reference, "gpt2", tokens)
    with Tracer.from_pretrained(tiny_checkpoints["gpt2"], stages=2, backend="local", microbatch_size=2) as tracer:
        loss, cache = tracer.run_with_cache(tokens, return_type="loss", names_filter=RESID_POST, incl_bwd=True)
        assert sent == [False, False]
        assert torch.allclose(loss, loss_ref, atol=1e-6)
        assert_matches(cache, cache_ref)
        logits, loss = tracer(tokens, return_type="both")
        assert sent[2:] == [True, True] and torch.allclose(logits, reference["gpt2"](tokens), atol=1e-5)


def test_padding_and_patching_across_stages(tiny_checkpoints, reference):
    tokens = torch.randint(3, 97, (3, 8), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(3, 8, dtype=torch.long)
    mask[1, :4] = 0
    model = reference["gpt2"]
    clean_logits, clean = model.run_with_cache(tokens, attention_mask=mask, names_filter="blocks.1.hook_resid_pre")
    corrupt = tokens.flip(0)
    with Tracer.from_pretrained(tiny_checkpoints["gpt2"], stages=3, backend="local", microbatch_size=2) as tracer:
        logits = tracer.run_with_hooks(
            corrupt, attention_mask=mask, sources={"clean": clean},
            fwd_hooks=[Spec("blocks.1.hook_resid_pre", ops.Patch(from_cache="clean"))],
        )
    expected_logits = model.run_with_hooks(corrupt, attention_mask=mask, sources={"clean": clean},
                                           fwd_hooks=[Spec("blocks.1.hook_resid_pre", ops.Patch(from_cache="clean"))])
    real = mask.bool()
    assert torch.allclose(logits[real], expected_logits[real], atol=1e-5)


@pytest.mark.parametrize("backend, layout", [("local", "token"), ("ray", "example")])
def test_workers_write_the_cache_straight_into_a_dataset(request, tiny_checkpoints, reference, tmp_path, backend, layout):
    if backend == "ray":
        request.getfixturevalue("ray_session")
    tokens = torch.randint(3, 97, (4, 9), generator=torch.Generator().manual_seed(5))
    mask = torch.ones(4, 9, dtype=torch.long)
    mask[1, :3] = 0
    mask[2, :7] = 0
    loss_ref, cache_ref = expected(reference, "llama_gqa", tokens, attention_mask=mask)
    with Tracer.from_pretrained(tiny_checkpoints["llama_gqa"], stages=2, backend=backend, microbatch_size=2) as tracer:
        loss, parts = tracer.write_cache(
            tokens, tmp_path / "acts", names_filter=RESID_POST, layout=layout, incl_bwd=True, return_type="loss",
            attention_mask=mask, examples=torch.arange(4) + 10, batch=3, metadata={"run": "t"},
        )
    assert torch.allclose(loss, loss_ref, atol=1e-6)
    hook_points = [name for name in cache_ref if not name.endswith("_grad")]
    assert len(parts) == len(hook_points) * 2  # one part per hook point per microbatch
    assert sorted(parts) == sorted(str(p) for p in (tmp_path / "acts").rglob("*.parquet"))
    cache = sl.read_cache(tmp_path / "acts")
    assert cache.examples.tolist() == [10, 11, 12, 13] and sorted(cache) == sorted(cache_ref)
    real = mask.bool()
    for name, value in cache_ref.items():
        assert torch.allclose(cache[name][real], value[real], atol=1e-5), name
    fields = json.loads(pq.read_schema(parts[0]).metadata[b"shardlens"])
    assert fields["model"] == str(tiny_checkpoints["llama_gqa"]) and fields["run"] == "t" and fields["hooks"] == hook_points
    batches = pq.read_table(parts[0]).column("batch").to_pylist()
    assert set(batches) == {3}


def test_a_bf16_cache_written_by_the_workers_reads_back_bit_for_bit(tiny_checkpoints, tokens, tmp_path):
    with Tracer.from_pretrained(tiny_checkpoints["gpt2"], stages=2, backend="local", dtype=torch.bfloat16, microbatch_size=3) as tracer:
        logits, cache = tracer.run_with_cache(tokens, names_filter=RESID_POST)
        written_logits, _ = tracer.write_cache(tokens, tmp_path, names_filter=RESID_POST, layout="token")
    back = sl.read_cache(tmp_path)
    assert torch.equal(written_logits, logits) and sorted(back) == sorted(cache)
    for name, value in cache.items():
        assert back[name].dtype == torch.bfloat16 and torch.equal(back[name], value), name


def test_a_failed_run_leaves_no_part_the_workers_wrote(tiny_checkpoints, tokens, tmp_path):
    bad = Spec("blocks.2.attn.hook_pattern", ops.Patch(torch.ones(5)))  # fails on stage 1, after stage 0 wrote
    with Tracer.from_pretrained(tiny_checkpoints["llama_gqa"], stages=2, backend="local", microbatch_size=1) as tracer:
        with pytest.raises(RemoteHookError):
            tracer.write_cache(tokens, tmp_path, names_filter=RESID_POST, fwd_hooks=[bad])
        assert [p for p in tmp_path.rglob("*") if p.is_file()] == []
        with pytest.raises(ValueError, match="one index per example of the batch \\(4\\)"):
            tracer.write_cache(tokens, tmp_path, names_filter=RESID_POST, examples=[1, 2])
        with pytest.raises(ValueError, match="layout must be 'example' or 'token'; got 'rows'"):
            tracer.write_cache(tokens, tmp_path, layout="rows")


def test_a_stage_runs_its_next_microbatch_while_it_writes_the_last(tiny_checkpoints, tokens, tmp_path, monkeypatch):
    # Every part waits until stage 0 starts microbatch 1: with writes that held the stage
    # until its parts were on disk, the run could not go on.
    second_started, real_write, real_forward = threading.Event(), pq.write_table, StageWorker.forward

    def forward(self, batch_id, *args, **kwargs):
        if self.index == 0 and batch_id.endswith(".1"):
            second_started.set()
        return real_forward(self, batch_id, *args, **kwargs)

    def write_table(*args, **kwargs):
        assert second_started.wait(timeout=30), "the stage waited for its writes before going on"
        real_write(*args, **kwargs)

    monkeypatch.setattr(StageWorker, "forward", forward)
    monkeypatch.setattr(parquet_module.pq, "write_table", write_table)
    with Tracer.from_pretrained(tiny_checkpoints["gpt2"], stages=2, backend="local", microbatch_size=2) as tracer:
        _, cache = tracer.run_with_cache(tokens, names_filter=RESID_POST)
        _, parts = tracer.write_cache(tokens, tmp_path, names_filter=RESID_POST)
    assert sorted(parts) == sorted(str(p) for p in tmp_path.rglob("*.parquet"))
    back = sl.read_cache(tmp_path)
    assert sorted(back) == sorted(cache) and all(torch.equal(back[name], cache[name]) for name in cache)


def test_a_part_that_fails_in_the_background_fails_the_run_and_leaves_no_part(tiny_checkpoints, tokens, tmp_path, monkeypatch):
    real_write, calls = pq.write_table, []

    def second_part_fails(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 2:
            raise OSError("disk full")
        real_write(*args, **kwargs)

    with Tracer.from_pretrained(tiny_checkpoints["gpt2"], stages=2, backend="local", microbatch_size=2) as tracer:
        monkeypatch.setattr(parquet_module.pq, "write_table", second_part_fails)
        with pytest.raises(sl.ParquetWriteError, match="disk full"):
            tracer.write_cache(tokens, tmp_path, names_filter=RESID_POST)
        assert len(calls) > 2 and [p for p in tmp_path.rglob("*") if p.is_file()] == []
        monkeypatch.setattr(parquet_module.pq, "write_table", real_write)
        _, parts = tracer.write_cache(tokens, tmp_path, names_filter=RESID_POST)  # the workers' sinks were closed
    assert sorted(parts) == sorted(str(p) for p in tmp_path.rglob("*") if p.is_file())


def test_a_batch_written_again_under_its_name_replaces_its_parts(tiny_checkpoints, tokens, tmp_path):
    with Tracer.from_pretrained(tiny_checkpoints["gpt2"], stages=2, backend="local", microbatch_size=2) as tracer:
        _, cache = tracer.run_with_cache(tokens, names_filter=RESID_POST)
        _, first = tracer.write_cache(tokens, tmp_path, names_filter=RESID_POST, name="part-b00007", return_type=None)
        _, again = tracer.write_cache(tokens, tmp_path, names_filter=RESID_POST, name="part-b00007", return_type=None)
        with pytest.raises(ValueError, match="must be a file name that does not start with"):
            tracer.write_cache(tokens, tmp_path, names_filter=RESID_POST, name="_b7")
    assert sorted(first) == sorted(again) == sorted(str(p) for p in tmp_path.rglob("*") if p.is_file())
    assert sorted({os.path.basename(p) for p in first}) == ["part-b00007-00000.parquet", "part-b00007-00002.parquet"]
    back = sl.read_cache(tmp_path)
    assert sorted(back) == sorted(cache) and all(torch.equal(back[name], cache[name]) for name in cache)


def test_a_path_some_worker_does_not_see_is_refused_before_any_work(tiny_checkpoints, tokens, tmp_path, monkeypatch):
    real_sees, forwards = StageWorker.sees, []
    monkeypatch.setattr(StageWorker, "sees", lambda self, path: real_sees(self, path) and self.index == 0)  # stage 1 elsewhere
    monkeypatch.setattr(StageWorker, "forward", lambda self, *a, **k: forwards.append(a))
    with Tracer.from_pretrained(tiny_checkpoints["gpt2"], stages=2, backend="local") as tracer:
        assert not tracer.shares(tmp_path) and tracer.shares("s3://bucket/acts")
        with pytest.raises(ValueError, match=r"not every worker sees .* a path every machine shares"):
            tracer.write_cache(tokens, tmp_path, names_filter=RESID_POST)
    assert forwards == [] and [p for p in tmp_path.rglob("*")] == []  # the probe is gone too


def test_workers_on_this_machine_share_its_folders(tiny_checkpoints, tmp_path):
    with Tracer.from_pretrained(tiny_checkpoints["gpt2"], stages=2, backend="local") as tracer:
        assert tracer.shares(tmp_path / "new")
    assert list((tmp_path / "new").iterdir()) == []


def worker_hooks(tracer):
    """How many specs each worker holds, by hook point."""
    backend = tracer.coordinator.backend
    listed = [backend.get(backend.call(w, "list_hooks")) for row in tracer.coordinator.workers for w in row]
    return [{name: len(specs) for name, specs in hooks.items()} for hooks in listed]


def test_levels_nest_and_unwind_on_error(tiny_checkpoints, tokens):
    with Tracer.from_pretrained(tiny_checkpoints["llama_gqa"], stages=2, backend="local") as tracer:
        with tracer.hooks(fwd_hooks=[Spec("blocks.0.hook_resid_post", ops.Scale(1.0))]):
            with pytest.raises(RuntimeError, match="inside"):
                with tracer.hooks(fwd_hooks=[Spec(RESID_POST, ops.Scale(1.0))]):
                    assert worker_hooks(tracer) == [{"blocks.0.hook_resid_post": 2, "blocks.1.hook_resid_post": 1}, {"blocks.2.hook_resid_post": 1}]
                    raise RuntimeError("inside")
            assert worker_hooks(tracer) == [{"blocks.0.hook_resid_post": 1}, {}]
            assert tracer.context_level == 1
        assert worker_hooks(tracer) == [{}, {}]


def test_a_spec_goes_only_to_the_stage_that_has_its_points(tiny_checkpoints):
    with Tracer.from_pretrained(tiny_checkpoints["llama_gqa"], stages=2, backend="local") as tracer:
        with tracer.hooks(fwd_hooks=[Spec("blocks.2.attn.hook_z", ops.Ablate())]):
            assert worker_hooks(tracer) == [{}, {"blocks.2.attn.hook_z": 1}]
            entry = tracer.coordinator.stack.entries[-1]
            assert entry.per_stage[0] == () and len(entry.per_stage[1]) == 1


def test_permanent_specs_survive_reset(tiny_checkpoints, tokens, reference):
    with Tracer.from_pretrained(tiny_checkpoints["llama_gqa"], stages=2, backend="local") as tracer:
        tracer.add_spec(Spec("blocks.2.hook_resid_post", ops.Scale(0.0), permanent=True))
        tracer.add_hook("blocks.0.hook_resid_post", ops.Scale(2.0))
        tracer.reset_hooks()
        assert list(tracer.list_hooks()) == ["blocks.2.hook_resid_post"]
        logits = tracer(tokens)
        zeroed = reference["llama_gqa"].run_with_hooks(tokens, fwd_hooks=[Spec("blocks.2.hook_resid_post", ops.Scale(0.0))])
        assert torch.allclose(logits, zeroed, atol=1e-5)
        tracer.reset_hooks(including_permanent=True)
        assert not tracer.has_hooks() and worker_hooks(tracer) == [{}, {}]


def test_unknown_names_fail_before_any_work(tiny_checkpoints, tokens):
    with Tracer.from_pretrained(tiny_checkpoints["llama_gqa"], stages=2, backend="local") as tracer:
        with pytest.raises(HookNameError, match="blocks.1.hook_resid_post"):
            tracer.run_with_cache(tokens, names_filter=["blocks.1.hook_resid_pots"])
        with pytest.raises(HookNameError):
            with tracer.hooks(fwd_hooks=[Spec("hook_embed", ops.Scale(1.0)), Spec("blocks.9.hook_z", ops.Ablate())]):
                pass
        assert worker_hooks(tracer) == [{}, {}] and not tracer.has_hooks()


def test_functions_as_hooks_need_allow_code(tiny_checkpoints, tokens, reference):
    with Tracer.from_pretrained(tiny_checkpoints["llama_gqa"], stages=2, backend="local") as tracer:
        with pytest.raises(ValueError, match="allow_code"):
            tracer.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_resid_post", lambda x, hook: x * 0)])
    with Tracer.from_pretrained(tiny_checkpoints["llama_gqa"], stages=2, backend="local", allow_code=True) as tracer:
        logits = tracer.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_resid_post", lambda x, hook: x * 0)])
    expected_logits = reference["llama_gqa"].run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_resid_post", lambda x, hook: x * 0)])
    assert torch.allclose(logits, expected_logits, atol=1e-5)


@pytest.mark.parametrize("backend", ["local", "ray"])
def test_remote_hook_error_names_where_and_unwinds(request, tiny_checkpoints, tokens, backend):
    if backend == "ray":
        request.getfixturevalue("ray_session")
    bad = Spec("blocks.2.attn.hook_pattern", ops.Patch(torch.ones(5)))
    with Tracer.from_pretrained(tiny_checkpoints["llama_gqa"], stages=2, replicas=1, backend=backend) as tracer:
        with pytest.raises(RemoteHookError) as info:
            tracer.run_with_hooks(tokens, fwd_hooks=[bad])
        assert (info.value.hook, info.value.stage, info.value.replica) == ("blocks.2.attn.hook_pattern", 1, 0)
        assert info.value.batch.endswith(".0")
        assert worker_hooks(tracer) == [{}, {}]
        tracer(tokens)  # and the tracer still works


def our_worker_pids(tracer):
    return {s["pid"] for s in tracer.stats()}


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_worker_killed_between_runs_is_restarted_and_gets_its_specs_back(ray_session, tiny_checkpoints, tokens, reference):
    model = reference["llama_gqa"]
    patch = [Spec("blocks.1.hook_resid_post", ops.Scale(0.5))]
    expected_logits = model.run_with_hooks(tokens, fwd_hooks=patch)
    with Tracer.from_pretrained(tiny_checkpoints["llama_gqa"], stages=2, backend="ray") as tracer:
        with tracer.hooks(fwd_hooks=patch):
            first = tracer(tokens)
            ray_session.kill(tracer.coordinator.workers[0][0], no_restart=False)
            second = tracer(tokens)
    assert torch.allclose(first, expected_logits, atol=1e-5)
    assert torch.allclose(second, expected_logits, atol=1e-5)


def test_worker_killed_during_a_run_is_retried(ray_session, tiny_checkpoints, tokens, reference, tmp_path):
    marker = str(tmp_path / "killed-once")

    def die_once(x, hook):
        if not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(1)  # the worker process dies in the middle of the forward pass

    expected_loss, expected_cache = expected(reference, "llama_gqa", tokens)
    with Tracer.from_pretrained(tiny_checkpoints["llama_gqa"], stages=2, backend="ray", allow_code=True) as tracer:
        with tracer.hooks(fwd_hooks=[("blocks.2.hook_resid_pre", die_once)]):
            loss, cache = tracer.run_with_cache(tokens, return_type="loss", names_filter=RESID_POST, incl_bwd=True)
    assert os.path.exists(marker)
    assert torch.allclose(loss, expected_loss, atol=1e-6)
    assert_matches(cache, expected_cache)


def test_shutdown_leaves_no_worker_processes(ray_session, tiny_checkpoints):
    tracer = Tracer.from_pretrained(tiny_checkpoints["llama_gqa"], stages=2, backend="ray")
    pids = our_worker_pids(tracer)
    assert len(pids) == 2
    tracer.shutdown()
    deadline = time.monotonic() + 30
    while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(pid_alive(p) for p in pids)


def test_bad_tracer_arguments_are_refused(tiny_checkpoints):
    with pytest.raises(ValueError, match="replicas must be a positive int"):
        Tracer.from_pretrained(tiny_checkpoints["llama_gqa"], replicas=0, backend="local")
    with pytest.raises(ValueError, match="backend must be 'ray' or 'local'"):
        Tracer.from_pretrained(tiny_checkpoints["llama_gqa"], backend="slurm")
    with pytest.raises(ValueError, match="takes no address"):
        Tracer.from_pretrained(tiny_checkpoints["llama_gqa"], backend="local", address="127.0.0.1:6379")


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa"])
@pytest.mark.parametrize("use_kv_cache", [True, False])
def test_greedy_generation_across_stages_equals_transformers(tiny_checkpoints, name, use_kv_cache):
    from tests.tiny_models import load_reference

    tokens = torch.randint(3, 97, (3, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(tokens)
    mask[0, :2] = 0
    with torch.no_grad():
        expected = load_reference(tiny_checkpoints[name]).generate(tokens, attention_mask=mask, max_new_tokens=8, do_sample=False)
    with Tracer.from_pretrained(tiny_checkpoints[name], stages=2, backend="local") as tracer:
        got = tracer.generate(tokens, attention_mask=mask, max_new_tokens=8, use_kv_cache=use_kv_cache)
        assert worker_hooks(tracer) == [{}, {}]
    assert torch.equal(got, expected)


def test_steering_and_reading_while_generating_across_stages(tiny_checkpoints, reference, tokens):
    vector = torch.randn(32, generator=torch.Generator().manual_seed(1)) * 3
    steer = Spec("blocks.1.hook_resid_post", ops.Add(vector))
    read = Spec("hook_logits", ops.Cache())
    expected = reference["llama_gqa"].generate(tokens, max_new_tokens=4, fwd_hooks=[steer])
    store = {}
    with Tracer.from_pretrained(tiny_checkpoints["llama_gqa"], stages=2, backend="local") as tracer:
        got = tracer.generate(tokens, max_new_tokens=4, fwd_hooks=[steer, read], store=store, stop_at_eos=False)
    assert torch.equal(got, expected)
    assert sorted(store) == [f"hook_logits.step{k}" for k in range(4)] and store["hook_logits.step3"].shape[1] == 1


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa"])
def test_a_frozen_prefix_on_the_stages_gives_the_full_forward(tiny_checkpoints, reference, tokens, name):
    model = reference[name]
    full_logits, full = model.run_with_cache(tokens, names_filter=RESID_POST)
    with Tracer.from_pretrained(tiny_checkpoints[name], stages=2, backend="local") as tracer:
        with tracer.init_kv_cache(batch_size=4) as cache:
            tracer(tokens[:, :5], past_kv_cache=cache)
            cache.freeze()
            for _ in range(2):  # a frozen cache is not extended: the second run sees the same prefix
                logits, acts = tracer.run_with_cache(tokens[:, 5:], past_kv_cache=cache, names_filter=RESID_POST)
                assert torch.allclose(logits, full_logits[:, 5:], atol=1e-5)
                for key in full:
                    assert torch.allclose(acts[key], full[key][:, 5:], atol=1e-5), key
            assert cache.seq_len == 5
            entries = cache.entries
            n_kv = getattr(model.config, "num_key_value_heads", model.config.num_attention_heads)
            assert len(entries) == model.config.num_hidden_layers and entries[-1].past_keys.shape[:3] == (4, 5, n_kv)
            forwards = sum(s["forwards"] for s in tracer.stats())
        with pytest.raises(Exception, match="holds no key/value session"):
            cache.entries  # closed: the stages forgot it
    assert forwards == 2 * 3  # the prefix and two suffix runs, on each of the 2 stages


def test_a_kv_cache_on_the_stages_grows_with_padding_and_repeats(tiny_checkpoints, reference, tokens):
    from shardlens.hooks.model import next_token_loss

    mask = torch.ones_like(tokens)
    mask[1, :3] = 0
    full = reference["llama_gqa"](tokens, attention_mask=mask)
    with Tracer.from_pretrained(tiny_checkpoints["llama_gqa"], stages=3, backend="local", allow_code=True) as tracer:
        cache = tracer.init_kv_cache(batch_size=4)
        tracer(tokens[:, :4], attention_mask=mask[:, :4], past_kv_cache=cache)
        with pytest.raises(RemoteHookError):  # a failed run leaves the cache as it was
            tracer.run_with_hooks(tokens[:, 4:7], past_kv_cache=cache, fwd_hooks=[("blocks.1.hook_resid_post", lambda x, hook: 1 / 0)])
        logits = tracer(tokens[:, 4:7], past_kv_cache=cache)  # the cache grows: 4 + 3 tokens
        real = mask[:, 4:7].bool()
        assert cache.seq_len == 7 and torch.allclose(logits[real], full[:, 4:7][real], atol=1e-5)
        cache.freeze()
        twice = tracer(tokens[:, 7:].repeat(2, 1), past_kv_cache=cache.repeat(2))
        assert torch.allclose(twice, full[:, 7:].repeat(2, 1, 1), atol=1e-5)
        loss = tracer(tokens[:, 7:], past_kv_cache=cache, return_type="loss")
        assert torch.allclose(loss, next_token_loss(full[:, 7:], tokens[:, 7:], None), atol=1e-5)
        with pytest.raises(ValueError, match="use cache.repeat"):
            tracer(tokens[:2, 7:], past_kv_cache=cache)
        with pytest.raises(TypeError, match="cache of this Tracer"):
            tracer(tokens[:, 7:], past_kv_cache=sl.KeyValueCache.init_cache(reference["llama_gqa"].config, batch_size=4))


def test_a_kv_cache_lost_with_its_worker_fails_clearly(tiny_checkpoints, tokens):
    with Tracer.from_pretrained(tiny_checkpoints["gpt2"], stages=2, backend="local") as tracer:
        cache = tracer.init_kv_cache(batch_size=4)
        tracer(tokens[:, :5], past_kv_cache=cache)
        tracer.coordinator.end_session(cache.session)  # what a restarted worker has: no session
        with pytest.raises(sl.WorkerError, match="holds 0 tokens.*build the cache again"):
            tracer(tokens[:, 5:], past_kv_cache=cache)


def test_a_frozen_prefix_on_ray_stages(ray_session, tiny_checkpoints, reference, tokens):
    full = reference["llama_gqa"](tokens)
    with Tracer.from_pretrained(tiny_checkpoints["llama_gqa"], stages=2, backend="ray") as tracer:
        cache = tracer.init_kv_cache(batch_size=4)
        tracer(tokens[:, :6], past_kv_cache=cache)
        cache.freeze()
        logits = tracer(tokens[:, 6:].repeat(3, 1), past_kv_cache=cache.repeat(3))
        assert cache.entries[0].past_keys.shape[:2] == (4, 6)
        cache.close()
    assert torch.allclose(logits, full[:, 6:].repeat(3, 1, 1), atol=1e-5)


def test_resources_no_node_offers_are_refused_before_any_worker_starts(ray_session, tiny_checkpoints):
    with pytest.raises(sl.WorkerError, match=r"stage 1, replica 0 needs \{'node_z': 1\}, which the cluster does not offer"):
        Tracer.from_pretrained(tiny_checkpoints["gpt2"], stages=2, backend="ray", stage_resources=[{}, {"node_z": 1}])
    with Tracer.from_pretrained(tiny_checkpoints["gpt2"], stages=2, backend="local") as tracer:
        assert tracer.placement() == [{"replica": 0, "stage": 0, "node": "local"}, {"replica": 0, "stage": 1, "node": "local"}]


def test_an_architecture_registered_here_reaches_the_ray_workers(ray_session, tiny_checkpoints, tokens, monkeypatch):
    from shardlens.hooks.architectures import ARCHITECTURES
    from tests.sharding.architectures import doubled_logits_architecture
    from tests.tiny_models import load_reference

    monkeypatch.setitem(ARCHITECTURES, "llama", doubled_logits_architecture)  # as register_architecture, undone after the test
    with torch.no_grad():
        expected = load_reference(tiny_checkpoints["llama_gqa"])(tokens).logits * 2
    with Tracer.from_pretrained(tiny_checkpoints["llama_gqa"], stages=2, backend="ray") as tracer:
        assert tracer.plan.architecture == "tests.sharding.architectures:doubled_logits_architecture"
        assert torch.allclose(tracer(tokens), expected, atol=1e-5)


@pytest.mark.parametrize("backend, replicas", [("local", 1), ("local", 2), ("ray", 1)])
def test_loading_reports_a_step_as_each_stage_is_built(request, tiny_checkpoints, backend, replicas, monkeypatch):
    import io

    if backend == "ray":
        request.getfixturevalue("ray_session")
    stream = io.StringIO()
    steps_before = []  # local backend: the progress events written when each worker starts building
    real_init = StageWorker.__init__

    def counting_init(self, *args, **kwargs):
        steps_before.append(stream.getvalue().count('"event": "progress"'))
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(StageWorker, "__init__", counting_init)
    with sl.progress.using("json", stream=stream, interval=0):
        with Tracer.from_pretrained(tiny_checkpoints["gpt2"], stages=2, replicas=replicas, backend=backend):
            pass
    events = [json.loads(line) for line in stream.getvalue().splitlines()]
    desc = "loading 2 stages" + (f" x {replicas} replicas" if replicas > 1 else "")
    assert [(e["event"], e["task"], e["desc"], e["done"], e["total"], e["unit"]) for e in events] == [
        ("start", "load", desc, 0, 2 * replicas, "stage"),
        *[("progress", "load", desc, i, 2 * replicas, "stage") for i in range(1, 2 * replicas + 1)],
        ("end", "load", desc, 2 * replicas, 2 * replicas, "stage"),
    ]
    if backend == "local":  # a step as each worker is built, not all at the end
        assert steps_before == list(range(2 * replicas))
