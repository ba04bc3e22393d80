"""The cluster checked against one process: a wrong stage is caught where it starts, the
campaign key stops a run before its first unit, and the key's schema."""

import json

import pytest
import torch

from shardlens.tracer.campaign import CampaignError, VerificationError, load_campaign, run_campaign, status, verify
from shardlens.tracer.campaign.runner import start_tracer
from tests.tracer.test_campaign import write_campaign

# atp on hook_z (activations and their gradients) and the residual stream; 8 rows
CAMPAIGN = """name: v
model: {source: MODEL, dtype: float32}
cluster: {backend: local, stages: 2}
data: {path: prompts.jsonl, batch_size: 4, limit: 8}
metric: {kind: logit_diff}
experiments:
  - {name: atp, kind: atp, points: z, over: [layer, head], positions: [22]}
  - {name: resid, kind: extract, points: "blocks.*.hook_resid_post"}
output: {path: out, plots: false}
"""
FORWARD = ["blocks.0.attn.hook_z", "blocks.0.hook_resid_post", "blocks.1.attn.hook_z", "blocks.1.hook_resid_post", "logits", "metric"]
BACKWARD = ["blocks.1.attn.hook_z_grad", "blocks.0.attn.hook_z_grad"]


@pytest.fixture
def campaign(tmp_path):
    return load_campaign(write_campaign(tmp_path, CAMPAIGN))


@pytest.fixture
def cluster(campaign):
    tracer = start_tracer(campaign)
    yield tracer
    tracer.shutdown()


def perturb(tracer, stage):
    """Add noise to the query weights of the first block of `stage` (replica 0), in place."""
    worker = tracer.coordinator.workers[0][stage]
    weight = worker.stage.blocks[str(stage)].self_attn.q_proj.weight
    with torch.no_grad():
        weight.add_(0.05 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)))


def test_an_untouched_cluster_agrees_with_one_process(campaign, cluster):
    result = verify(campaign, cluster=cluster, examples=6)
    assert result.ok and result.failures == () and result.check() is result
    assert [d.point for d in result.differences] == FORWARD + BACKWARD
    assert [d.stage for d in result.differences] == [0, 0, 1, 1, 1, None, 1, 0]
    assert all(d.difference < 1e-6 for d in result.differences)
    assert (result.examples, result.dtype, result.tolerance) == (6, "float32", 1e-4)
    logits = result.differences[4]
    assert logits.scale > 5 and logits.limit == pytest.approx(1e-4 * logits.scale)  # relative above 1
    assert result.describe().splitlines()[-1] == "ok: the cluster agrees with one process"
    assert result.message().startswith("the cluster agrees with one process (closest to its limit: ")


def test_nan_never_passes_and_the_worst_comes_first():
    from shardlens.tracer.campaign.verify import Difference, Verification

    nan, ok, over = Difference("a", float("nan"), 1.0, 1e-4, 0), Difference("b", 0.0, 1.0, 1e-4, 0), Difference("c", 2e-4, 1.0, 1e-4, 1)
    result = Verification((ok, over, nan), tolerance=1e-4, dtype="float32", examples=1)
    assert result.failures == (over, nan) and result.worst is nan
    assert result.message() == ("the cluster and one process differ beyond tolerance 0.0001 (float32) at 2 of 3 compared values: "
                                "a by nan (limit 0.0001), c by 0.0002 (limit 0.0001); the first that differs is c (stage 1); "
                                "the 1 compared values before it agree")
    with pytest.raises(ValueError, match="needs at least one compared value"):
        Verification((), tolerance=1e-4, dtype="float32", examples=1)


@pytest.mark.parametrize("stage", [0, 1])
def test_a_wrong_stage_is_caught_where_it_starts(campaign, cluster, stage):
    perturb(cluster, stage)
    result = verify(campaign, cluster=cluster)
    assert not result.ok
    verdicts = {d.point: d.ok for d in result.differences}
    wrong = f"blocks.{stage}.attn.hook_z"
    assert [p for p in FORWARD if verdicts[p]] == FORWARD[:FORWARD.index(wrong)]  # the points before the stage agree
    first = result.failures[0]
    assert (first.point, first.stage) == (wrong, stage) and first.difference > 100 * first.limit
    with pytest.raises(VerificationError, match=rf"the first that differs is {wrong} \(stage {stage}\)") as raised:
        result.check()
    assert "differ beyond tolerance 0.0001 (float32)" in str(raised.value)
    [row] = [line.split() for line in result.describe().splitlines() if line.startswith(f"{wrong} ")]
    assert row[1] == str(stage) and row[-1] == "DIFFERS"


def test_a_looser_tolerance_lets_a_small_difference_pass(campaign, cluster):
    weight = cluster.coordinator.workers[0][1].stage.blocks["1"].self_attn.q_proj.weight
    with torch.no_grad():
        weight.mul_(1 + 1e-3)
    tight, loose = verify(campaign, cluster=cluster), verify(campaign, cluster=cluster, tolerance=1e-2)
    assert not tight.ok and loose.ok
    assert [d.difference for d in tight.differences] == [d.difference for d in loose.differences]


def test_the_default_tolerance_follows_the_dtype(tmp_path):
    path = write_campaign(tmp_path, CAMPAIGN.replace("dtype: float32", "dtype: bfloat16"))
    result = verify(path, examples=2)  # starts and stops the campaign's own cluster
    assert (result.dtype, result.tolerance, result.examples) == ("bfloat16", 3e-2, 2)
    assert result.ok


@pytest.mark.parametrize("options, message", [
    (dict(examples=0), "examples must be a positive int; got 0"),
    (dict(tolerance=-1.0), "tolerance must be a positive number such as 1e-4"),
])
def test_bad_options_are_refused(campaign, options, message):
    with pytest.raises(ValueError, match=message):
        verify(campaign, **options)


def test_the_campaign_key_stops_a_run_on_a_wrong_stage_before_its_first_unit(tmp_path, cluster):
    path = write_campaign(tmp_path, CAMPAIGN + "verify: {examples: 2}\n")
    perturb(cluster, 1)
    with pytest.raises(VerificationError, match=r"the first that differs is blocks.1.attn.hook_z \(stage 1\)"):
        run_campaign(path, progress=False, runner=cluster)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["campaign.json", "events.jsonl"]  # no unit wrote anything
    got = status(out)
    assert got.state == "failed" and got.done == 0 and got.verification.startswith("failed at ")


def test_the_campaign_key_lets_an_agreeing_cluster_run_and_is_skipped_with_nothing_to_do(tmp_path, cluster):
    path = write_campaign(tmp_path, CAMPAIGN + "verify: true\n")
    assert run_campaign(path, progress=False, runner=cluster)["units_run_now"] == 4
    checks = [json.loads(line) for line in (tmp_path / "out" / "events.jsonl").read_text().splitlines()]
    assert [e["event"] for e in checks] == ["run", "verify", "done", "done", "done", "done"] and checks[1]["ok"]
    perturb(cluster, 1)  # would fail the check, but no unit is left to run
    assert run_campaign(path, progress=False, runner=cluster)["units_run_now"] == 0


@pytest.mark.parametrize("key, expected", [
    ("verify: true", {}),
    ("verify: false", None),
    ("verify: {examples: 2, tolerance: 1e-3}", {"examples": 2, "tolerance": 1e-3}),  # PyYAML reads 1e-3 as text
    ("verify: {tolerance: 0.5}", {"tolerance": 0.5}),
])
def test_the_verify_key(tmp_path, key, expected):
    assert load_campaign(write_campaign(tmp_path, CAMPAIGN + key + "\n")).verify == expected
    assert load_campaign(write_campaign(tmp_path, CAMPAIGN)).verify is None


@pytest.mark.parametrize("key, message", [
    ("verify: 3", r"campaign.yaml:10: verify must be bool or dict; got 3"),
    ("verify: {exampels: 2}", r"campaign.yaml:10: unknown key 'exampels' in verify; known: examples, tolerance"),
    ("verify: {examples: 0}", r"campaign.yaml:10: verify.examples must be a positive int; got 0"),
    ("verify:\n  tolerance: small", r"campaign.yaml:11: verify.tolerance must be a positive number such as 1.0e-4; got 'small'"),
    ("verify: {tolerance: -1.0e-4}", r"campaign.yaml:10: verify.tolerance must be a positive number"),
])
def test_a_bad_verify_key_names_the_line(tmp_path, key, message):
    with pytest.raises(CampaignError, match=message):
        load_campaign(write_campaign(tmp_path, CAMPAIGN + key + "\n"))
