"""A real browser for the tests of HTML views: headless Chromium (Debian's /usr/bin/chromium)
renders a file; the tests read the DOM it dumps, its console, and a screenshot."""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Optional

import pytest

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--enable-logging=stderr", "--v=0")
needs_chromium = pytest.mark.skipif(not CHROMIUM.exists(), reason="no /usr/bin/chromium (Debian's chromium package; .ci/run installs it)")


@dataclass(frozen=True)
class Element:
    """One element of the dumped DOM: its tag, attributes and text (its own and its children's)."""

    tag: str
    attrs: dict
    text: str


@dataclass(frozen=True)
class Rendered:
    """What Chromium made of a page: the DOM after its scripts ran, the console messages
    (uncaught exceptions among them) and a screenshot."""

    dom: str
    console: list
    screenshot: Path

    def elements(self, selector: Optional[str] = None, **attrs: str) -> list:
        """The elements with this tag (None: any) having all these attributes (value None: any value;
        names with _ for -: data_value)."""
        wanted = {k.replace("_", "-"): v for k, v in attrs.items()}
        return [e for e in _Elements.of(self.dom) if (selector is None or e.tag == selector)
                and all(k in e.attrs and (v is None or e.attrs[k] == v) for k, v in wanted.items())]

    def cells(self) -> list:
        """The heatmap cells: every element with data-value."""
        return self.elements(data_value=None)


class _Elements(HTMLParser):
    VOID = {"meta", "br", "img", "input", "link", "hr", "col", "source", "wbr"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.found: list = []
        self.open: list = []  # [tag, attrs, text parts]

    @classmethod
    def of(cls, dom: str) -> list:
        parser = cls()
        parser.feed(dom)
        parser.close()
        return parser.found

    def handle_starttag(self, tag, attrs):
        if tag in self.VOID:
            self.found.append(Element(tag, dict(attrs), ""))
        else:
            self.open.append([tag, dict(attrs), []])

    def handle_endtag(self, tag):
        while self.open:
            name, attrs, parts = self.open.pop()
            text = "".join(parts)
            self.found.append(Element(name, attrs, text))
            if self.open:
                self.open[-1][2].append(text)
            if name == tag:
                break

    def handle_data(self, data):
        if self.open:
            self.open[-1][2].append(data)


def _chromium(url: str, *flags: str) -> subprocess.CompletedProcess:
    """Run Chromium once in a session of its own: on a timeout the whole group goes (its zygote
    and renderers too, which outlive a killed main process)."""
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        command = [str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}", *flags, url]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            out, err = process.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            raise
        return subprocess.CompletedProcess(command, process.returncode, out, err)


def render(path: Path, fragment: str = "") -> Rendered:
    """Open `path` (with `#fragment`, when given) in headless Chromium: the DOM its scripts
    leave, the console messages, and a 1200x900 screenshot next to the page."""
    path = Path(path).resolve()
    url = path.as_uri() + (f"#{fragment}" if fragment else "")
    dumped = _chromium(url, "--dump-dom")
    assert dumped.returncode == 0, dumped.stderr[-2000:]
    console = [line for line in dumped.stderr.splitlines() if ":CONSOLE:" in line or '"Uncaught ' in line]
    screenshot = path.with_name(path.stem + (f"-{fragment.replace('=', '-').replace('&', '-')}" if fragment else "") + ".png")
    shot = _chromium(url, f"--screenshot={screenshot}", "--window-size=1200,900")
    assert shot.returncode == 0 and screenshot.exists(), shot.stderr[-2000:]
    return Rendered(dumped.stdout, console, screenshot)


def not_blank(screenshot: Path) -> bool:
    """Whether a screenshot is a PNG with more than one colour in it."""
    import matplotlib.image

    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{screenshot} is not a PNG"
    pixels = matplotlib.image.imread(screenshot)
    return bool((pixels != pixels[0, 0]).any())
