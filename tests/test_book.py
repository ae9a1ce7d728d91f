"""The book builds with warnings as errors (the `html` fixture, in conftest.py), and every chapter page shows its
outputs and a Colab link."""

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
REPO_URL = yaml.safe_load((ROOT / "_config.yml").read_text())["repository"]["url"]
CHAPTERS = sorted((ROOT / "chapters").glob("*.ipynb"))


def test_intro_page_is_built(html):
    assert (html / "book" / "intro.html").exists()


@pytest.mark.parametrize("nb", CHAPTERS, ids=lambda p: p.stem)
def test_chapter_page_links_to_colab_and_shows_outputs(html, nb):
    page = (html / "chapters" / f"{nb.stem}.html").read_text()
    github = REPO_URL.removeprefix("https://github.com/")
    assert f"https://colab.research.google.com/github/{github}/blob/main/chapters/{nb.name}" in page
    assert 'class="cell_output' in page
