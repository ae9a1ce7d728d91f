"""The built book in a real browser: headless Chromium opens the front page and every chapter page, the DOM
it renders must hold the chapter's code cells, stored outputs, plots (real images of the book's _images/)
and Colab link, and a screenshot of each page (saved under _build/screenshots/) must not be blank. Skipped
where Chromium is not installed, except where MINI_INFER_REQUIRE_BROWSER=1 (CI's `.ci/run` installs
Chromium from Debian's packages and sets it, so a broken install fails instead of skipping):

    apt-get install -y chromium && python -m pytest tests/test_browser.py
"""

import os
import re
import shutil
import subprocess
from pathlib import Path

import nbformat
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted((ROOT / "chapters").glob("*.ipynb"))
SHOTS = ROOT / "_build" / "screenshots"
CHROMIUM = shutil.which("chromium")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
]

REQUIRED = os.environ.get("MINI_INFER_REQUIRE_BROWSER") == "1"

pytestmark = pytest.mark.skipif(
    CHROMIUM is None and not REQUIRED,
    reason="no chromium on PATH (Debian: apt-get install chromium)",
)


@pytest.fixture(autouse=True)
def chromium_is_installed_where_required():
    if CHROMIUM is None:  # (only where required: the tests are skipped otherwise)
        pytest.fail("MINI_INFER_REQUIRE_BROWSER=1 but no chromium on PATH")


def chromium(profile: Path, *args: str) -> str:
    """Chromium's stdout, run with a fresh profile folder."""
    run = subprocess.run(
        [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout


def count(dom: str, css_class: str) -> int:
    return len(re.findall(rf'class="[^"]*\b{css_class}\b', dom))


def plots(dom: str, html: Path) -> list[str]:
    """The images the page shows from the book's _images/, each checked to be a real picture."""
    found = re.findall(r'<img[^>]*src="\.\./(_images/[^"]+)"', dom)
    for plot in found:
        width, height = Image.open(html / plot).size
        assert width > 100 and height > 100, plot
    return found


def assert_screenshot_shows_a_page(page: Path, shot: Path, profile: Path) -> None:
    shot.parent.mkdir(parents=True, exist_ok=True)
    shot.unlink(missing_ok=True)
    chromium(profile, f"--screenshot={shot}", "--window-size=1280,2000", page.as_uri())
    pixels = Image.open(shot).convert("L").getdata()
    inked = sum(p < 200 for p in pixels) / len(pixels)
    assert inked > 0.01, (
        f"{shot.name}: {inked:.2%} of the pixels are not near-white; is the page blank?"
    )


def test_front_page_renders(html, tmp_path):
    page = html / "book" / "intro.html"
    dom = chromium(tmp_path / "profile", "--dump-dom", page.as_uri())
    assert "Mini-Infer" in dom and "<table" in dom
    assert any(plot.startswith("_images/race_") for plot in plots(dom, html))
    assert_screenshot_shows_a_page(page, SHOTS / "intro.png", tmp_path / "profile")


@pytest.mark.parametrize("nb", CHAPTERS, ids=lambda p: p.stem)
def test_chapter_page_renders_code_outputs_plots_and_colab_link(html, nb, tmp_path):
    page = html / "chapters" / f"{nb.stem}.html"
    assert page.exists(), f"{page.name} was not built: is {nb.name} in _toc.yml?"
    dom = chromium(tmp_path / "profile", "--dump-dom", page.as_uri())
    cells = [
        c
        for c in nbformat.read(nb, as_version=4).cells
        if c.cell_type == "code" and c.source.strip()
    ]
    assert count(dom, "cell_input") >= len(cells)
    assert count(dom, "cell_output") >= sum(bool(c.outputs) for c in cells)
    assert len(plots(dom, html)) >= sum(
        "image/png" in o.get("data", {}) for c in cells for o in c.outputs
    )
    assert (
        f"colab.research.google.com/github/mini-infer/mini-infer/blob/main/chapters/{nb.name}"
        in dom
    )
    assert_screenshot_shows_a_page(page, SHOTS / f"{nb.stem}.png", tmp_path / "profile")
