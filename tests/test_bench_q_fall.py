"""``benchmarks/bench_q_fall.py``: Q's error against the cost-to-go paid, by steps before a fall."""

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_q_fall  # noqa: E402


class _ConstantQ(torch.nn.Module):
    def __init__(self, value: float):
        super().__init__()
        self.value = torch.nn.Parameter(torch.tensor(value, dtype=torch.float64))

    def forward(self, x, u):
        return self.value.expand(x.shape[0])


def _episode(costs, terminated):
    t = len(costs)
    obs, act = np.zeros((t + 1, 2)), np.zeros((t, 1))
    return SimpleNamespace(costs=np.asarray(costs, float), observations=obs, actions=act, terminated=terminated)


def test_errors_are_q_minus_the_discounted_scaled_costs_and_nothing_after_a_fall():
    controller = SimpleNamespace(q=_ConstantQ(1.0))
    [(err, g, valid, terminated)] = bench_q_fall.q_errors(controller, [_episode([1.0, 1.0, 1.0], True)], 0.5, 2.0)
    # G_t = 2 (1 + 0.5 + 0.25), 2 (1 + 0.5), 2: the costs scaled, discounted, nothing after the termination
    np.testing.assert_allclose(g, [3.5, 3.0, 2.0])
    np.testing.assert_allclose(err, 1.0 - g)
    assert valid.all() and terminated


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
