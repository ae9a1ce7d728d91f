"""The README's set-up commands are the ones CI runs, and its results are generated from the committed files."""

import ast
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import report  # noqa: E402


def readme_commands() -> list[str]:
    return re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text())


def test_ci_runs_the_readme_test_command_verbatim():
    test_command = next(c for c in readme_commands() if c.endswith("python -m pytest"))
    assert test_command in (ROOT / ".ci" / "run").read_text().splitlines()


def test_readme_quickstart_runs_the_example():
    assert any(c.endswith("python examples/quickstart.py") for c in readme_commands())
    assert (ROOT / "examples" / "quickstart.py").exists()


def test_readme_results_are_what_the_committed_results_render():
    assert report.readme_section() in (ROOT / "README.md").read_text(), (
        "README.md's results differ from benchmarks/results/: run `python benchmarks/report.py` and commit"
    )


def test_readme_shows_the_race_plot_of_the_race_it_reports():
    plot = f"benchmarks/results/{report.race_plot_name(report.race())}"
    assert f"]({plot})" in (ROOT / "README.md").read_text() and (ROOT / plot).exists()


def test_book_front_page_shows_the_race_plot_of_the_race_it_reports():
    assert (
        f"(../benchmarks/results/{report.race_plot_name(report.race())})"
        in (ROOT / "book" / "intro.md").read_text()
    )


def test_readme_links_point_at_files_of_the_repository():
    links = re.findall(r"\]\(([^)#:]+)\)", (ROOT / "README.md").read_text())
    assert links and [link for link in links if not (ROOT / link).exists()] == []


def python_snippets() -> list[str]:
    return re.findall(r"```python\n(.+?)\n```", (ROOT / "README.md").read_text(), flags=re.S)


def test_readme_usage_snippet_runs_and_answers(tmp_path):
    script = tmp_path / "use_it.py"
    script.write_text(python_snippets()[0])
    env = {**os.environ, "MINI_INFER_DEVICE": "cpu"}
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    answer, texts, logprobs = result.stdout.splitlines()[:3]
    assert answer == "The capital of France is Paris."
    texts, logprobs = ast.literal_eval(texts), ast.literal_eval(logprobs)
    assert len(texts) == 2 and all(isinstance(t, str) and t for t in texts)
    assert len(logprobs) == 3 and max(logprobs, key=logprobs.get) == " Paris"


def test_readme_serving_snippet_talks_to_the_readme_server_command():
    command = next(c for c in readme_commands() if "mini_infer.serve" in c).split("#")[0].split()
    with socket.socket() as s:  # a free loopback port instead of the README's 8000
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command[command.index("--port") + 1] = str(port)
    server = subprocess.Popen(
        [sys.executable if c == "python" else c for c in command],
        cwd=ROOT,
        env={**os.environ, "MINI_INFER_DEVICE": "cpu"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if urllib.request.urlopen(f"{url}/health", timeout=1).status == 200:
                    break
            except OSError:
                time.sleep(0.5)
        snippet = python_snippets()[1].replace("http://127.0.0.1:8000", url)
        result = subprocess.run(
            [sys.executable, "-c", snippet], capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, result.stderr[-2000:]
        assert result.stdout.strip()
    finally:
        server.terminate()
        server.wait(timeout=30)


def exported_modules() -> dict[str, set[str]]:
    """Each chapter's stem and the modules its cells export, without the `mini_infer.` prefix."""
    exports: dict[str, set[str]] = {}
    for chapter in sorted((ROOT / "chapters").glob("[0-9]*.py")):
        found = re.findall(r"^#\| export mini_infer\.([\w.]+)$", chapter.read_text(), flags=re.M)
        exports[chapter.stem] = set(found)
    return exports


@pytest.mark.parametrize("page", ["README.md", "book/intro.md"])
def test_chapter_table_names_every_module_each_chapter_exports(page):
    """The Module column of a chapter's row in the "## The chapters" table of README.md (and of the book's
    front page) names, in backticks, every module the chapter exports (`#| export mini_infer.x.y`
    cells), with or without `mini_infer.`:

    - precisely (`x.y`), or
    - by a package (`x`) when the chapter exports every module of that package (every module any
      chapter exports under `mini_infer.x`, however deep): `memory` stands for `memory.block_manager`
      and `memory.kv_cache` only while no other chapter exports into `memory`.

    A chapter that exports nothing (Chapter 7) may name what it uses instead. Only names in backticks
    count; words in parentheses beside them are for the reader. A row is found by its link to the
    notebook (README.md) or by its chapter number (the front page).
    """
    exports = exported_modules()
    every_module = set().union(*exports.values())
    text = (ROOT / page).read_text()
    table = text[text.index("## The chapters") :]
    table = table[: table.index("\n## ")]
    missing = {}
    for stem, modules in exports.items():
        number = int(stem.split("_")[0])
        rows = [
            line
            for line in table.splitlines()
            if f"](chapters/{stem}.ipynb)" in line or line.startswith(f"| {number}. ")
        ]
        assert len(rows) == 1, f"{page}'s chapter table needs one row for chapters/{stem}.ipynb"
        named = {
            name.removeprefix("mini_infer.")
            for name in re.findall(r"`([\w.]+)`", rows[0].split("|")[3])
        }

        def covered(module: str) -> bool:
            if module in named:
                return True
            parts = module.split(".")
            packages = {".".join(parts[:i]) for i in range(1, len(parts))}
            return any(
                {m for m in every_module if m.startswith(p + ".")} <= modules
                for p in packages & named
            )

        if not_named := sorted(m for m in modules if not covered(m)):
            missing[stem] = not_named
    assert missing == {}, f"{page}'s chapter table does not name these exported modules: {missing}"
