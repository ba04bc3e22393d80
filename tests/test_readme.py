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


def test_the_family_table_is_what_the_checks_find_now(tmp_path):
    from tests.family_table import family_rows, readme_table, render

    assert readme_table(README.read_text()) == render(family_rows(tmp_path)), (
        "README.md's family table is out of date: run .venv/bin/python -m tests.family_table --write"
    )
