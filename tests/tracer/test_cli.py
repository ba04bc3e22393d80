import importlib
import json
import re
import subprocess
import sys

import pytest

from shardlens import ModelSourceError, ShardPlanError
from shardlens.tracer.cli import main
from tests.browser import needs_chromium, render
from tests.tracer.test_status import SMALL


def test_demo_finds_induction_heads_in_layer_1(tmp_path, capsys):
    import torch

    assert main(["demo", "--backend", "local", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "strongest induction head: layer 1" in out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["clean_logit_diff"] > 5 > summary["corrupt_logit_diff"]
    assert summary["top_head"]["layer"] == 1 and summary["atp_top_head"]["layer"] == 1
    assert (tmp_path / "heads.png").stat().st_size > 1000
    page = (tmp_path / "heads.html").read_text()  # the two grids, as the views embed them
    data = json.loads(page.split('id="sl-data">')[1].split("</script>")[0])
    effect, atp = (torch.tensor(h["values"]) for h in data["heatmaps"])
    layer, head = summary["top_head"]["layer"], summary["top_head"]["head"]
    assert effect[layer, head] == pytest.approx(summary["top_head"]["recovered"] * (summary["clean_logit_diff"] - summary["corrupt_logit_diff"]), rel=1e-5)
    assert int(effect.argmax()) == layer * effect.shape[1] + head and data["heatmaps"][0]["cols"] == ["H0", "H1", "H2", "H3"]
    import shardlens as sl

    cache = sl.read_cache(tmp_path / "activations")
    assert sorted(cache) == ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]


def test_help_names_the_commands():
    out = subprocess.run([sys.executable, "-m", "shardlens.tracer.cli", "--help"], capture_output=True, text=True, check=True).stdout
    assert "demo" in out and "usage: shardlens" in out


def test_unknown_command_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["dmeo"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'dmeo'" in capsys.readouterr().err


def test_hooks_plan_inspect(tmp_path, capsys):
    from shardlens.tracer.demo import MODEL

    assert main(["hooks", str(MODEL)]) == 0
    names = capsys.readouterr().out.split()
    assert names[0] == "hook_embed" and "blocks.1.attn.hook_pattern" in names and names[-1] == "hook_logits"
    assert main(["plan", str(MODEL), "--stages", "2", "--max-memory", "0=1MB,1=1MB", "--json"]) == 0
    out = capsys.readouterr().out
    assert "0      0-0 + embed  0, 1" in out and '"model_type": "llama"' in out
    assert main(["plan", str(MODEL), "--stages", "2", "--stage-resources", '[{"node_a": 1}, {"node_b": 1}]']) == 0
    assert capsys.readouterr().out.splitlines()[-1].endswith("node_b=1")
    import torch

    import shardlens as sl

    sl.ActivationCache({"blocks.0.hook_resid_post": torch.zeros(2, 3, 4).bfloat16()}).to_parquet(tmp_path, metadata={"model": "x"})
    assert main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "1 hook points, 1 parts" in out and "model: x" in out
    assert "blocks.0.hook_resid_post" in out and "2 rows  shape [3, 4]  bfloat16  layout example" in out
    latents = torch.zeros(2, 3, 40).bfloat16()
    latents[0, 1, 7] = 2.0
    sl.ActivationCache({"blocks.0.hook_resid_post.sae.hook_latents": latents.to_sparse()}).to_parquet(tmp_path / "sparse", layout="token")
    assert main(["inspect", str(tmp_path / "sparse")]) == 0
    assert "6 rows  sparse, shape [40]  bfloat16  layout token" in capsys.readouterr().out


def test_plan_sizes_a_large_config_in_its_own_dtype(tmp_path, capsys):
    import json

    from tests.sharding.test_plan import LLAMA_70B

    (tmp_path / "config.json").write_text(json.dumps(LLAMA_70B))
    assert main(["plan", str(tmp_path), "--stages", "2"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == "llama, 80 layers, bfloat16"
    gigabytes = [float(line.split()[-1]) for line in lines[2:4]]  # the GB column of stages 0 and 1
    assert sum(gigabytes) == pytest.approx(141.1, abs=0.1)  # 70.55B parameters x 2 bytes


def test_plan_of_a_campaign_prints_its_cost_and_the_forwards_it_runs(tmp_path, capsys):
    from shardlens.tracer.campaign import run_campaign
    from shardlens.tracer.demo import MODEL
    from tests.sharding.test_estimate import recording_tracer
    from tests.tracer.test_campaign import GOOD, write_campaign
    from tests.tracer.test_campaign_cost import BlockPasses

    path = write_campaign(tmp_path, GOOD)
    with pytest.raises(ValueError, match="--stages do not apply to a campaign file"):
        main(["--debug", "plan", str(path), "--stages", "4"])
    assert main(["plan", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "t: llama, float32, 2 stages; 24 examples in 3 batches, up to 23 tokens, microbatches of 8"
    assert lines[1].split() == ["stage", "layers", "weights", "activations/mb", "working/mb", "peak", "budget", "sent", "written"]
    assert [line.split()[:2] for line in lines[2:4]] == [["0", "0-0"], ["1", "1-1"]]
    assert [line.split()[:3] for line in lines[5:10]] == [
        ["experiment", "kind", "points"], ["heads", "sweep", "2"], ["atp", "atp", "2"], ["ig", "ig", "2"], ["resid", "extract", "2"],
    ]
    printed = float(lines[-1].split()[1])  # total: N forward-equivalents ...
    tracer, _ = recording_tracer(MODEL, stages=2, microbatch_size=8)
    passes = BlockPasses(tracer)
    run_campaign(path, progress=False, runner=tracer)
    assert printed == pytest.approx(passes.tokens / (2 * 24 * 23), rel=1e-3)  # block passes over 2 layers x 24 examples x 23 tokens


@pytest.mark.parametrize("argv, error, message", [
    (["plan", "/no/such/model"], ModelSourceError, "/no/such/model: no such folder, and not a Hugging Face hub id either"),
    (["plan", "PLACEHOLDER", "--stages", "9"], ShardPlanError, "stages=9 but the model has 2 layers"),
    (["plan", "PLACEHOLDER", "--max-memory", "0:40GiB"], ValueError, "--max-memory takes DEVICE=SIZE pairs"),
    (["inspect", "/no/such/dataset"], FileNotFoundError, "/no/such/dataset"),
    (["plan", "PLACEHOLDER", "--stages", "2", "--stage-resources", "[{node_a: 1}]"], ValueError, "--stage-resources must be JSON"),
    (["plan", "PLACEHOLDER", "--stages", "2", "--stage-resources", '[{"node_a": 1}]'], ShardPlanError,
     "stage_resources must be a list of 2 dicts"),
])
def test_bad_input_is_one_line_and_non_zero(argv, error, message, capsys):
    from shardlens.tracer.demo import MODEL

    argv = [str(MODEL) if a == "PLACEHOLDER" else a for a in argv]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"shardlens {argv[0]}: error: {message}")
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    with pytest.raises(error, match=re.escape(message)) as info:  # --debug: the exception itself
        main(["--debug", *argv])
    assert info.type is error


def test_verify_prints_the_differences_and_fails_on_a_wrong_stage(tmp_path, capsys, monkeypatch):
    import shardlens as sl
    from tests.tracer.test_campaign import write_campaign
    from tests.tracer.test_verify import CAMPAIGN, perturb

    path = write_campaign(tmp_path, CAMPAIGN + "verify: {examples: 2}\n")
    assert main(["verify", str(path), "--tolerance", "1e-5"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("2 examples, float32, tolerance 1e-05: a value passes when")
    assert out[-1] == "ok: the cluster agrees with one process" and len(out) == 2 + 8 + 1  # the header, 8 compared values, the verdict

    def wrong_cluster(campaign):
        tracer = sl.Tracer.from_pretrained(campaign.model_source, stages=2, backend="local")
        perturb(tracer, 1)
        return tracer

    monkeypatch.setattr(importlib.import_module("shardlens.tracer.campaign.verify"), "start_tracer", wrong_cluster)
    assert main(["--quiet", "verify", str(path), "--examples", "3"]) == 1  # no loading bar before the error on stderr
    captured = capsys.readouterr()
    assert captured.out.startswith("3 examples, float32, tolerance 0.0001")
    assert "blocks.1.attn.hook_z" in captured.out and "DIFFERS" in captured.out
    assert captured.err.startswith("shardlens verify: error: the cluster and one process differ beyond tolerance 0.0001")
    assert "the first that differs is blocks.1.attn.hook_z (stage 1)" in captured.err and len(captured.err.splitlines()) == 1


def test_status_reads_the_output_folder(tmp_path, capsys):
    from shardlens.tracer.campaign import run_campaign
    from tests.tracer.test_campaign import write_campaign
    from tests.tracer.test_status import SMALL

    path = write_campaign(tmp_path, SMALL)
    run_campaign(path, progress=False)
    for given in (tmp_path / "out", path):  # the folder, or the campaign file that names it
        assert main(["status", str(given)]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert lines[0].startswith("small: finished, 4 of 4 units done, ")
        assert [line.split()[:4] for line in lines[1:4]] == [["experiment", "kind", "done", "left"], ["atp", "atp", "2", "0"], ["resid", "extract", "2", "0"]]
    assert main(["status", str(tmp_path / "out"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["name"], data["state"], data["done"], data["left"]) == ("small", "finished", 4, 0)
    assert main(["status", str(tmp_path / "nowhere")]) == 1
    assert capsys.readouterr().err.startswith(f"shardlens status: error: no campaign output folder at {tmp_path / 'nowhere'}")


@pytest.mark.parametrize("command, words", [
    ("verify", ("--examples", "--tolerance", "max(1, max |one process|)", "Exit status 1")),
    ("status", ("--json", "output folder", "units done and left", "failed with their errors")),
    ("serve", ("Start the tracing service", "--host", "--port", "status 2")),
    ("token", ("token: <token>", "config: - {name: \"NAME\", sha256: <hash>}", "not stored anywhere")),
    ("view", ("--out", "--tokenizer", "--example", "DATASET.view.html", "top_contexts", "attention")),
])
def test_help_of_each_command_says_what_it_does(command, words, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert exit_info.value.code == 0 and out.startswith(f"usage: shardlens {command}")
    assert all(word in out for word in words), out


def test_token_prints_a_new_token_and_the_config_line_of_its_hash(capsys):
    import yaml

    from shardlens.serve.config import hash_token

    assert main(["token", "no"]) == 0  # a name plain YAML would read as false
    out = capsys.readouterr().out.splitlines()
    token = re.fullmatch(r"token: ([A-Za-z0-9_-]{43})   \(give this to no; it is not stored anywhere\)", out[0])
    assert token and len(out) == 2 and out[1].startswith("config: - ")
    assert yaml.safe_load(out[1].removeprefix("config: ")) == [{"name": "no", "sha256": hash_token(token[1])}]


def test_serve_refuses_a_bad_config_with_status_2(tmp_path, capsys):
    path = tmp_path / "service.yaml"
    path.write_text("models: []\ntokens: []\n")
    assert main(["serve", str(path)]) == 2
    err = capsys.readouterr().err
    assert err == f"shardlens serve: error: {path}:1: models must hold at least one model; got none\n"


def test_serve_hands_the_checked_config_to_the_app(monkeypatch):
    import types
    from pathlib import Path

    from shardlens.serve.config import load_config

    calls = []
    app = types.ModuleType("shardlens.serve.app")
    app.serve_forever = lambda config, *, host, port: calls.append((config, host, port)) or 0
    monkeypatch.setitem(sys.modules, "shardlens.serve.app", app)
    example = Path(__file__).resolve().parents[2] / "examples" / "serve" / "service.yaml"
    assert main(["serve", str(example), "--port", "9001"]) == 0
    assert main(["serve", str(example), "--host", "10.0.0.1"]) == 0
    assert calls == [(load_config(example), "127.0.0.1", 9001), (load_config(example), "10.0.0.1", 8000)]


@needs_chromium
def test_view_of_a_sweep_experiment_writes_its_grid_beside_the_folder(tmp_path, capsys, monkeypatch):
    import torch

    from shardlens.tracer.campaign import run_campaign
    from tests.tracer.test_campaign import GOOD, write_campaign

    sweep_only = "\n".join(line for line in GOOD.replace("limit: 24", "limit: 8").splitlines() if "kind:" not in line or "kind: sweep" in line) + "\n"
    run_campaign(write_campaign(tmp_path, sweep_only), progress=False)
    capsys.readouterr()
    assert main(["view", str(tmp_path / "out" / "heads")]) == 0
    page = tmp_path / "out" / "heads.view.html"
    assert capsys.readouterr().out.strip() == str(page)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())["experiments"]["heads"]
    rendered = render(page)
    assert rendered.console == []
    values = torch.tensor([float(c.attrs["data-value"]) for c in rendered.cells()], dtype=torch.float64)
    assert torch.allclose(values, torch.tensor(summary["grid"], dtype=torch.float64).flatten(), rtol=1e-5)
    assert "patching effect" in rendered.elements("title")[0].text  # the effect, as summary.json has it: the kind was read from campaign.json
    page.unlink()
    monkeypatch.chdir(tmp_path / "out" / "heads")
    assert main(["view", "."]) == 0 and page.is_file()  # beside the folder, never inside it
    capsys.readouterr()
    assert main(["view", ".", "--out", "grid.html"]) == 1
    assert "the page would land inside the dataset" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "out" / "heads").iterdir() if not p.name.startswith("part-")) == []


@needs_chromium
def test_view_of_top_contexts_shows_the_tokens_and_activations(tmp_path, capsys, monkeypatch):
    import shutil

    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    import shardlens as sl
    from shardlens.tracer.campaign import run_campaign
    from shardlens.tracer.demo import MODEL
    from tests.tracer.test_campaign_top_contexts import NEURONS, write_campaign

    shutil.copytree(MODEL, tmp_path / "checkpoint")  # the campaign names it relative to its own folder
    campaign = write_campaign(tmp_path, NEURONS)
    campaign.write_text(campaign.read_text().replace(str(MODEL), "checkpoint"))
    monkeypatch.chdir(tmp_path)
    run_campaign("campaign.yaml", progress=False, runner=sl.HookedModel.from_pretrained(MODEL))  # as `shardlens run campaign.yaml` here
    monkeypatch.chdir(tmp_path / "out")  # where "checkpoint" is no folder
    capsys.readouterr()
    assert main(["view", str(tmp_path / "out" / "neurons"), "--out", str(tmp_path / "neurons.html")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "neurons.html")
    table = pq.read_table(tmp_path / "out" / "neurons" / "top_contexts.parquet").to_pylist()
    first = [row for row in table if (row["hook"], row["feature"]) == (table[0]["hook"], table[0]["feature"])]
    rendered = render(tmp_path / "neurons.html")
    assert rendered.console == []
    tokenizer = AutoTokenizer.from_pretrained(MODEL)  # the model the parts record: a local folder
    spans = rendered.elements("span", data_value=None)
    assert [s.text for s in spans] == [tokenizer.decode([i]) for row in first for i in row["tokens"]]
    shown = [s for s in spans if s.attrs["data-value"] != "NaN"]  # the activating tokens: tokens[pos - start]
    assert [(int(s.attrs["data-row"]), int(s.attrs["data-col"])) for s in shown] == [(i, r["pos"] - r["start"]) for i, r in enumerate(first)]
    assert [float(s.attrs["data-value"]) for s in shown] == pytest.approx([row["activation"] for row in first], rel=1e-5)
    options = [e.text for e in rendered.elements("option")]
    assert options[0] == f"{first[0]['hook']} feature {first[0]['feature']}" and len(options) == len({(r["hook"], r["feature"]) for r in table})


@needs_chromium
def test_view_of_a_cache_dataset_shows_one_examples_patterns(tmp_path, capsys):
    import torch

    import shardlens as sl

    pattern = torch.rand(3, 2, 4, 4, generator=torch.Generator().manual_seed(0))  # [batch, head, q, k]
    sl.ActivationCache({"blocks.0.attn.hook_pattern": pattern, "blocks.0.hook_resid_post": torch.zeros(3, 4, 8)}).to_parquet(tmp_path / "cache")
    assert main(["view", str(tmp_path / "cache"), "--example", "2"]) == 0
    page = tmp_path / "cache.view.html"
    assert capsys.readouterr().out.strip() == str(page)
    rendered = render(page)
    assert rendered.console == []
    values = torch.tensor([float(c.attrs["data-value"]) for c in rendered.cells()]).reshape(2, 4, 4)
    assert torch.allclose(values, pattern[2], rtol=1e-5)
    assert rendered.elements("title")[0].text == "attention patterns (example 2)"
    assert main(["view", str(tmp_path / "cache"), "--example", "7"]) == 1
    assert "holds no example 7" in capsys.readouterr().err


def test_view_refuses_a_folder_it_cannot_view(tmp_path, capsys):
    import torch

    import shardlens as sl

    sl.ActivationCache({"blocks.0.hook_resid_post": torch.zeros(1, 2, 3)}).to_parquet(tmp_path / "resid")
    assert main(["view", str(tmp_path / "resid")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"shardlens view: error: {tmp_path / 'resid'} is not a dataset shardlens can view: expected")
    assert "hook=blocks.<L>.attn.hook_pattern/" in err and not (tmp_path / "resid.view.html").exists()


# test_status's small campaign, and an activations experiment: every kind of task reports
PROGRESS = SMALL.replace("output:", "  - {name: sae, kind: activations, points: blocks.0.hook_resid_post, shard_rows: 64}\noutput:")


def test_json_progress_is_one_object_per_line_on_stderr_and_quiet_is_silent(tmp_path, capsys):
    from shardlens.tables.datasets import read_manifest
    from tests.tracer.test_campaign import write_campaign

    path = write_campaign(tmp_path, PROGRESS)
    assert main(["--json", "run", str(path)]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("small: 6 units (6 run now) in ")  # stdout: the command's own output, no bar, no event
    events = [json.loads(line) for line in err.splitlines()]  # every line of stderr is one JSON object
    tasks = {}
    for event in events:
        tasks.setdefault((event["task"], event["desc"]), []).append(event)
    rows = read_manifest(tmp_path / "out" / "sae").spec.rows
    assert list(tasks) == [("load", "loading 2 stages"), ("campaign", "small"), ("write", "resid: activations"), ("write", "sae: dataset")]
    for (task, _), unit, total in zip(tasks, ["stage", "unit", "example", "row"], [2, 6, 16, rows]):
        seen = tasks[task, _]
        assert seen[0]["event"] == "start" and seen[-1]["event"] == "end" and seen[-1]["ok"] is True
        assert {e["unit"] for e in seen} == {unit} and {e["total"] for e in seen} == {total}
        assert seen[0]["done"] == 0 and seen[-2] == {**seen[-2], "event": "progress", "done": total} and seen[-1]["done"] == total
        assert all(a["done"] <= b["done"] for a, b in zip(seen, seen[1:]))
    ends = [(e["task"], e["desc"]) for e in events if e["event"] == "end"]
    assert ends == [("load", "loading 2 stages"), ("write", "resid: activations"), ("write", "sae: dataset"), ("campaign", "small")]

    assert main(["--json", "run", str(path)]) == 0  # resumed: every unit done before this run
    campaign = [json.loads(line) for line in capsys.readouterr().err.splitlines() if '"campaign"' in line]
    assert [(e["event"], e["done"], e["total"], e["rate"]) for e in campaign] == [("start", 6, 6, None), ("end", 6, 6, None)]
    for argv in (["--quiet", "run", str(path)], ["run", "--quiet", str(path)]):
        assert main(argv) == 0
        assert capsys.readouterr().err == ""
    assert main(["run", str(path)]) == 0  # by default: bars
    err = capsys.readouterr().err
    assert "loading 2 stages: 100%" in err and "stage/s]" in err and "small: 100%" in err and "6/6" in err


HUB_ID = "no-such-org/no-such-model"
EXPECTED = "a folder of Parquet parts, hook=<hook point>/<part>.parquet (as cache.to_parquet, sl.ParquetSink and a campaign's extract experiments write)"


def _not_a_dataset(tmp_path):
    """Folders and files that are not shardlens datasets, by name."""
    import torch

    import shardlens as sl

    (tmp_path / "notes").mkdir()
    for name in ("a.txt", "b.txt", "c.txt", "d.txt"):
        (tmp_path / "notes" / name).write_text("x")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "summary.json").write_text("{}")
    sl.ActivationCache({"blocks.0.hook_resid_post": torch.zeros(1, 2, 3)}).to_parquet(tmp_path / "out" / "resid")
    (tmp_path / "sae").mkdir()
    (tmp_path / "sae" / "manifest.json").write_text("{}")
    (tmp_path / "sae" / "data-00000-of-00001.arrow").write_bytes(b"x")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "_done").mkdir()
    (tmp_path / "file.parquet").write_bytes(b"x")


@pytest.mark.parametrize("argv, message", [
    (["hooks", "/no/such/dir"], "/no/such/dir: no such folder, and not a Hugging Face hub id either (a hub id looks like 'org/name')"),
    (["hooks", HUB_ID], f"{HUB_ID}: no such folder here, and the Hugging Face hub id '{HUB_ID}' is not in the local cache and cannot be "
                        "downloaded: downloads are off (HF_HUB_OFFLINE is set)"),
    (["hooks", "TMP/notes"], "TMP/notes: a folder without config.json: expected a checkpoint folder (config.json and safetensors "
                             "weights, as save_pretrained writes them)"),
    (["inspect", "/no/such/dataset"], "/no/such/dataset: no such file or folder"),
    (["inspect", "TMP/file.parquet"], f"TMP/file.parquet: a file, not a shardlens dataset: expected {EXPECTED}"),
    (["inspect", "TMP/notes"], f"TMP/notes: not a shardlens dataset: expected {EXPECTED}; found a.txt, b.txt, c.txt and 1 more"),
    (["inspect", "TMP/out"], f"TMP/out: not a shardlens dataset: expected {EXPECTED}; found datasets in its subfolders resid/: inspect one of those"),
    (["inspect", "TMP/sae"], f"TMP/sae: not a shardlens dataset: expected {EXPECTED}; found an activations dataset (manifest.json and "
                             "Arrow files): read it with datasets.load_from_disk"),
    (["inspect", "TMP/empty"], f"TMP/empty: not a shardlens dataset: expected {EXPECTED}; found no Parquet parts in it"),
])
def test_first_errors_say_what_was_expected(argv, message, tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # as on a machine without the network
    _not_a_dataset(tmp_path)
    argv = [a.replace("TMP", str(tmp_path)) for a in argv]
    message = message.replace("TMP", str(tmp_path))
    assert main(argv) == 1
    assert capsys.readouterr().err == f"shardlens {argv[0]}: error: {message}\n"
    assert main(["--json", *argv]) == 1
    assert json.loads(capsys.readouterr().err) == {"event": "error", "command": argv[0], "message": message}


def test_quiet_and_json_last_one_command_and_no_flag_keeps_the_callers_setting(monkeypatch):
    from huggingface_hub import utils as hub
    from transformers.utils import logging

    import shardlens.progress
    import shardlens.tracer.cli as cli

    seen = []
    monkeypatch.setattr(cli, "_families", lambda args: seen.append((shardlens.progress.mode(), hub.are_progress_bars_disabled())) or 0)
    hub_before, transformers_before = hub.are_progress_bars_disabled(), logging.is_progress_bar_enabled()
    hub.enable_progress_bars()
    logging.enable_progress_bar()
    try:
        assert main(["--quiet", "families"]) == 0 and main(["--json", "families"]) == 0
        assert not hub.are_progress_bars_disabled() and logging.is_progress_bar_enabled()  # as before the commands
        with shardlens.progress.using("json"):
            assert main(["families"]) == 0
    finally:
        (hub.disable_progress_bars if hub_before else hub.enable_progress_bars)()
        (logging.enable_progress_bar if transformers_before else logging.disable_progress_bar)()
    assert seen == [("quiet", True), ("json", True), ("json", False)]  # no flag: the caller's mode, the hub's bars untouched


def test_json_mode_turns_what_libraries_print_on_stderr_into_events(monkeypatch, capsys):
    import logging

    import shardlens.tracer.cli as cli

    library = logging.getLogger("library")
    before = logging.StreamHandler()  # made before the command, on the stderr of then: as transformers makes its own
    library.addHandler(before)

    def noisy(args):
        during = logging.StreamHandler()  # made during the command: as Ray, imported by the command, makes its own
        library.addHandler(during)
        library.warning("Token authentication is enabled for this Ray cluster.")
        library.removeHandler(during)
        print("a deprecated argument\n  in a library", file=sys.stderr, end="")  # two lines, the last unfinished
        return 0

    monkeypatch.setattr(cli, "_families", noisy)
    try:
        assert main(["--json", "families"]) == 0
        events = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
        assert [(e["event"], e["message"]) for e in events] == [
            ("log", "Token authentication is enabled for this Ray cluster."), ("log", "Token authentication is enabled for this Ray cluster."),
            ("log", "a deprecated argument"), ("log", "  in a library"),
        ]
        assert before.stream is sys.stderr  # given back after the command
        monkeypatch.setattr(cli, "_families", lambda args: print("plain", file=sys.stderr) or 0)
        assert main(["families"]) == 0 and capsys.readouterr().err == "plain\n"  # without --json, stderr as it is
    finally:
        library.removeHandler(before)
