"""``ReplayBuffer.add_many`` (how an offline run loads its dataset) leaves the buffer that adding
the transitions one by one leaves, bit for bit, however the ring wraps; bad input adds nothing."""

import numpy as np
import pytest

from qmpc.data import ReplayBuffer
from qmpc.errors import InputError

FIELDS = ("obs", "act", "cost", "next_obs", "terminated", "has_argmin", "size", "pos")


def _transitions(n: int, rng: np.random.Generator):
    return (
        rng.normal(size=(n, 3)),  # float64: rounded to the buffer's float32 either way
        rng.normal(size=(n, 2)).astype(np.float32),
        rng.normal(size=n),
        rng.normal(size=(n, 3)),
        rng.random(n) < 0.2,
    )


@pytest.mark.parametrize(("before", "n"), [(0, 4), (5, 4), (5, 7), (2, 23), (0, 10)])
def test_add_many_is_add_one_after_another(before, n):
    rng = np.random.default_rng(before * 31 + n)
    a, b = ReplayBuffer(3, 2, 10), ReplayBuffer(3, 2, 10)
    for buf in (a, b):  # the same history: some transitions in, some argmins kept
        for row in zip(*_transitions(before, np.random.default_rng(7)), strict=True):
            buf.add(*row)
        buf.has_argmin[:] = True
    data = _transitions(n, rng)
    for row in zip(*data, strict=True):
        a.add(*row)
    b.add_many(*data)
    for name in FIELDS:
        np.testing.assert_array_equal(getattr(b, name), getattr(a, name), err_msg=name)


def test_add_many_refuses_bad_input_and_adds_nothing():
    buf = ReplayBuffer(3, 2, 10)
    obs, act, cost, nxt, term = _transitions(6, np.random.default_rng(0))
    act[3, 1] = np.nan
    with pytest.raises(InputError, match="finite transitions, got transition 3"):
        buf.add_many(obs, act, cost, nxt, term)
    with pytest.raises(InputError, match=r"expected next_obs of shape \(6, 3\), got \(5, 3\)"):
        buf.add_many(obs, act, cost, nxt[:5], term)
    assert len(buf) == 0 and buf.pos == 0


def test_mean_cost_to_go_is_the_monte_carlo_cost_of_each_episode():
    """A wrapped ring: cut one-step episodes of cost 0 (their tails unseen: none counts), one that
    terminates after 3 steps of cost 2 (every step counts) and one cut after 41 steps of cost 1
    (the steps whose unseen tail weighs ≤ 1 % count: its first 35 at γ = 0.5)."""
    gamma, buf = 0.5, ReplayBuffer(1, 1, 50)
    buf.add_many(np.zeros((7, 1)), np.zeros((7, 1)), np.zeros(7), np.ones((7, 1)), np.zeros(7))  # overwritten later
    x = np.arange(44, dtype=float)[:, None]
    term = np.zeros(44)
    term[2] = 1.0
    nxt = x + 1
    buf.add_many(x, np.zeros((44, 1)), np.r_[np.full(3, 2.0), np.ones(41)], nxt, term)
    # the ring holds the last 50: 6 of the first 7 (one episode, cost 0), then episodes of 3 and 41
    g3 = [2 + 2 * gamma + 2 * gamma**2, 2 + 2 * gamma, 2.0]
    g41 = (1 - gamma ** (41 - np.arange(41))) / (1 - gamma)
    valid41 = gamma ** (41 - np.arange(41)) <= 0.01
    assert valid41.sum() == 35
    want = np.r_[g3, g41[valid41]]
    assert buf.mean_cost_to_go(gamma) == pytest.approx(want.mean(), rel=1e-12)
