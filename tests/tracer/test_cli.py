import importlib
import json
import re
import subprocess
import sys

import pytest

from shardlens import ShardPlanError
from shardlens.tracer.cli import main


def test_demo_finds_induction_heads_in_layer_1(tmp_path, capsys):
    assert main(["demo", "--backend", "local", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "strongest induction head: layer 1" in out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["clean_logit_diff"] > 5 > summary["corrupt_logit_diff"]
    assert summary["top_head"]["layer"] == 1 and summary["atp_top_head"]["layer"] == 1
    assert (tmp_path / "heads.png").stat().st_size > 1000
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
    (["plan", "/no/such/model"], ShardPlanError, "no checkpoint folder at /no/such/model"),
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
    assert main(["verify", str(path), "--examples", "3"]) == 1
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
])
def test_help_of_the_campaign_checks(command, words, capsys):
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


@pytest.mark.parametrize("command, words", [
    ("serve", ("Start the tracing service", "--host", "--port", "status 2")),
    ("token", ("token: <token>", "config: - {name: \"NAME\", sha256: <hash>}", "not stored anywhere")),
])
def test_help_of_the_service_commands(command, words, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert exit_info.value.code == 0 and out.startswith(f"usage: shardlens {command}")
    assert all(word in out for word in words), out
