import json
import subprocess
import sys

import pytest

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
