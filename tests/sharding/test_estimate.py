"""shardlens.sharding.estimate and Tracer.estimate: each prediction against what a run measures."""

import json
import os
import subprocess
import sys

import pytest
import torch
import transformers
from transformers import AutoConfig

import shardlens as sl
from shardlens.cluster import Coordinator
from shardlens.cluster.backends import LocalBackend
from shardlens.errors import ShardPlanError
from shardlens.sharding import ShardPlan, StageIO, estimate, fit_microbatch
from shardlens.sharding.estimate import split_names
from tests.tiny_models import save_tiny_model

FAMILIES = ["llama_gqa", "mixtral", "gpt2"]  # grouped-query heads; experts (int64 indices); absolute positions, GELU MLP


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("estimate")
    return {name: save_tiny_model(name, root / name) for name in FAMILIES}


def tokens_of(batch, seq_len, seed=0):
    return torch.randint(3, 90, (batch, seq_len), generator=torch.Generator().manual_seed(seed))


class RecordingBackend(LocalBackend):
    """The local backend, counting what crosses each stage boundary (tensor bytes): the StageIO a
    stage's forward gets from the stage before (not one the driver sends a run entering there), the gradient a stage's backward returns to it;
    and the batch size of each forward of stage 0 with token ids."""

    def __init__(self):
        super().__init__()
        self.sent: dict[int, int] = {}  # boundary (the sending stage, forward) -> bytes
        self.returned: dict[int, int] = {}  # stage whose backward sent its input's gradient back -> bytes
        self.microbatches: list[int] = []

    def call(self, worker, method, *args, **kwargs):
        done = super().call(worker, method, *args, **kwargs)
        if method == "forward" and worker.index == 0 and self._value(args[1]).input_ids is not None:
            self.microbatches.append(self._value(args[1]).input_ids.shape[0])
        if method == "forward" and worker.index > 0 and not isinstance(args[1], StageIO):  # a handle: from the stage before
            io = self._value(args[1])
            received = sum(t.nbytes for t in vars(io).values() if isinstance(t, torch.Tensor))
            self.sent[worker.index - 1] = self.sent.get(worker.index - 1, 0) + received
        if method == "backward" and done.error is None and done.value is not None:
            self.returned[worker.index] = self.returned.get(worker.index, 0) + done.value.nbytes
        return done


def recording_tracer(path, *, stages, microbatch_size, max_memory=None):
    backend = RecordingBackend()
    plan = ShardPlan.for_model(path, stages=stages, max_memory=max_memory)
    coordinator = Coordinator(str(path), plan, backend, microbatch_size=microbatch_size)
    return sl.Tracer(coordinator, config=AutoConfig.from_pretrained(path)), backend


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("names_filter, incl_bwd", [
    ("blocks.*.hook_resid_post", False),
    (["hook_embed", "blocks.*.attn.hook_pattern", "blocks.*.attn.hook_k", "hook_logits"], False),
    (None, False),  # every hook point, expert indices (int64) included
    (["blocks.*.hook_mlp_out", "blocks.*.attn.hook_z"], True),  # their gradients too
])
def test_activation_bytes_are_what_run_with_cache_returns_per_stage(checkpoints, family, names_filter, incl_bwd):
    tracer = sl.Tracer.from_pretrained(checkpoints[family], stages=3, backend="local", microbatch_size=2)
    tokens = tokens_of(5, 9)
    _, cache = tracer.run_with_cache(tokens, names_filter=names_filter, incl_bwd=incl_bwd, return_type="loss")
    predicted = tracer.estimate(tokens, names_filter=names_filter, incl_bwd=incl_bwd)
    assert predicted.microbatch_size == 2 and predicted.forwards == 1 + incl_bwd
    for stage, names in zip(predicted.stages, tracer.coordinator.stage_names):
        measured = sum(cache[entry].nbytes for entry in cache if entry.removesuffix("_grad") in names)
        assert measured > 0
        assert stage.written_bytes == measured  # the whole batch
        assert stage.activation_bytes == measured // 5 * 2  # a microbatch: 2 of its 5 examples


def test_stages_hold_the_names_split_names_gives_them(checkpoints):
    tracer = sl.Tracer.from_pretrained(checkpoints["gpt2"], stages=3, backend="local")
    assert [set(names) for names in split_names(tracer.plan, tracer.hook_names())] == [set(n) for n in tracer.coordinator.stage_names]


@pytest.mark.parametrize("incl_bwd", [False, True])
def test_bytes_sent_between_stages_are_what_crosses_them(checkpoints, incl_bwd):
    tracer, backend = recording_tracer(checkpoints["llama_gqa"], stages=3, microbatch_size=2)
    tokens = tokens_of(5, 9)
    tracer.run_with_cache(tokens, names_filter="blocks.*.hook_resid_post", incl_bwd=incl_bwd, return_type="loss")
    predicted = tracer.estimate(tokens, names_filter="blocks.*.hook_resid_post", incl_bwd=incl_bwd)
    measured = [backend.sent.get(s, 0) + backend.returned.get(s, 0) for s in range(3)]
    assert backend.sent[0] > 0 and bool(backend.returned) == incl_bwd
    assert [s.sent_bytes for s in predicted.stages] == measured
    assert predicted.sent_bytes == sum(measured)


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory):
    """A small Llama whose cached values dominate a dataset's index columns and footers."""
    folder = tmp_path_factory.mktemp("wide") / "llama"
    config = transformers.LlamaConfig(
        hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=97, max_position_embeddings=128,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("layout", ["example", "token"])
def test_bytes_written_are_the_datasets_size_on_disk_within_20_percent(wide_llama, tmp_path, layout):
    """The estimate counts raw value bytes; a Parquet dataset adds index columns and footers and
    zstd takes a little off random float32 values (a causal pattern, half zeros, would compress
    to about 70%: dense points are measured here)."""
    tracer = sl.Tracer.from_pretrained(wide_llama, stages=2, backend="local", microbatch_size=8)
    tokens = tokens_of(16, 64)
    names = ["blocks.*.hook_resid_post", "blocks.0.mlp.hook_post"]
    tracer.write_cache(tokens, tmp_path / "acts", names_filter=names, layout=layout, return_type=None)
    on_disk = sum(p.stat().st_size for p in (tmp_path / "acts").rglob("*.parquet"))
    predicted = tracer.estimate(tokens, names_filter=names).written_bytes
    assert predicted == 16 * 64 * (2 * 256 + 512) * 4
    assert 0.8 < on_disk / predicted < 1.2, (on_disk, predicted)


PEAK_SCRIPT = """
import json, sys
import torch
from shardlens.cluster.worker import StageWorker
from shardlens.hooks.names import names_predicate
from shardlens.hooks.ops import Cache, CacheGrad
from shardlens.hooks.specs import HookSpec
from shardlens.sharding import ShardPlan, StageIO
source, index, names_filter, batch, seq_len, incl_bwd = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6] == "1"
plan = ShardPlan.for_model(source, stages=2)
tokens = torch.randint(0, 8000, (batch, seq_len), generator=torch.Generator().manual_seed(0))
if index == 0:
    io = StageIO(input_ids=tokens, labels=tokens)
else:
    io = StageIO(hidden=torch.randn(batch, seq_len, 1024), position_ids=torch.arange(seq_len).expand(batch, seq_len), labels=tokens)
def status(key):  # kB
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key + ":"))
# The peak resident memory from here: ru_maxrss would also count the imports' peak, and the
# parent's size at fork. Writing 5 to clear_refs resets VmHWM (the peak) to VmRSS (now).
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base = status("VmRSS")
worker = StageWorker(source, plan.to_json(), index)
assert all(torch.isfinite(t.sum()) for t in worker.stage.state_dict().values())  # resident, not only mapped
selected = names_predicate(names_filter, worker.hook_names())
names = [n for n in worker.hook_names() if selected(n)]
worker.install(1, [HookSpec(n, Cache()).to_json() for n in names] + [HookSpec(n, CacheGrad()).to_json() for n in names if incl_bwd])
worker.forward("b", io, keep_graph=incl_bwd)
if incl_bwd:
    worker.backward("b", torch.tensor(1.0))
assert worker.take("b")
print(json.dumps({"growth": (status("VmHWM") - base) * 1024, "names": names}))
"""


@pytest.fixture(scope="module")
def llama_430mb(tmp_path_factory):
    """A random Llama of 430 MB (float32): each of 2 stages holds about 214 MB of weights."""
    folder = tmp_path_factory.mktemp("peak") / "llama"
    config = transformers.LlamaConfig(
        hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4,
        vocab_size=8192, tie_word_embeddings=False, max_position_embeddings=2048,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("index, names_filter, batch, seq_len, incl_bwd", [
    (0, ["blocks.0.attn.hook_pattern"], 1, 2048, False),  # a cached pattern and the scores beside it: 65% of the peak
    (1, ["blocks.*.hook_resid_post"], 4, 256, True),  # the graph kept for the backward: 60%
    (1, ["ln_final.hook_scale"], 8, 256, False),  # logits and the next-token loss's log-softmax: 50%
])
def test_peak_memory_of_a_stage_is_predicted_within_20_percent(llama_430mb, index, names_filter, batch, seq_len, incl_bwd):
    """Resident memory growth of building one stage and running a microbatch through it, in a
    fresh process, against weights + cache + working set. glibc's malloc
    keeps freed blocks under its (growing) mmap threshold resident and reuses them badly, so
    the process sets a fixed threshold: big blocks go back to the system when freed and the
    peak is that of live tensors (what torch.cuda.max_memory_allocated reports on a GPU)."""
    environment = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    argv = [sys.executable, "-c", PEAK_SCRIPT, str(llama_430mb), str(index), json.dumps(names_filter), str(batch), str(seq_len), str(int(incl_bwd))]
    run = subprocess.run(argv, check=False, capture_output=True, text=True, env=environment)
    assert run.returncode == 0, run.stderr
    measured = json.loads(run.stdout)
    config = AutoConfig.from_pretrained(llama_430mb)
    plan = ShardPlan.for_model(config, stages=2)
    stage = estimate(plan, config, batch=batch, seq_len=seq_len, names=measured["names"], incl_bwd=incl_bwd).stages[index]
    assert stage.weight_bytes > 200e6 and stage.activation_bytes + stage.working_bytes > 0.45 * stage.peak_bytes
    assert stage.peak_bytes == pytest.approx(measured["growth"], rel=0.2), (stage, measured["growth"])


def test_auto_microbatch_is_the_largest_that_fits_and_the_runs_use_it(checkpoints):
    path = checkpoints["llama_gqa"]
    config = AutoConfig.from_pretrained(path)
    unbounded = ShardPlan.for_model(path, stages=2)
    one = estimate(unbounded, config, batch=1, seq_len=9, incl_bwd=True)
    need = max(s.weight_bytes for s in one.stages) + 3.5 * max(s.peak_bytes - s.weight_bytes for s in one.stages)
    plan = ShardPlan.for_model(path, stages=2, max_memory={"cpu": int(need)})
    assert [s.budget for s in plan.stages] == [int(need)] * 2
    assert fit_microbatch(plan, config, seq_len=9, incl_bwd=True) == 3
    assert fit_microbatch(plan, config, seq_len=9, incl_bwd=True, batch=2) == 2
    assert estimate(plan, config, batch=3, seq_len=9, incl_bwd=True).fits
    assert not estimate(plan, config, batch=4, seq_len=9, incl_bwd=True).fits
    tracer = sl.Tracer.from_pretrained(path, stages=2, backend="local", max_memory={"cpu": int(need)}, microbatch_size="auto", seq_len=9)
    assert tracer.coordinator.microbatch_size == 3
    assert tracer.estimate(tokens_of(7, 9), names_filter=[], incl_bwd=True, microbatch_size="auto").microbatch_size == 3
    traced, backend = recording_tracer(path, stages=2, microbatch_size=tracer.coordinator.microbatch_size)
    traced.run_with_cache(tokens_of(7, 9), names_filter=[], incl_bwd=True, return_type="loss")
    assert backend.microbatches == [3, 3, 1]


def test_what_does_not_fit_says_where_and_why(checkpoints):
    path = checkpoints["llama_gqa"]
    config = AutoConfig.from_pretrained(path)
    weights = ShardPlan.for_model(path, stages=2).stages[0].bytes
    tight = ShardPlan.for_model(path, stages=2, max_memory={"cpu": weights + 1000})
    with pytest.raises(ShardPlanError, match=r"stage 0 \(layers 0-1\) has a budget of .* one example of 9 tokens needs"):
        fit_microbatch(tight, config, seq_len=9)
    with pytest.raises(ShardPlanError, match="microbatch_size='auto' fits microbatches .* stage 0 .* has none: give max_memory"):
        fit_microbatch(ShardPlan.for_model(path, stages=2), config, seq_len=9)
    with pytest.raises(ValueError, match="needs seq_len="):
        sl.Tracer.from_pretrained(path, stages=2, backend="local", max_memory={"cpu": "1GB"}, microbatch_size="auto")
    with pytest.raises(ValueError, match="microbatch_size must be a positive int, None or 'auto'; got 'max'"):
        sl.Tracer.from_pretrained(path, stages=2, backend="local", microbatch_size="max")
    with pytest.raises(ValueError, match="seq_len must be a positive int; got 0"):
        estimate(tight, config, batch=2, seq_len=0)


def test_describe_prints_a_row_per_stage(checkpoints, capsys):
    tracer = sl.Tracer.from_pretrained(checkpoints["llama_gqa"], stages=2, backend="local", max_memory={"cpu": "10MB"})
    text = tracer.estimate((4, 9), names_filter="blocks.*.hook_resid_post").describe()
    assert capsys.readouterr().out.strip() == text
    lines = text.splitlines()
    assert lines[0] == "llama, float32: a batch of 4 x 9 tokens in microbatches of 4, 1 forward-equivalents"
    assert lines[1].split() == ["stage", "layers", "weights", "activations/mb", "working/mb", "peak", "budget", "sent", "written"]
    assert lines[2].split()[:2] == ["0", "0-1"] and lines[3].split()[:2] == ["1", "2-2"] and "10 MB" in lines[3]
