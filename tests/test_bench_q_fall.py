"""``benchmarks/bench_q_fall.py``: Q's error against the cost-to-go paid, by steps before a fall."""

import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_q_fall  # noqa: E402


def test_the_table_groups_a_falls_steps_by_distance_and_keeps_the_others_apart():
    fell = (np.arange(7.0), np.full(7, -1.0), np.ones(7, bool), True)  # steps 7 … 1 before the fall
    stood = (np.array([10.0, 20.0, 30.0]), np.full(3, -2.0), np.array([True, True, False]), False)
    rows = {label: rest for label, *rest in bench_q_fall.table([fell, stood])}
    assert list(rows) == ["0–4 steps before a fall", "5–14 steps before a fall", "episodes that did not fall"]
    assert rows["5–14 steps before a fall"][:2] == [3, 1.0]  # errors 0, 1, 2 (7, 6, 5 steps before)
    assert rows["0–4 steps before a fall"][:2] == [4, 4.5]  # errors 3 … 6
    n, mean, _, g = rows["episodes that did not fall"]
    assert (n, mean, g) == (2, 15.0, -2.0)  # the step without a known cost-to-go is left out


def test_the_script_runs_a_shipped_checkpoint():
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_q_fall.py"),
         "--checkpoint", str(ROOT / "models" / "hopper.pt"), "--episodes", "1"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "1 episodes from reset seed 100" in out.stdout and "Q − G mean" in out.stdout


def test_a_fall_more_than_300_steps_away_lands_in_the_open_ended_last_bin():
    far = (np.zeros(1200), np.full(1200, -1.0), np.ones(1200, bool), True)  # steps 1200 … 1 before the fall
    rows = {label: n for label, n, *_ in bench_q_fall.table([far])}
    assert rows["300+ steps before a fall"] == 1200 - 299 and sum(rows.values()) == 1200
