"""The README's set-up commands are the ones CI runs, and its results are generated from the committed files."""
import re
import sys
from pathlib import Path

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
    assert report.readme_section() in (ROOT / "README.md").read_text(), \
        "README.md's results differ from benchmarks/results/: run `python benchmarks/report.py` and commit"


def test_readme_shows_the_race_plot_of_the_race_it_reports():
    plot = f"benchmarks/results/{report.race_plot_name(report.race())}"
    assert f"]({plot})" in (ROOT / "README.md").read_text() and (ROOT / plot).exists()


def test_book_front_page_shows_the_race_plot_of_the_race_it_reports():
    assert f"(../benchmarks/results/{report.race_plot_name(report.race())})" in (ROOT / "book" / "intro.md").read_text()


def test_readme_links_point_at_files_of_the_repository():
    links = re.findall(r"\]\(([^)#:]+)\)", (ROOT / "README.md").read_text())
    assert links and [link for link in links if not (ROOT / link).exists()] == []
