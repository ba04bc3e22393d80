import subprocess
import sys

import pytest

from shardlens.tracer.cli import main


def test_demo_lists_hook_points_and_caches_residuals_and_gradients(capsys):
    assert main(["demo", "--layers", "3"]) == 0
    out = capsys.readouterr().out
    assert "3 layers, 42 hook points" in out
    assert "  blocks.2.attn.hook_pattern\n" in out
    for layer in range(3):
        assert f"blocks.{layer}.hook_resid_post: [2, 8, 32] float32" in out
        assert f"blocks.{layer}.hook_resid_post_grad: [2, 8, 32] float32" in out
    assert "loss = " in out


def test_help_names_the_commands():
    out = subprocess.run([sys.executable, "-m", "shardlens.tracer.cli", "--help"], capture_output=True, text=True, check=True).stdout
    assert "demo" in out and "usage: shardlens" in out


def test_unknown_command_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["dmeo"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'dmeo'" in capsys.readouterr().err
