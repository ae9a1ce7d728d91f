"""Every chapter is a synced .py/.ipynb pair, in the table of contents, with its outputs stored."""

import re
from pathlib import Path

import jupytext
import nbformat
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted((ROOT / "chapters").glob("*.py"))
CONFIG = yaml.safe_load((ROOT / "_config.yml").read_text())
TOC = yaml.safe_load((ROOT / "_toc.yml").read_text())


def chapter_id(path: Path) -> str:
    return path.stem


def test_there_are_chapters():
    assert CHAPTERS


@pytest.mark.parametrize("py", CHAPTERS, ids=chapter_id)
def test_pair_is_in_sync(py: Path):
    nb = py.with_suffix(".ipynb")
    assert nb.exists(), f"{py.name} has no notebook: run `jupytext --sync {py}`"
    as_py = jupytext.writes(jupytext.read(nb), fmt="py:percent")
    assert as_py == py.read_text(), (
        f"{nb.name} and {py.name} differ: edit the .py, then `jupytext --sync` and re-execute"
    )


@pytest.mark.parametrize("py", CHAPTERS, ids=chapter_id)
def test_checked_cells_have_stored_outputs(py: Path):
    # nbval silently passes a tagged cell that has no stored output, so it would compare nothing.
    nb = nbformat.read(py.with_suffix(".ipynb"), as_version=4)
    for i, cell in enumerate(nb.cells):
        if "nbval-check-output" in cell.get("metadata", {}).get("tags", []):
            assert cell.execution_count and cell.outputs, (
                f"{py.name}: tagged cell {i} has no stored output"
            )


@pytest.mark.parametrize("py", CHAPTERS, ids=chapter_id)
def test_chapter_is_executed(py: Path):
    nb = nbformat.read(py.with_suffix(".ipynb"), as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code" and c.source.strip()]
    assert all(c.execution_count for c in code), (
        f"{py.name}: run every cell before committing the notebook"
    )


@pytest.mark.parametrize("py", CHAPTERS, ids=chapter_id)
def test_first_code_cell_installs_from_the_book_repository_on_colab(py: Path):
    nb = jupytext.read(py)
    first = next(c for c in nb.cells if c.cell_type == "code")
    assert '"google.colab" in sys.modules' in first.source
    assert f"git+{CONFIG['repository']['url']}" in first.source
    assert "!pip" not in first.source


def toc_files(entries) -> set[str]:
    files = set()
    for entry in entries:
        if "file" in entry:
            files.add(entry["file"])
        files |= toc_files(
            entry.get("chapters", []) + entry.get("sections", []) + entry.get("parts", [])
        )
    return files


def test_every_chapter_is_in_the_table_of_contents():
    listed = toc_files(TOC["parts"])
    assert {f"chapters/{p.stem}.ipynb" for p in CHAPTERS} <= listed
    assert all((ROOT / f).exists() for f in listed | {TOC["root"] + ".md"})


# Test files about the whole project rather than one chapter's code (conftest.CHAPTER_OF_TEST_FILE maps the rest).
PROJECT_WIDE = {
    "test_architecture.py",
    "test_book.py",
    "test_browser.py",
    "test_chapters.py",
    "test_export.py",
    "test_lint.py",
    "test_readme.py",
    "test_store_outputs.py",
}


def test_every_test_file_names_its_chapter():
    """`pytest -m chapterN` must find every test of chapter N: a new test file gets a chapter in
    conftest.CHAPTER_OF_TEST_FILE, or is project-wide."""
    import conftest

    files = {p.name for p in Path(__file__).parent.glob("test_*.py")}
    assert files - PROJECT_WIDE - set(conftest.CHAPTER_OF_TEST_FILE) == set()
    assert set(conftest.CHAPTER_OF_TEST_FILE.values()) <= set(range(1, conftest.CHAPTERS + 1))
    assert len(CHAPTERS) <= conftest.CHAPTERS  # every chapter has a registered mark


@pytest.mark.parametrize("py", CHAPTERS, ids=chapter_id)
def test_section_numbers_follow_the_chapter(py: Path):
    """Chapter N's title is `# N. Title`; once a chapter numbers its sections, every `## ` heading is
    `## N.M Title` and every `### ` heading `### N.M.K Title`, counted in order (a chapter numbers all of
    its sections or none)."""
    number = int(py.stem.split("_")[0])
    headings = []
    for cell in jupytext.read(py).cells:
        if cell.cell_type != "markdown":
            continue
        fenced = False  # a line starting with # inside a ``` block is code, not a heading
        for line in cell.source.splitlines():
            if line.startswith("```"):
                fenced = not fenced
            elif not fenced and re.match(r"#+ \S", line):
                headings.append(line)
    assert headings[0].startswith(f"# {number}. "), f"{py.name}: title {headings[0]!r}"
    sections = [h for h in headings if h.startswith(("## ", "### "))]
    numbered = [h for h in sections if h.split()[1][0].isdigit()]
    if not numbered:
        return
    expected, m, k = [], 0, 0
    for h in sections:
        level, title = h.split(" ", 1)
        title = title.split(" ", 1)[1] if title[0].isdigit() else title
        if level == "##":
            m, k = m + 1, 0
            expected.append(f"## {number}.{m} {title}")
        else:
            k += 1
            expected.append(f"### {number}.{m}.{k} {title}")
    assert sections == expected, f"{py.name}: number every section as N.M / N.M.K, in order"
