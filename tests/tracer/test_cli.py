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
