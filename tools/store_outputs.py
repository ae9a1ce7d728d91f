"""Put executed notebooks (e.g. from a GPU machine, tools/gpu_session.sh) into chapters/, without noise.

    python tools/store_outputs.py DIR [DIR/NN_name.ipynb ...]

Each notebook replaces chapters/<its name> after dropping the stderr a reader should not see: progress
bars, library warnings about the notebook front end, and any stderr in a cell tagged nbval-check-output
(nbval compares those cells' outputs on the CPU). Other stderr is kept and listed. The notebook's code
must still be the chapter's: the script fails when the pair differs (run `jupytext --sync` first).
"""

import argparse
import sys
from pathlib import Path

import jupytext
import nbformat

ROOT = Path(__file__).resolve().parents[1]
NOISE = (
    "TqdmWarning",
    "Converting and de-quantizing GGUF",
    "Profiler clears events",
    "it/s]",
    "s/it]",
)


def is_noise(output: dict, checked: bool) -> bool:
    if output.get("output_type") != "stream" or output.get("name") != "stderr":
        return False
    return checked or any(pattern in output["text"] for pattern in NOISE)


def clean(nb) -> list[str]:
    """Drop noisy stderr in place; return the stderr that stays, for a human to look at."""
    kept = []
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        checked = "nbval-check-output" in cell.metadata.get("tags", [])
        cell.outputs = [o for o in cell.outputs if not is_noise(o, checked)]
        kept += [o["text"] for o in cell.outputs if o.get("name") == "stderr"]
    return kept


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("paths", nargs="+", type=Path, help="executed notebooks, or folders of them")
    paths = [
        p
        for arg in ap.parse_args().paths
        for p in (sorted(arg.glob("*.ipynb")) if arg.is_dir() else [arg])
    ]
    failed = 0
    for path in paths:
        chapter = ROOT / "chapters" / path.name
        nb = nbformat.read(path, as_version=4)
        if jupytext.writes(nb, "py:percent") != (chapter.with_suffix(".py")).read_text():
            print(f"{path.name}: its code is not the chapter's; skipped", file=sys.stderr)
            failed += 1
            continue
        for text in clean(nb):
            print(f"{path.name}: kept stderr: {text[:200]!r}")
        nbformat.write(nb, chapter)
        print(f"{path.name}: stored")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
