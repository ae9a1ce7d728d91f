"""The README's set-up commands are the ones CI runs."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    return re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text())


def test_ci_runs_the_readme_test_command_verbatim():
    test_command = next(c for c in readme_commands() if c.endswith("python -m pytest"))
    assert test_command in (ROOT / ".ci" / "run").read_text().splitlines()


def test_readme_quickstart_runs_the_example():
    assert any(c.endswith("python examples/quickstart.py") for c in readme_commands())
    assert (ROOT / "examples" / "quickstart.py").exists()
