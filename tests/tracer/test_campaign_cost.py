"""A campaign's cost (shardlens.tracer.campaign.cost) against what running it measures."""

import pyarrow.parquet as pq
import pytest
import torch

import shardlens as sl
from shardlens.sharding import estimate
from shardlens.tracer.campaign import CampaignError, load_campaign, run_campaign
from shardlens.tracer.campaign.runner import start_tracer
from shardlens.tracer.campaign.cost import campaign_cost, forward_equivalents
from shardlens.tracer.demo import MODEL
from tests.sharding.test_estimate import recording_tracer
from tests.tracer.test_campaign import write_campaign

HEAD = """name: t
model: {source: MODEL}
cluster: {backend: local, stages: 2}
data: {path: prompts.jsonl, batch_size: 8, limit: 12}
metric: {kind: METRIC}
experiments:
"""
EXPERIMENTS = {  # one campaign per experiment: what each costs is measured apart
    "heads": "  - {name: heads, kind: sweep, points: z, over: [layer, head], positions: [22]}\n",
    "heads_everywhere": "  - {name: heads_everywhere, kind: sweep, points: z, over: [layer, head]}\n",
    "resid": "  - {name: resid, kind: sweep, points: resid_pre, over: [layer, pos]}\n",
    "atp": "  - {name: atp, kind: atp, points: z, over: [layer, head], positions: [22]}\n",
    "ig": "  - {name: ig, kind: ig, points: resid_pre, steps: 3}\n",
    "acts": "  - {name: acts, kind: extract, points: [\"blocks.*.hook_resid_post\", \"blocks.0.mlp.hook_post\"], layout: token}\n",
}


class BlockPasses:
    """Counts what every decoder block of a local Tracer's stages computes: the tokens of each
    call (rows x positions), twice for a call that keeps its graph (its backward follows)."""

    def __init__(self, tracer):
        self.tokens = 0
        for row in tracer.coordinator.workers:
            for worker in row:
                for block in worker.stage.blocks.values():
                    block.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        self.tokens += hidden.shape[0] * hidden.shape[1] * (2 if torch.is_grad_enabled() else 1)


@pytest.mark.parametrize("experiment, metric", [
    ("heads", "logit_diff"), ("heads_everywhere", "loss"), ("resid", "logit_diff"), ("resid", "loss"), ("atp", "logit_diff"),
    ("ig", "logit_diff"), ("acts", "logit_diff"),
])
def test_forward_equivalents_and_bytes_sent_are_what_the_campaign_runs(tmp_path, experiment, metric):
    """Block passes counted on the stages, over (layers x examples x tokens) of one forward of
    all the data; tensor bytes counted crossing the stage boundaries."""
    path = write_campaign(tmp_path, HEAD.replace("METRIC", metric) + EXPERIMENTS[experiment] + "output: {path: out, plots: false}\n")
    predicted = campaign_cost(path)
    tracer, backend = recording_tracer(MODEL, stages=2, microbatch_size=predicted.microbatch_size)
    passes = BlockPasses(tracer)
    run_campaign(path, progress=False, runner=tracer)
    one_forward = tracer.plan.n_layers * 12 * 23  # 12 examples (batches of 8 and 4) of 23 tokens
    # a sweep over positions runs its cells in groups from the group's earliest position: a little more
    grouped = experiment == "resid" and metric != "loss"  # (the loss reads position 0: every cell starts there)
    assert predicted.forwards == pytest.approx(passes.tokens / one_forward, rel=0.1 if grouped else 1e-9)
    measured_sent = [backend.sent.get(0, 0), backend.returned.get(1, 0)]
    assert measured_sent[0] > 0 and bool(measured_sent[1]) == (experiment in ("atp", "ig"))
    assert [s.sent_bytes for s in predicted.stages] == pytest.approx(measured_sent, rel=0.1 if grouped else 1e-9)


def test_the_formula_counts_what_its_docstring_says():
    assert forward_equivalents("extract") == 1 and forward_equivalents("atp") == 3
    assert forward_equivalents("ig", n_points=2, steps=8) == 2 + 32
    # layer 0 of 2 from position 0 of 4: all of it; layer 1 from position 3: half the layers, a quarter of the positions
    assert forward_equivalents("sweep", cells=[(0, 0), (1, 3), (None, 2)], n_layers=2, seq_len=4) == 2 + 1 + 0.125 + 1
    assert forward_equivalents("top_contexts") == 1
    with pytest.raises(ValueError, match=r"kind must be one of extract, .*top_contexts.*; got 'tune'"):
        forward_equivalents("tune")


def test_bytes_written_are_the_raw_values_and_tables_the_campaign_writes(tmp_path):
    text = HEAD.replace("METRIC", "logit_diff") + "".join(EXPERIMENTS[e] for e in ("heads", "atp", "acts"))
    path = write_campaign(tmp_path, text + "output: {path: out, plots: false}\n")
    predicted = {e.name: e.written_bytes for e in campaign_cost(path).experiments}
    run_campaign(path, progress=False)
    out = tmp_path / "out"
    values = sl.read_cache(out / "acts")
    assert predicted["acts"] == sum(values[name].nbytes for name in values)  # raw values, before Parquet
    for name in ("heads", "atp"):  # the grid tables, in Arrow
        tables = [pq.read_table(part) for part in sorted((out / name).glob("part-*.parquet"))]
        assert predicted[name] == pytest.approx(sum(t.nbytes for t in tables), rel=0.05), name


def test_the_largest_run_of_each_stage_fits_its_budget_or_says_so(tmp_path):
    text = HEAD.replace("METRIC", "logit_diff").replace("stages: 2}", "stages: 2, max_memory: {cpu: 400kB}, microbatch_size: auto}")
    path = write_campaign(tmp_path, text + EXPERIMENTS["acts"] + EXPERIMENTS["ig"] + "output: {path: out, plots: false}\n")
    cost = campaign_cost(path)
    assert [s.budget for s in cost.stages] == [400_000, 400_000] and cost.microbatch_size < 8
    tracer, backend = recording_tracer(MODEL, stages=2, microbatch_size=cost.microbatch_size)
    run_campaign(path, progress=False, runner=tracer)
    rows = max(backend.microbatches)
    assert rows == 3 * 8  # integrated gradients: each point's 3 steps x 8 examples at once, whatever the microbatch size
    ig = next(e for e in cost.experiments if e.name == "ig")
    largest = [estimate(tracer.plan, tracer.config, batch=rows, seq_len=23, names=[n], incl_bwd=True).peak_bytes for n in ig.points]
    assert ig.peak_bytes == max(largest) > 400_000
    assert not all(s.fits for s in cost.stages) and "(exceeded)" in str(cost)


def test_an_auto_microbatch_is_the_largest_that_fits_and_the_campaigns_tracer_runs_it(tmp_path):
    acts = '  - {name: acts, kind: extract, points: "blocks.*.attn.hook_pattern"}\noutput: {path: out, plots: false}\n'  # a quarter of the need
    unbounded = campaign_cost(write_campaign(tmp_path / "unbounded", HEAD.replace("METRIC", "logit_diff") + acts))
    assert unbounded.microbatch_size == 8  # the batch, over one replica
    per_example = [(s.peak_bytes - s.weight_bytes) / 8 for s in unbounded.stages]
    budget = int(max(s.weight_bytes + 3.5 * p for s, p in zip(unbounded.stages, per_example)))
    cluster = f"stages: 2, max_memory: {{cpu: {budget}}}, microbatch_size: auto}}"
    path = write_campaign(tmp_path / "auto", HEAD.replace("METRIC", "logit_diff").replace("stages: 2}", cluster) + acts)
    cost = campaign_cost(path)
    assert cost.microbatch_size == 3 and all(s.fits for s in cost.stages)
    tracer = start_tracer(load_campaign(path))
    assert tracer.coordinator.microbatch_size == 3
    run_campaign(path, progress=False, runner=tracer)
    assert [s["forwards"] for s in tracer.stats()] == [3 + 2, 3 + 2]  # batches of 8 and 4 in microbatches of 3


def test_a_microbatch_size_is_a_number_or_auto(tmp_path):
    text = HEAD.replace("METRIC", "logit_diff").replace("stages: 2}", "stages: 2, microbatch_size: big}")
    with pytest.raises(CampaignError, match=r"campaign.yaml:3: cluster.microbatch_size must be one of auto; got 'big'"):
        load_campaign(write_campaign(tmp_path, text + EXPERIMENTS["acts"] + "output: {path: out}\n"))
