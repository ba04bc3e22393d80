"""Every script in examples/ runs to the end."""

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.py"))


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(script):
    subprocess.run([sys.executable, str(script)], check=True, capture_output=True, timeout=120)
