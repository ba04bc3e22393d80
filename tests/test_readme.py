"""README.md: its Python examples run as written (blocks fenced ```python; ```python
illustrative marks one that needs files the test does not have), and its links to the
documentation lead to files that exist."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README.md has no python examples"
    monkeypatch.chdir(tmp_path)  # what the blocks write lands here
    namespace: dict = {}  # blocks run in order, like a reader following along
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)


def test_readme_links_lead_to_files():
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README.read_text())
    local = [link for link in links if "://" not in link]
    assert any(link.startswith("docs/") for link in local), "README.md links to no page of docs/"
    missing = [link for link in local if not (ROOT / link).exists()]
    assert not missing, f"README.md links to files that do not exist: {missing}"
