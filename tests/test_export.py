"""The exporter: chapters' marked cells become package modules, and --check catches any drift."""

import importlib.util
from pathlib import Path

import jupytext
import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("export", ROOT / "tools" / "export.py")
export = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(export)


def write_chapter(root: Path, name: str, cells: list[str]) -> None:
    nb = jupytext.reads("\n\n".join(f"# %%\n{c}" for c in cells), fmt="py:percent")
    (root / "chapters").mkdir(exist_ok=True)
    jupytext.write(nb, root / "chapters" / name, fmt="py:percent")


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    (tmp_path / "mini_infer").mkdir()
    write_chapter(
        tmp_path,
        "01_a.py",
        [
            "#| export mini_infer.things\nimport math",
            "print('not exported')",
            "#| export mini_infer.things\ndef area(r):\n    return math.pi * r * r",
            "#| export mini_infer.sub.more\nX = 1",
        ],
    )
    return tmp_path


def test_export_writes_marked_cells_in_order_under_a_header(repo):
    assert export.export(repo) == []
    text = (repo / "mini_infer" / "things.py").read_text()
    assert text.splitlines()[0] == export.HEADER.format(chapter="chapters/01_a.py").strip()
    assert "import math" in text and "def area" in text and "not exported" not in text
    assert text.index("import math") < text.index("def area")
    assert "#| export" not in text
    assert (repo / "mini_infer" / "sub" / "more.py").read_text().endswith("X = 1\n")


def test_check_passes_after_export_and_fails_on_a_hand_edit(repo):
    export.export(repo)
    assert export.export(repo, check=True) == []
    module = repo / "mini_infer" / "things.py"
    module.write_text(module.read_text() + "# edited by hand\n")
    problems = export.export(repo, check=True)
    assert problems == ["mini_infer/things.py differs from what chapters/01_a.py exports"]
    assert export.main(["--check", "--root", str(repo)]) == 1
    assert export.main(["--root", str(repo)]) == 0
    assert export.export(repo, check=True) == []


def test_check_reports_a_missing_module(repo):
    problems = export.export(repo, check=True)
    assert any("mini_infer/things.py" in p for p in problems)


def test_a_module_no_chapter_exports_is_stale(repo):
    export.export(repo)
    write_chapter(repo, "01_a.py", ["#| export mini_infer.things\nY = 2"])
    assert export.export(repo, check=True) == [
        "mini_infer/things.py differs from what chapters/01_a.py exports",
        "mini_infer/sub/more.py is generated but no chapter exports it any more",
    ]
    export.export(repo)
    assert not (repo / "mini_infer" / "sub" / "more.py").exists()


def test_a_later_chapter_extends_a_module_and_the_header_names_both(repo):
    """A module built by one chapter and extended by a later one: the earlier chapter's cells first, both
    chapters in the header, and the check still fails on a hand edit."""
    write_chapter(
        repo, "02_b.py", ["#| export mini_infer.things\ndef volume(r):\n    return area(r) * r"]
    )
    assert export.export(repo) == []
    text = (repo / "mini_infer" / "things.py").read_text()
    assert (
        text.splitlines()[0]
        == export.HEADER_MANY.format(chapters="chapters/01_a.py and chapters/02_b.py").strip()
    )
    assert text.index("import math") < text.index("def area") < text.index("def volume")
    module = repo / "mini_infer" / "things.py"
    module.write_text(text.replace("* r\n", "* r * 1\n"))
    assert export.export(repo, check=True) == [
        "mini_infer/things.py differs from what chapters/01_a.py and chapters/02_b.py export"
    ]
    # the modules only one chapter exports keep their one-chapter header
    more = (repo / "mini_infer" / "sub" / "more.py").read_text()
    assert more.startswith(export.HEADER.format(chapter="chapters/01_a.py"))


@pytest.mark.parametrize("target", ["numpy.linalg", "mini_infer", "mini_infer.bad-name"])
def test_exports_only_into_the_package(repo, target):
    write_chapter(repo, "02_b.py", [f"#| export {target}\nZ = 3"])
    with pytest.raises(export.ExportError, match="name a module inside mini_infer"):
        export.export(repo)


def test_the_package_is_what_the_chapters_export():
    assert export.export(ROOT, check=True) == []


def test_every_module_but_init_files_is_generated():
    modules = {
        p.relative_to(ROOT) for p in (ROOT / "mini_infer").rglob("*.py") if p.name != "__init__.py"
    }
    assert modules and modules == export.generated_files(ROOT)
