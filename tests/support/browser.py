"""Headless Chromium, offline: open a page from the file system with every host name unresolvable, so a
page that needs the internet shows it (blank charts, unstyled HTML). `.ci/run` installs Debian's
`chromium`; without it these tests skip, saying so."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

ARTIFACTS_ENV = "USERVALUE_TEST_ARTIFACTS"  # where screenshots are kept (default: the test's tmp_path)
# Any request that leaves the machine fails: the page is seen as a user without internet sees it.
OFFLINE = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
           "--host-resolver-rules=MAP * ~NOTFOUND", "--virtual-time-budget=8000"]


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("no headless browser: install Debian's `chromium` (.ci/run does) to check the pages render offline")


def _run(args: list[str], tmp: Path) -> subprocess.CompletedProcess[str]:
    # A profile per call: parallel or leftover browsers never share state.
    profile = tmp / f"chromium-profile-{os.getpid()}"
    return subprocess.run([chromium(), *OFFLINE, f"--user-data-dir={profile}", *args], capture_output=True,
                          text=True, timeout=120, check=True)


def dump_dom(page: Path, tmp: Path) -> str:
    """The page's DOM after its scripts ran (charts drawn as <svg> or <canvas>)."""
    return _run(["--dump-dom", page.resolve().as_uri()], tmp).stdout


def screenshot(page: Path, tmp: Path, name: str, size: str = "1280,2000") -> Path:
    """A PNG of the page, kept under USERVALUE_TEST_ARTIFACTS (or `tmp`)."""
    folder = Path(os.environ.get(ARTIFACTS_ENV) or tmp)
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"{name}.png"
    _run([f"--window-size={size}", f"--screenshot={out}", page.resolve().as_uri()], tmp)
    assert out.is_file() and out.stat().st_size > 0, f"chromium wrote no screenshot of {page}"
    return out


def coloured_share(png: Path) -> float:
    """Share of pixels that are not white or near-white: a blank page is ~0, a styled page is not."""
    from PIL import Image

    with Image.open(png) as image:
        pixels = image.convert("L").getdata()
        return sum(1 for p in pixels if p < 235) / len(pixels)


class _Assets(HTMLParser):
    """Every asset a page loads: <script src>, <link href> (stylesheets, icons), <img src>, <iframe src>."""

    def __init__(self) -> None:
        super().__init__()
        self.assets: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        key = {"script": "src", "img": "src", "iframe": "src", "source": "src", "link": "href"}.get(tag)
        if key and values.get(key):
            self.assets.append(values[key] or "")


def assets(html: str) -> list[str]:
    parser = _Assets()
    parser.feed(html)
    return parser.assets


def remote_assets(html: str) -> list[str]:
    return [url for url in assets(html) if re.match(r"(?i)^(https?:)?//", url)]


def missing_local_assets(html: str, page: Path) -> list[str]:
    """Local assets the page names that are not on disk beside it (a favicon is not content: GE's
    result pages name theirs one folder too high, which no browser minds)."""
    local = [url for url in assets(html) if not re.match(r"(?i)^([a-z]+:|//|#)", url) and not url.endswith(".ico")]
    return [url for url in local if not (page.parent / url.split("?")[0].split("#")[0]).is_file()]
