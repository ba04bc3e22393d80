"""The layering of DESIGN.md: tables, hooks and sharding never import Ray."""

import subprocess
import sys


def test_lower_layers_do_not_import_ray():
    code = "import sys, shardlens, shardlens.tables, shardlens.hooks, shardlens.sharding; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
