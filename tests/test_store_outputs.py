"""tools/store_outputs.py: executed notebooks come home without noise, and only onto their own chapter."""

import importlib.util
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("store_outputs", ROOT / "tools" / "store_outputs.py")
store_outputs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(store_outputs)


def stderr(text: str):
    return nbformat.v4.new_output("stream", name="stderr", text=text)


def test_clean_drops_noise_and_checked_stderr_and_keeps_the_rest():
    plain = nbformat.v4.new_code_cell(
        "x",
        outputs=[
            stderr("Generating: 100%|##########| 8/8 [00:01<00:00, 6.1it/s]"),
            stderr("tqdm/auto.py:21: TqdmWarning: IProgress not found."),
            stderr("UserWarning: something a reader should see"),
            nbformat.v4.new_output("stream", name="stdout", text="42\n"),
        ],
    )
    checked = nbformat.v4.new_code_cell(
        "y",
        metadata={"tags": ["nbval-check-output"]},
        outputs=[stderr("any warning"), nbformat.v4.new_output("stream", text="ok\n")],
    )
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# t"), plain, checked])
    assert store_outputs.clean(nb) == ["UserWarning: something a reader should see"]
    assert [o["text"] for o in plain.outputs] == [
        "UserWarning: something a reader should see",
        "42\n",
    ]
    assert [o["text"] for o in checked.outputs] == ["ok\n"]


def test_a_notebook_whose_code_differs_from_its_chapter_is_not_stored(
    tmp_path, monkeypatch, capsys
):
    chapter = ROOT / "chapters" / "02_rmsnorm.ipynb"
    nb = nbformat.read(chapter, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell("print('not in the chapter')"))
    nbformat.write(nb, tmp_path / chapter.name)
    monkeypatch.setattr("sys.argv", ["store_outputs.py", str(tmp_path)])
    before = chapter.read_bytes()
    assert store_outputs.main() == 1
    assert chapter.read_bytes() == before and "skipped" in capsys.readouterr().err
