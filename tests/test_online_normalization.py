"""Issue 12: ``network.obs_normalization`` online, fixed from the states of the random-action
phase when learning starts, saved with the network and kept across a resume."""

import numpy as np
import pytest

from qmpc.checkpoint import load_checkpoint
from qmpc.config import config_from_dict
from qmpc.data import input_normalization
from qmpc.errors import ConfigError
from qmpc.trainer import read_metrics, train


def _cfg(run_dir, kind="standardize", **train_kw):
    return config_from_dict(
        {
            "seed": 1,
            "run_dir": str(run_dir),
            "network": {"arch": "PICNN", "hidden": [8], "obs_normalization": kind},
            "train": {
                "mode": "online",
                "steps": 40,
                "batch_size": 8,
                "learning_starts": 12,
                "eval_every": 20,
                "eval_episodes": 1,
                "checkpoint_every": 10,
                "log_every": 10,
                **train_kw,
            },
        }
    )


@pytest.mark.parametrize("kind", ["standardize", "whiten"])
def test_statistics_are_those_of_the_random_phase(tmp_path, kind):
    train(_cfg(tmp_path / "r", kind), progress=False)
    ckpt = load_checkpoint(tmp_path / "r" / "checkpoint.pt")
    obs = ckpt["buffer"]["obs"][:12]  # the states stored before learning started
    shift, transform = input_normalization(obs, kind)
    for net in ("q", "q_target"):
        np.testing.assert_allclose(ckpt[net]["obs_shift"].numpy(), shift, rtol=1e-6)  # float32 buffers
        np.testing.assert_allclose(ckpt[net]["obs_transform"].numpy(), transform, rtol=1e-6)  # float32 buffers
    assert not np.allclose(transform, np.eye(len(shift)))


def test_resume_before_learning_starts_equals_an_uninterrupted_run(tmp_path):
    """Killed at step 11 (checkpoint at 10, before the statistics are fixed) and resumed."""
    straight = train(_cfg(tmp_path / "a"), progress=False)
    train(_cfg(tmp_path / "b"), progress=False, stop_at=11)
    resumed = train(_cfg(tmp_path / "b"), resume=True, progress=False)
    assert resumed.eval_returns == straight.eval_returns
    a, b = (load_checkpoint(tmp_path / d / "checkpoint.pt")["q"] for d in "ab")
    for k in a:
        np.testing.assert_array_equal(a[k].numpy(), b[k].numpy(), err_msg=k)
    assert read_metrics(tmp_path / "b" / "metrics.csv")["train/td_loss"][0].tolist() == [20, 30, 40]


def test_needs_a_random_phase(tmp_path):
    with pytest.raises(ConfigError, match=r"expected train.learning_starts >= 2 .* got 1"):
        train(_cfg(tmp_path / "r", learning_starts=1), progress=False)


def test_a_constant_dimension_is_left_unscaled():
    obs = np.random.default_rng(0).normal(size=(50, 3))
    obs[:, 1] = 0.25
    shift, transform = input_normalization(obs, "standardize")
    assert shift[1] == 0.25 and transform[1, 1] == 1.0
    np.testing.assert_allclose(np.diag(transform)[[0, 2]], 1 / obs[:, [0, 2]].std(axis=0))
