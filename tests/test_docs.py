"""The documentation site: every ```python and ```bash block of docs/ runs, page by page;
the family table of docs/models.md is what the checks find now; and the site builds with
`mkdocs build --strict` (broken links, bad references and docstring warnings fail it).

Blocks of one page run in order, like a reader following along, in a temporary working
directory: python blocks in one namespace, and each line of a bash block as a `shardlens`
command (through its main(), so a command that fails fails the test). A block fenced
```python illustrative or ```bash illustrative is shown, not run: it needs a cluster, a GPU,
a running service, the network or a package the tests do not have.
"""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
BLOCK = re.compile(r"^```(python|bash)\n(.*?)^```", flags=re.S | re.M)
PAGES = sorted(p for p in DOCS.rglob("*.md") if BLOCK.search(p.read_text()))
SITE_PAGES = [
    "index.html", "getting-started/index.html", "concepts/index.html", "deploy/index.html", "models/index.html",
    "guides/patching-sweep/index.html", "guides/attribution/index.html", "guides/campaigns/index.html",
    "guides/service/index.html", "guides/views/index.html", "migrating/transformerlens/index.html", "migrating/nnsight/index.html",
    "reference/hooks/index.html", "reference/ops/index.html", "reference/tracer/index.html", "reference/analysis/index.html",
    "reference/tables/index.html", "reference/campaigns/index.html", "reference/service/index.html", "assets/data-flow.svg",
]


def blocks_of(page: Path) -> list[tuple[str, int, str]]:
    """(language, line of the block's first line, its code) of each ```python and ```bash
    block of the page, in order."""
    text = page.read_text()
    return [(match.group(1), text.count("\n", 0, match.start(2)), match.group(2)) for match in BLOCK.finditer(text)]


def run_commands(page: Path, line: int, code: str, capsys) -> None:
    """Each line of a bash block as `shardlens ...`, through the command line's main()."""
    from shardlens.tracer.cli import main

    for offset, command in enumerate(code.splitlines()):
        argv = shlex.split(command, comments=True)
        if not argv:
            continue
        where = f"{page.relative_to(DOCS)}:{line + offset + 1}"
        assert argv[0] == "shardlens", f"{where}: a bash block runs shardlens commands only; fence it ```bash illustrative"
        status = main(argv[1:])
        assert status == 0, f"{where}: `{command.strip()}` exited {status}: {capsys.readouterr().err[-2000:]}"


@pytest.mark.filterwarnings("ignore:HookedTransformer is deprecated:DeprecationWarning")  # migrating/transformerlens.md
@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(DOCS)) for p in PAGES])
def test_page_blocks_run(page, tmp_path, monkeypatch, request, capsys):
    blocks = blocks_of(page)
    if any('backend="ray"' in code or "backend: ray" in code for _, _, code in blocks):
        request.getfixturevalue("ray_session")  # one local Ray instance for the session, as the other tests use
    monkeypatch.chdir(tmp_path)  # what the blocks write lands here
    namespace: dict = {"__name__": "__docs__"}
    for language, line, code in blocks:
        if language == "bash":
            run_commands(page, line, code, capsys)
        else:
            exec(compile("\n" * line + code, str(page), "exec"), namespace)  # tracebacks name the page's own lines


def test_the_family_table_is_what_the_checks_find_now(tmp_path):
    from tests.family_table import PAGE, family_rows, page_table, render

    assert page_table(PAGE.read_text()) == render(family_rows(tmp_path)), (
        "docs/models.md's family table is out of date: run .venv/bin/python -m tests.family_table --write"
    )


def test_the_site_builds_strictly(tmp_path):
    site = tmp_path / "site"
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=240, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stderr[-4000:]
    missing = [page for page in SITE_PAGES if not (site / page).is_file()]
    assert not missing, f"the site lacks {missing}"
    assert 'id="shardlens.Tracer"' in (site / "reference/tracer/index.html").read_text()  # the API reference was rendered
