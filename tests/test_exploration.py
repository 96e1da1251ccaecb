"""``train.exploration_color`` (issue 21): coloured exploration noise along an episode, its
spectrum and variance, white noise unchanged, and a run that trains with it and resumes within an
episode bit for bit."""

from pathlib import Path

import numpy as np
import pytest
from test_n_step import _ip
from test_resume_exact import assert_same_run

from qmpc.checkpoint import load_checkpoint
from qmpc.config import load_config
from qmpc.errors import ConfigError, InputError
from qmpc.exploration import ColoredNoise, powerlaw_noise
from qmpc.metrics import read_metrics
from qmpc.trainer import train

ROOT = Path(__file__).resolve().parents[1]


def _spectral_slope(beta: float, length: int = 1024, dims: int = 400) -> float:
    """The slope of log power against log frequency of the mean periodogram of many sequences."""
    x = powerlaw_noise(beta, length, dims, np.random.default_rng(0))
    power = np.mean(np.abs(np.fft.rfft(x, axis=0)) ** 2, axis=1)
    f = np.fft.rfftfreq(length)
    keep = (f > 0) & (f < 0.5)
    return float(np.polyfit(np.log(f[keep]), np.log(power[keep]), 1)[0])


@pytest.mark.parametrize("beta", [0.0, 1.0, 2.0])
def test_the_spectrum_falls_as_one_over_f_to_the_beta(beta):
    assert _spectral_slope(beta) == pytest.approx(-beta, abs=0.05)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0, 2.0])
@pytest.mark.parametrize("length", [999, 1000])
def test_every_sample_is_standard_normal_whatever_the_colour(beta, length):
    x = powerlaw_noise(beta, length, 10000, np.random.default_rng(1))
    assert x.shape == (length, 10000)
    per_step = x.var(axis=1)  # across sequences: the same unit variance at every step
    assert abs(x.mean()) < 0.05
    assert per_step.mean() == pytest.approx(1.0, abs=0.03)  # β = 2: its standard error is ≈ 0.014
    assert np.abs(per_step - 1.0).max() < 0.1  # 10 000 draws a step: ±0.1 is 7 standard errors


def test_colour_correlates_the_noise_along_the_episode():
    lag1 = []
    for beta in (0.0, 1.0, 2.0):
        x = powerlaw_noise(beta, 1000, 2000, np.random.default_rng(2))
        lag1.append(float(np.mean(x[1:] * x[:-1]) / np.mean(x**2)))
    assert abs(lag1[0]) < 0.01  # white: independent steps
    assert 0.6 < lag1[1] < 0.9 < 0.97 < lag1[2]  # pink (≈ 0.77), then red, hold their direction longer


def test_white_noise_draws_what_the_trainer_drew_before():
    """β = 0 is ``rng.normal(size=dims)`` each step: runs of the launch files are unchanged."""
    a, b = np.random.default_rng(3), np.random.default_rng(3)
    noise = ColoredNoise(0.0, 3, 1000)
    for t in range(5):
        np.testing.assert_array_equal(noise(a, t == 0), b.normal(size=3))
    assert noise.sequence is None


def test_a_new_sequence_each_episode_and_after_the_last_sample():
    rng = np.random.default_rng(4)
    noise = ColoredNoise(1.0, 2, 4)
    first = [noise(rng, t == 0) for t in range(3)]
    seq = noise.sequence.copy()
    np.testing.assert_array_equal(np.stack(first), seq[:3])
    assert not np.array_equal(noise(rng, True), seq[0])  # a new episode: a new sequence
    for _ in range(3):
        noise(rng, False)
    seq2 = noise.sequence.copy()
    noise(rng, False)  # past the 4th sample of a 4-step sequence: the next is drawn
    assert not np.array_equal(noise.sequence, seq2) and noise.position == 1


def test_the_state_continues_the_same_noise():
    rng = np.random.default_rng(5)
    noise = ColoredNoise(1.0, 2, 50)
    for t in range(7):
        noise(rng, t == 0)
    state, rng_state = noise.state_dict(), rng.bit_generator.state
    rest = [noise(rng, False) for _ in range(10)]
    other, rng2 = ColoredNoise(1.0, 2, 50), np.random.default_rng(0)
    other.load_state_dict(state)
    rng2.bit_generator.state = rng_state
    np.testing.assert_array_equal(np.stack([other(rng2, False) for _ in range(10)]), np.stack(rest))
    with pytest.raises(InputError, match=r"expected a noise sequence of shape \(50, 2\), got \(49, 2\)"):
        other.load_state_dict({"sequence": np.zeros((49, 2)), "position": 0})


def test_bad_colours_are_refused():
    with pytest.raises(InputError, match="expected a finite beta >= 0, got -1"):
        ColoredNoise(-1.0, 2, 10)
    with pytest.raises(InputError, match="expected length >= 1 and dims >= 1, got 0 and 2"):
        powerlaw_noise(1.0, 0, 2, np.random.default_rng(0))
    for bad in ("-0.5", "2.5", "nan"):
        with pytest.raises(ConfigError, match=r"train\.exploration_color"):
            load_config(ROOT / "launch" / "inverted_pendulum.toml", [f"train.exploration_color={bad}"])


def test_a_run_with_pink_noise_trains_and_resumes_within_an_episode_bit_identical(tmp_path):
    straight = train(_ip(tmp_path / "a", "train.exploration_color=1.0"), progress=False)
    train(_ip(tmp_path / "white"), progress=False)
    pink = read_metrics(tmp_path / "a" / "metrics.csv")["train/td_loss"][1]
    white = read_metrics(tmp_path / "white" / "metrics.csv")["train/td_loss"][1]
    assert np.isfinite(pink).all() and not np.array_equal(pink, white)  # other actions were taken
    b = tmp_path / "b"
    train(_ip(b, "train.exploration_color=1.0"), progress=False, stop_at=37)
    noise = load_checkpoint(b / "checkpoint.pt")["loop"]["noise"]
    assert noise["sequence"] is not None and noise["position"] > 1  # stopped within an episode
    resumed = train(_ip(b, "train.exploration_color=1.0"), resume=True, progress=False)
    assert resumed.eval_returns == straight.eval_returns
    assert_same_run(tmp_path / "a", b)
