"""``train.eval_envs``: evaluations with many episodes at once (one batched solve a step) measure what
the controller, one episode after another, measures; the batched controller acts as the controller."""

from pathlib import Path

import numpy as np
import pytest

from qmpc.config import load_config
from qmpc.controller import BatchController, Controller
from qmpc.env import make_env
from qmpc.errors import InputError
from qmpc.metrics import read_metrics
from qmpc.trainer import evaluate, train

ROOT = Path(__file__).resolve().parents[1]


def _evaluations(run_dir: Path) -> dict[str, list[float]]:
    rows = read_metrics(run_dir / "metrics.csv")
    keys = ("eval/return", "eval/length", "eval/q_bias", "eval/fallback_frac")
    return {k: list(rows[k][1]) for k in keys}


@pytest.mark.parametrize("launch", ["point_mass", "inverted_pendulum"])
def test_a_run_evaluated_many_episodes_at_once_measures_what_one_at_a_time_does(launch, tmp_path):
    out = {}
    for n in (1, 3):
        sets = [f'run_dir="{tmp_path / str(n)}"', "train.steps=120", "train.eval_every=60", "train.eval_episodes=4"]
        sets += ["train.learning_starts=30", f"train.eval_envs={n}", "train.checkpoint_every=60"]
        train(load_config(ROOT / "launch" / f"{launch}.toml", sets), progress=False)
        out[n] = _evaluations(tmp_path / str(n))
    assert len(out[1]["eval/return"]) == 2
    for k in out[1]:  # the training is the same; the actions agree to the solvers' tolerance
        np.testing.assert_allclose(out[3][k], out[1][k], rtol=1e-6, atol=1e-6, err_msg=k)


def test_the_batched_controller_acts_as_the_controller_on_a_trained_network():
    ctrl = Controller.from_checkpoint(ROOT / "models" / "inverted_pendulum.pt")
    batch = BatchController.from_checkpoint(ROOT / "models" / "inverted_pendulum.pt", 2)
    assert batch.env_id == "InvertedPendulum-v5" and np.array_equal(batch.low, ctrl.low)
    env = make_env("InvertedPendulum-v5")
    a = evaluate(ctrl, env, 2, 10_000, 0.99, 0.1)
    b = evaluate(batch, env, 2, 10_000, 0.99, 0.1, [make_env("InvertedPendulum-v5") for _ in range(2)])
    assert a.ret == b.ret == 1000.0 and a.length == b.length == 1000.0
    assert b.fallback_frac == 0.0 and batch.stats["steps"] == 2000
    np.testing.assert_allclose(b.q_bias, a.q_bias, rtol=1e-6)
    with pytest.raises(InputError, match=r"shape \(n, 4\)"):
        batch(np.zeros((2, 5)), np.arange(2), np.ones(2, bool))
    with pytest.raises(InputError, match="envs to be an int >= 1"):
        BatchController(ctrl.q, ctrl.low, ctrl.high, 0)
