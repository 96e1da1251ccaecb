"""Issue 20 (reliability, round 2), item 4: offline datasets checked against the task's action
bounds and the replay buffer's size; input normalisation from too few states floored, with a warning."""

import warnings

import numpy as np
import pytest

from qmpc import data as qdata
from qmpc.env import make_env
from qmpc.errors import ConfigError, InputError


def _dataset(n=60, scale=1.0, seed=0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    obs = rng.normal(size=(n + 1, 4))
    return {
        "obs": obs[:-1],
        "act": scale * rng.uniform(-2, 2, (n, 2)),
        "cost": rng.normal(size=n),
        "next_obs": obs[1:],
        "terminated": np.zeros(n),
    }


def test_dataset_actions_outside_the_bounds_are_refused():
    """An offline dataset with actions ×50 was accepted (return −10115 instead of −158)."""
    low, high = np.array([-2.0, -2.0]), np.array([2.0, 2.0])
    data = _dataset(scale=50.0)
    data["act"][7, 1] = -150.5
    with pytest.raises(InputError) as e:
        qdata.check_dataset(data, low, high, 1000, "data/pm")
    msg = str(e.value)
    n_out = int((np.abs(data["act"]) > 2).any(axis=1).sum())
    assert "\n" not in msg and "data/pm" in msg and f"{n_out} of 60" in msg and "-150.5" in msg, msg
    ok = _dataset()
    ok["act"][0] = [2.0 * (1 + 1e-7), -2.0]  # float32 rounding of a bound: within the tolerance
    qdata.check_dataset(ok, low, high, 1000, "data/pm")
    qdata.check_dataset(_dataset(scale=50.0), np.full(2, -np.inf), np.full(2, np.inf), 1000, "d")


def test_a_buffer_smaller_than_the_dataset_is_refused():
    """``train.buffer_size`` below the dataset's size silently kept its first transitions only."""
    low, high = np.full(2, -2.0), np.full(2, 2.0)
    with pytest.raises(ConfigError, match=r"train\.buffer_size .*60 transitions.* got 50") as e:
        qdata.check_dataset(_dataset(), low, high, 50, "data/pm")
    assert "\n" not in str(e.value)
    qdata.check_dataset(_dataset(), low, high, 60, "data/pm")


def _old_normalization(obs, kind):
    """input_normalization before the floor (the numbers adequate data must keep, bit for bit)."""
    obs = np.asarray(obs, np.float64)
    mean = obs.mean(axis=0)
    if kind == "standardize":
        std = obs.std(axis=0)
        return mean, np.diag(np.where(std > 1e-6, 1.0 / np.maximum(std, 1e-6), 1.0))
    cov = np.cov(obs.T).reshape(obs.shape[1], obs.shape[1])
    cov += 1e-9 * max(1.0, np.trace(cov)) * np.eye(obs.shape[1])
    return mean, np.linalg.inv(np.linalg.cholesky(cov))


def _random_phase(env_id: str, n: int) -> np.ndarray:
    """The states of a random-action phase of ``n`` steps (float32, like the replay buffer)."""
    env = make_env(env_id, seed=0)
    rng = np.random.default_rng(0)
    obs, _ = env.reset(seed=0)
    out = []
    for _ in range(n):
        out.append(obs.astype(np.float32))
        obs, _, term, trunc, _ = env.step(rng.uniform(env.action_space.low, env.action_space.high))
        if term or trunc:
            obs, _ = env.reset()
    return np.array(out)


@pytest.mark.parametrize("kind", ["standardize", "whiten"])
def test_normalisation_from_too_few_states_is_floored_with_a_warning(kind):
    """Reacher's random phase with ``learning_starts = 2…100`` scaled a dimension by up to ×37,000."""
    obs = _random_phase("Reacher-v5", 100)
    for n in (2, 3, 5, 10, 50):
        with pytest.warns(UserWarning, match=rf"from {n} states, .*at least 100") as w:
            shift, transform = qdata.input_normalization(obs[:n], kind)
        assert len(w) == 1 and "\n" not in str(w[0].message)
        np.testing.assert_array_equal(shift, obs[:n].astype(np.float64).mean(axis=0))
        gain = np.linalg.norm(transform, 2) * obs[:n].astype(np.float64).std(axis=0).max()
        assert gain <= 101, (n, gain)  # no direction amplified beyond 100× the widest one


@pytest.mark.parametrize("kind", ["standardize", "whiten"])
@pytest.mark.parametrize("env_id", ["Reacher-v5", "InvertedPendulum-v5", "qmpc/PointMass-v0"])
def test_normalisation_from_enough_states_is_unchanged(env_id, kind):
    """Launch files start learning after >= 1000 states: their normalisations stay bit-identical."""
    obs = _random_phase(env_id, 1000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for n in (10 * obs.shape[1], 1000):
            new, old = qdata.input_normalization(obs[:n], kind), _old_normalization(obs[:n], kind)
            np.testing.assert_array_equal(new[0], old[0])
            np.testing.assert_array_equal(new[1], old[1])
