"""``train.n_step`` (issue 21, "seeds that hold"): n-step returns from the replay buffer, cut at an
episode's end, at a termination and at the newest transition; a run that trains with them."""

from pathlib import Path

import numpy as np
import pytest
import torch
from test_planning_in_training import _episodes
from test_resume_exact import TINY, assert_same_run

from qmpc.config import load_config
from qmpc.data import ReplayBuffer
from qmpc.errors import ConfigError
from qmpc.metrics import read_metrics
from qmpc.trainer import train

ROOT = Path(__file__).resolve().parents[1]


def _reference(buf: ReplayBuffer, i: int, n: int, gamma: float) -> tuple[float, int, float]:
    """The n-step return, last slot and bootstrap discount of slot ``i``, by walking the episode."""
    ret, k, j = 0.0, 0, i
    while True:
        ret += gamma**k * float(buf.cost[j])
        k += 1
        nxt = (j + 1) % buf.capacity
        ends = buf.terminated[j] or j == (buf.pos - 1) % buf.capacity or k == n
        if ends or not np.array_equal(buf.next_obs[j], buf.obs[nxt]):
            return ret, j, gamma**k
        j = nxt


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_n_step_returns_stop_at_episode_ends_terminations_and_the_newest_transition(n):
    buf = ReplayBuffer(2, 2, 100)
    _episodes(buf, [3, 4, 6], [True, False, False])  # slots 0-2 (terminated), 3-6 (cut), 7-12 (newest 12)
    index = torch.arange(13)
    batch, discount = buf.n_step(_batch(buf, index), n, 0.9)
    for i in range(13):
        ret, last, disc = _reference(buf, i, n, 0.9)
        assert batch.cost[i].item() == pytest.approx(ret, rel=1e-6)
        assert batch.index[i].item() == last
        assert discount[i].item() == pytest.approx(disc, rel=1e-12)
        np.testing.assert_array_equal(batch.next_obs[i].numpy(), buf.next_obs[last])
        assert batch.terminated[i].item() == buf.terminated[last]
        np.testing.assert_array_equal(batch.obs[i].numpy(), buf.obs[i])  # Q(x, u) of the first step
    if n == 3:  # spelled out: slot 0 runs to the termination at 2, slot 5 to the cut at 6
        assert batch.index[0].item() == 2 and batch.terminated[0].item() == 1.0
        assert batch.cost[0].item() == pytest.approx(0 + 0.9 * 1 + 0.81 * 2)
        assert batch.index[5].item() == 6 and discount[5].item() == pytest.approx(0.81)


def test_n_step_returns_across_the_rings_wrap():
    wrap = ReplayBuffer(2, 2, 5)
    _episodes(wrap, [7], [False])  # slots hold t = 5, 6, 2, 3, 4; the newest is slot 1
    batch, discount = wrap.n_step(_batch(wrap, torch.tensor([3, 4, 0])), 3, 0.5)
    np.testing.assert_array_equal(batch.index.numpy(), [0, 1, 1])
    np.testing.assert_allclose(batch.cost.numpy(), [3 + 0.5 * 4 + 0.25 * 5, 4 + 0.5 * 5 + 0.25 * 6, 5 + 0.5 * 6])
    np.testing.assert_allclose(discount.numpy(), [0.125, 0.125, 0.25])


def _batch(buf: ReplayBuffer, index: torch.Tensor):
    from qmpc.data import Batch

    i = index.numpy()
    t = torch.from_numpy
    return Batch(t(buf.obs[i]), t(buf.act[i]), t(buf.cost[i]), t(buf.next_obs[i]), t(buf.terminated[i]), index)


def _ip(run_dir, *sets):
    return load_config(ROOT / "launch" / "inverted_pendulum.toml", [f"run_dir={run_dir}", *TINY, *sets])


def test_a_run_with_n_step_targets_trains_and_resumes_bit_identical(tmp_path):
    straight = train(_ip(tmp_path / "a", "train.n_step=3"), progress=False)
    train(_ip(tmp_path / "one"), progress=False)
    loss3 = read_metrics(tmp_path / "a" / "metrics.csv")["train/td_loss"][1]
    loss1 = read_metrics(tmp_path / "one" / "metrics.csv")["train/td_loss"][1]
    assert np.isfinite(loss3).all() and not np.array_equal(loss3, loss1)  # not the one-step targets
    b = tmp_path / "b"
    train(_ip(b, "train.n_step=3"), progress=False, stop_at=37)
    resumed = train(_ip(b, "train.n_step=3"), resume=True, progress=False)
    assert resumed.eval_returns == straight.eval_returns
    assert_same_run(tmp_path / "a", b)


@pytest.mark.parametrize("sets", [["train.rollout_td=2"], ["train.target_horizon=3", "train.target=double_detached"]])
def test_n_step_with_model_rolled_or_plan_targets_is_refused(tmp_path, sets):
    with pytest.raises(ConfigError, match=r"train\.n_step = 1"):
        train(_ip(tmp_path / "r", "train.n_step=3", *sets), progress=False)
