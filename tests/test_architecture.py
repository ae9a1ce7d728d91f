"""The package's layers (CONTRIBUTING.md, "Architecture"): every import points down, and the map names only
modules that exist."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mini_infer"

# Each part of the package (a subpackage or a top-level module) and its layer: a part imports only from
# lower layers. The same picture as CONTRIBUTING.md's.
LAYERS = {
    "__main__": 8,  # python -m mini_infer: the command line
    "serve": 7,
    "llm": 6,
    "engine": 5,
    "parallel": 4,
    "worker": 3,
    "testing": 3,
    "core": 2,
    "spec_decode": 2,
    "layers": 2,
    "loader": 2,
    "memory": 1,
    "models": 1,
    "contiguous_cache": 1,
    "kernels": 0,
    "config": 0,
    "device": 0,
    "sampling_params": 0,
    "outputs": 0,
}


def part(module: str) -> str:
    return module.split(".")[1]


def imports() -> dict[str, set[str]]:
    """For each part, the other parts its modules import (the package's own __init__ aside: it only
    re-exports LLM and SamplingParams, lazily)."""
    found: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(ROOT).with_suffix("")
        if relative == Path("mini_infer/__init__"):
            continue
        source = part(".".join(relative.parts))
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [node.module]
                if isinstance(node, ast.ImportFrom) and node.module
                else [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else []
            )
            for name in names:
                if name.startswith("mini_infer.") and part(name) != source:
                    found.setdefault(source, set()).add(part(name))
    return found


def test_every_part_of_the_package_has_a_layer():
    parts = {
        p.stem if p.is_file() else p.name
        for p in PACKAGE.iterdir()
        if (p.suffix == ".py" and p.stem != "__init__")
        or (p.is_dir() and (p / "__init__.py").exists())
    }
    assert parts == set(LAYERS)


def test_every_import_points_down():
    upward = [
        (source, target)
        for source, targets in imports().items()
        for target in targets
        if LAYERS[target] >= LAYERS[source]
    ]
    assert not upward, f"imports that do not point down a layer: {upward}"


def test_the_architecture_map_names_modules_that_exist():
    text = (ROOT / "CONTRIBUTING.md").read_text()
    section = text[text.index("## Architecture") : text.index("## Code")]
    paths = set(re.findall(r"mini_infer/[\w/]*\w(?:\.py)?/?", section))
    assert len(paths) >= 15
    missing = [p for p in paths if not (ROOT / p).exists()]
    assert not missing, f"CONTRIBUTING names modules that do not exist: {missing}"
    for name in re.findall(
        r"`(\w+)(?:\.\w+)*\(?", section
    ):  # classes it names exist in the package
        if name[0].isupper() and name not in ("LLM",):
            assert any(f"class {name}" in p.read_text() for p in PACKAGE.rglob("*.py")), name
