"""Campaign experiments of kind top_contexts: each feature's top k contexts over the dataset,
against a naive top k over every (example, position) at once; resuming after a kill; cost."""

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

import shardlens as sl
from shardlens.tracer.campaign import CampaignError, load_campaign, run_campaign, status
from shardlens.tracer.campaign import units as campaign_module
from shardlens.tracer.campaign.cost import campaign_cost
from shardlens.tracer.demo import MODEL
from tests.sharding.test_estimate import recording_tracer
from tests.tracer.test_campaign import visible_dataset
from tests.tracer.test_campaign_cost import BlockPasses

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "induction" / "prompts.jsonl"
POINTS = "blocks.*.mlp.hook_post"  # [batch, pos, 16] in the demo model
BATCH = 8
HEAD = """name: t
model: {source: MODEL}
cluster: {backend: local, stages: 2}
data: {path: prompts.jsonl, batch_size: 8}
experiments:
"""
NEURONS = '  - {name: neurons, kind: top_contexts, points: "blocks.*.mlp.hook_post", k: 5, window: 3}\n'
SOME = '  - {name: some, kind: top_contexts, points: blocks.1.mlp.hook_post, k: 3, window: 30, features: [7, 2, 11], sparse: true}\n'
TAIL = "output: {path: out, plots: false}\n"


def prompts() -> list[list[int]]:
    """20 clean prompts of 23 tokens, no other field; some repeated, so that activations tie
    exactly: rows 2 and 3 in one batch, rows 1, 9 and 17 in three batches."""
    rows = [json.loads(line)["clean"] for line in EXAMPLES.read_text().splitlines()[:20]]
    rows[3] = rows[2]
    rows[9] = rows[17] = rows[1]
    return rows


def write_campaign(folder: Path, experiments: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "prompts.jsonl").write_text("".join(json.dumps({"clean": p}) + "\n" for p in prompts()))
    path = folder / "campaign.yaml"
    path.write_text((HEAD + experiments + TAIL).replace("MODEL", str(MODEL)))
    return path


def naive_top_contexts(runner, k, window, points=POINTS, features=None):
    """Plain torch and Python: each batch forward as the campaign runs it (the same values,
    bit for bit), then over the whole dataset at once, per feature, every (example, position)
    with an activation above zero sorted by (-activation, example, position), the first k."""
    data = prompts()
    caches = [runner.run_with_cache(torch.tensor(data[i:i + BATCH]), names_filter=points)[1] for i in range(0, len(data), BATCH)]
    rows = []
    for name in caches[0]:
        acts = torch.cat([cache[name] for cache in caches])  # [examples, pos, features]
        for feature in features or range(acts.shape[-1]):
            column = acts[..., feature]
            found = [(float(column[e, p]), e, p) for e in range(acts.shape[0]) for p in range(acts.shape[1]) if column[e, p] > 0]
            found.sort(key=lambda c: (-c[0], c[1], c[2]))
            for rank, (value, example, pos) in enumerate(found[:k]):
                start = max(0, pos - window)
                rows.append(dict(hook=name, feature=feature, rank=rank, activation=value, example=example, pos=pos, start=start,
                                 tokens=data[example][start:pos + window + 1]))
    rows.sort(key=lambda r: (r["hook"], r["feature"], r["rank"]))
    return rows


def result(out: Path, experiment: str) -> list[dict]:
    return pq.read_table(out / experiment / "top_contexts.parquet").to_pylist()


@pytest.fixture(scope="module")
def model():
    return sl.HookedModel.from_pretrained(MODEL)


@pytest.mark.parametrize("sparse", [False, True])
def test_top_contexts_are_the_naive_top_k_over_the_whole_dataset(tmp_path, model, sparse):
    experiment = NEURONS.replace("window: 3}", f"window: 3, sparse: {str(sparse).lower()}}}")
    summary = run_campaign(write_campaign(tmp_path, experiment), progress=False, runner=model)
    got = result(tmp_path / "out", "neurons")
    expected = naive_top_contexts(model, k=5, window=3)
    assert len(got) == len(expected) == 2 * 16 * 5  # every neuron fires on more than 5 of the 460 tokens
    assert got == expected
    tied = [(a, b) for a, b in zip(got, got[1:]) if (a["hook"], a["feature"], a["activation"]) == (b["hook"], b["feature"], b["activation"])]
    assert len(tied) >= 5 and all((a["example"], a["pos"]) < (b["example"], b["pos"]) for a, b in tied)  # exact ties, by example
    info = summary["experiments"]["neurons"]
    assert info["hooks"] == ["blocks.0.mlp.hook_post", "blocks.1.mlp.hook_post"] and info["contexts"] == 160 and info["features"] == 32
    assert sorted(p.name for p in (tmp_path / "out" / "neurons").iterdir()) == [
        "part-b00000.parquet", "part-b00001.parquet", "part-b00002.parquet", "top_contexts.parquet"]


def test_a_two_stage_tracer_restricted_to_some_features_sends_only_non_zeros(tmp_path):
    path = write_campaign(tmp_path, SOME)
    run_campaign(path, progress=False)  # the campaign's own Tracer: local, 2 stages
    with sl.Tracer.from_pretrained(MODEL, stages=2, backend="local") as tracer:
        expected = naive_top_contexts(tracer, k=3, window=30, points=["blocks.1.mlp.hook_post"], features=[2, 7, 11])
    assert result(tmp_path / "out", "some") == expected
    assert all(r["start"] == 0 and len(r["tokens"]) == min(23, r["pos"] + 31) for r in expected)  # windows cut at the prompt's ends


def test_a_data_set_with_only_clean_prompts_suffices(tmp_path, model):
    path = write_campaign(tmp_path, NEURONS)
    assert all(set(json.loads(line)) == {"clean"} for line in (tmp_path / "prompts.jsonl").read_text().splitlines())
    assert run_campaign(path, progress=False, runner=model)["units_run_now"] == 3
    progress = status(tmp_path / "out")
    assert [(e.name, e.kind, e.done, e.left) for e in progress.experiments] == [("neurons", "top_contexts", 3, 0)]
    header, row = progress.describe().splitlines()[1:3]
    assert row.index("top_contexts") == header.index("kind") and row.index(" 3 ") + 1 == header.index("done") + 3  # columns line up (right-aligned counts)


KILLS = [("unit", 0), ("unit", 2), ("unit", 4), ("unit", 5), ("merge", 0), ("merge", 1)]


@pytest.mark.parametrize("where, which", KILLS)
def test_a_killed_campaign_reruns_to_identical_output(tmp_path, monkeypatch, where, which):
    whole = write_campaign(tmp_path / "whole", NEURONS + SOME)
    run_campaign(whole, progress=False)
    expected = visible_dataset(tmp_path / "whole" / "out")
    assert {"neurons/top_contexts.parquet", "some/top_contexts.parquet"} <= set(expected)

    killed = write_campaign(tmp_path / "killed", NEURONS + SOME)
    real_write = campaign_module.write_atomic
    seen = {"units": 0, "merges": 0}

    def dying_write(path, write):
        # 6 units (2 experiments x 3 batches) write a part each, then the 2 merges write theirs
        merge = path.name == "top_contexts.parquet"
        count = seen["merges" if merge else "units"]
        seen["merges" if merge else "units"] += 1
        if (where == "merge") == merge and count == which:
            path.parent.mkdir(parents=True, exist_ok=True)
            (path.parent / f".{path.name}.tmp").write_bytes(b"half a file")
            raise KeyboardInterrupt("killed")
        real_write(path, write)

    monkeypatch.setattr(campaign_module, "write_atomic", dying_write)
    with pytest.raises(KeyboardInterrupt):
        run_campaign(killed, progress=False)
    monkeypatch.setattr(campaign_module, "write_atomic", real_write)
    summary = run_campaign(killed, progress=False)
    assert summary["units_run_now"] == (6 - which if where == "unit" else 0)
    got = visible_dataset(tmp_path / "killed" / "out")
    assert got.keys() == expected.keys()
    for name in expected:
        assert got[name].equals(expected[name]), name


@pytest.mark.parametrize("old, new, differs", [
    ("k: 5", "k: 7", r"k=5 \(now 7\)"),
    ("window: 3}", "window: 3, features: [2, 1]}", r"features=None \(now \[1, 2\]\)"),
    ('points: "blocks.*.mlp.hook_post"', "points: blocks.1.mlp.hook_post", r"points='blocks\.\*\.mlp\.hook_post' \(now 'blocks\.1\.mlp\.hook_post'\)"),
    ("batch_size: 8", "batch_size: 4", r"data=\{.*'batch_size': 8.*\} \(now \{.*'batch_size': 4.*\}\)"),
])
def test_a_rerun_with_other_settings_is_refused_naming_the_setting(tmp_path, model, old, new, differs):
    path = write_campaign(tmp_path, NEURONS)
    run_campaign(path, progress=False, runner=model)
    before = visible_dataset(tmp_path / "out")
    path.write_text(path.read_text().replace(old, new))
    with pytest.raises(CampaignError, match=rf"experiment 'neurons' \(top_contexts\): part-b00000\.parquet was computed with {differs}; "
                                            r"remove .*neurons to compute its parts again"):
        run_campaign(path, progress=False, runner=model)
    after = visible_dataset(tmp_path / "out")
    assert after.keys() == before.keys() and all(after[name].equals(before[name]) for name in before)


def test_parts_record_their_settings_and_window_or_sparse_reuse_them(tmp_path, model):
    path = write_campaign(tmp_path, NEURONS)
    run_campaign(path, progress=False, runner=model)
    settings = json.loads(pq.read_schema(tmp_path / "out" / "neurons" / "part-b00002.parquet").metadata[b"shardlens.top_contexts"])
    assert (settings["points"], settings["k"], settings["features"], settings["data"]["batch_size"]) == (POINTS, 5, None, 8)
    path.write_text(path.read_text().replace("window: 3}", "window: 6, sparse: true}"))
    assert run_campaign(path, progress=False, runner=model)["units_run_now"] == 0  # the parts do not depend on window or sparse
    assert result(tmp_path / "out", "neurons") == naive_top_contexts(model, k=5, window=6)


# ---------------------------------------------------------------------- the file and its errors


@pytest.mark.parametrize("old, new, message", [
    ("k: 5", "k: 0", r"campaign.yaml:6: experiment.k must be an int >= 1; got 0"),
    ("k: 5", "k: five", r"campaign.yaml:6: experiment.k must be int; got 'five'"),
    ("window: 3", "window: -1", r"campaign.yaml:6: experiment.window must be an int >= 0; got -1"),
    ("window: 3", "window: 3, features: [4, 4]", r"campaign.yaml:6: experiment.features must be distinct feature indices >= 0; got \[4, 4\]"),
    ("window: 3", "window: 3, features: [-1]", r"experiment.features must be distinct feature indices >= 0; got \[-1\]"),
    ("window: 3", "window: 3, sparse: maybe", r"campaign.yaml:6: experiment.sparse must be bool; got 'maybe'"),
    ("top_contexts", "top_context", r"campaign.yaml:6: experiment.kind must be one of .*top_contexts.*; got 'top_context'"),
])
def test_bad_values_are_refused_naming_the_line_and_value(tmp_path, old, new, message):
    with pytest.raises(CampaignError, match=message):
        load_campaign(write_campaign(tmp_path, NEURONS.replace(old, new)))


@pytest.mark.parametrize("edit, message", [
    (("blocks.*.mlp.hook_post", "blocks.0.attn.hook_z"), r"reads \[batch, pos, features\] hook points; blocks.0.attn.hook_z has shape \[8, 23, 4, 16\]"),
    (("window: 3", "window: 3, features: [3, 16, 40]"), r"features \[16, 40\] are out of range at blocks.0.mlp.hook_post: it has 16 features"),
])
def test_points_and_features_that_do_not_fit_are_refused(tmp_path, model, edit, message):
    with pytest.raises(ValueError, match=message):
        run_campaign(write_campaign(tmp_path, NEURONS.replace(*edit)), progress=False, runner=model)


def test_the_plan_counts_one_forward_and_each_features_top_k(tmp_path):
    path = write_campaign(tmp_path, NEURONS + SOME)
    cost = {e.name: e for e in campaign_cost(path).experiments}
    assert [cost[n].forwards for n in ("neurons", "some")] == [1.0, 1.0]
    # per batch, k rows for each feature: 16 neurons at 2 points, or the 3 chosen
    names = ["blocks.0.mlp.hook_post", "blocks.1.mlp.hook_post"]
    assert cost["neurons"].points == tuple(names)
    assert cost["neurons"].written_bytes == 3 * sum(5 * 16 * (24 + len(n)) for n in names)
    assert cost["some"].written_bytes == 3 * 3 * 3 * (24 + len(names[1]))
    tracer, _ = recording_tracer(MODEL, stages=2, microbatch_size=campaign_cost(path).microbatch_size)
    passes = BlockPasses(tracer)
    run_campaign(path, progress=False, runner=tracer)
    assert passes.tokens == 2 * tracer.plan.n_layers * 20 * 23  # one forward of the data per experiment
    written = [pq.read_table(p).num_rows for p in sorted((tmp_path / "out" / "neurons").glob("part-*.parquet"))]
    assert all(rows <= 2 * 5 * 16 for rows in written)
