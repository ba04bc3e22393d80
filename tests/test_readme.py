"""The Python examples in README.md run as written (blocks fenced ```python; ```python
illustrative marks one that needs files the test does not have)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README.md has no python examples"
    namespace: dict = {}  # blocks run in order, like a reader following along
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
