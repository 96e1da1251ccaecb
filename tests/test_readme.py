"""The README's example and quick start run as written, and its test command is the one CI runs."""

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(lang: str, text: str = README) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def _section(name: str) -> str:
    """The README between ``--8<-- [start:name]`` and ``--8<-- [end:name]`` (the markers that the
    docs include the same block by)."""
    m = re.search(rf"--8<-- \[start:{name}\].*?\n(.*?)\n[^\n]*--8<-- \[end:{name}\]", README, flags=re.S)
    assert m, f"no section {name!r} in README.md"
    return m.group(1)


def test_readme_python_example_runs():
    (code,) = [b for b in _blocks("python", _section("python-example")) if "ArgminLayer" in b]
    ns: dict = {}
    exec(compile(code, "README.md", "exec"), ns)
    layer, q = ns["layer"], ns["q"]
    assert layer.last_result.num_failed == 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in q.parameters())


def test_ci_runs_the_readme_test_command():
    test_cmd = next(line for b in _blocks("bash") for line in b.splitlines() if "pytest" in line)
    assert test_cmd in (ROOT / ".ci" / "run").read_text()


def test_readme_is_a_front_page():
    assert len(README.splitlines()) <= 150


@pytest.mark.slow
def test_readme_quick_start_runs_as_written(tmp_path):
    """Every command of the quick start, in order, in a fresh directory holding what a checkout
    has that the commands read (``launch/``, ``models/``): nothing is written into the repository,
    and a command that is refused (an existing run directory) or fails stops the test."""
    (block,) = _blocks("bash", _section("quick-start"))
    commands = [shlex.split(line, comments=True) for line in block.splitlines()]
    commands = [c for c in commands if c]
    assert len(commands) >= 4 and all(c[0] == "qmpc" for c in commands), commands
    # `qmpc` is the entry point of this file, `python -m qmpc.cli` runs the same function with
    # this interpreter and this checkout's package (first on PYTHONPATH)
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["qmpc"] == "qmpc.cli:main"
    for d in ("launch", "models"):
        shutil.copytree(ROOT / d, tmp_path / d)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    for cmd in commands:
        argv = [sys.executable, "-m", "qmpc.cli", *cmd[1:]]
        p = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, f"{shlex.join(cmd)} exited {p.returncode}:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
        if cmd[1] == "run":
            assert re.search(r"over \d+ episodes", p.stdout), p.stdout
        if cmd[1] == "train":
            assert "eval return" in p.stdout, p.stdout
    assert (tmp_path / "runs" / "point_mass" / "checkpoint.pt").exists()
    print(f"quick start: {len(commands)} commands in {time.perf_counter() - t0:.0f} s")
