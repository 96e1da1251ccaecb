"""The README's example runs, and its test command is the one CI runs."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_readme_python_example_runs():
    (code,) = [b for b in _blocks("python") if "ArgminLayer" in b]
    ns: dict = {}
    exec(compile(code, "README.md", "exec"), ns)
    layer, q = ns["layer"], ns["q"]
    assert layer.last_result.num_failed == 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in q.parameters())


def test_ci_runs_the_readme_test_command():
    test_cmd = next(line for b in _blocks("bash") for line in b.splitlines() if "pytest" in line)
    assert test_cmd in (ROOT / ".ci" / "run").read_text()
