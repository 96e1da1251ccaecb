"""Exploration noise of online training: Gaussian, white or coloured along the episode.

White noise (``train.exploration_color = 0``) draws each step's noise independently. Coloured
noise draws, at each episode's start, a whole sequence whose power spectrum falls as ``1/f^β``
(β = 1: pink, β = 2: red or Brownian) and adds its samples one step after another: the noise then
wanders for many steps in one direction, which moves a robot further from where the greedy
controller holds it than independent draws of the same size do (Eberhard et al., "Pink noise is
all you need: colored noise exploration in deep reinforcement learning", ICLR 2023). Every
sample is a standard normal at every step (each dimension has unit variance, whatever β), so
``train.exploration_noise`` keeps its meaning. Framework-free (numpy only).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from qmpc.errors import InputError

__all__ = ["ColoredNoise", "powerlaw_noise"]


def powerlaw_noise(beta: float, length: int, dims: int, rng: np.random.Generator) -> np.ndarray:
    """``dims`` independent Gaussian sequences of ``length`` steps, shape ``(length, dims)``, whose
    power spectral density is proportional to ``f^−β`` (the lowest frequency, ``1/length``, also
    sets the constant term's), normalised so that every sample has unit variance.

    Random Fourier coefficients scaled by ``f^(−β/2)`` and transformed back (Timmer and König's
    method); the variance of a sample is known in closed form and divided out exactly, so a
    sequence is stationary with unit variance for every β, not only on average over draws."""
    if length < 1 or dims < 1:
        raise InputError(f"expected length >= 1 and dims >= 1, got {length} and {dims}")
    f = np.fft.rfftfreq(length)
    f[0] = 1.0 / length
    scale = f ** (-beta / 2.0)
    re = rng.normal(size=(dims, f.size))
    im = rng.normal(size=(dims, f.size))
    real_only = [0] + ([f.size - 1] if length % 2 == 0 else [])  # the constant term and Nyquist's
    im[:, real_only] = 0.0
    re[:, real_only] *= np.sqrt(2.0)
    weight = np.full(f.size, 4.0)
    weight[real_only] = 2.0
    std = np.sqrt(np.sum(weight * scale**2)) / length
    x = np.fft.irfft(scale * (re + 1j * im), n=length, axis=-1) / std
    return x.T.copy()


class ColoredNoise:
    """Standard-normal exploration noise of ``dims`` dimensions, one sample a step.

    ``beta == 0``: ``rng.normal(size=dims)`` at each call (white noise, the draws of the trainer
    before this class existed). ``beta > 0``: a :func:`powerlaw_noise` sequence of ``length``
    steps, drawn from ``rng`` at each new episode (or when an episode outlasts it), read one sample
    a call. The sequence and the position in it are what :meth:`state_dict` saves, so that a run
    resumed within an episode goes on with the same noise."""

    def __init__(self, beta: float, dims: int, length: int):
        if beta < 0.0 or not np.isfinite(beta):
            raise InputError(f"expected a finite beta >= 0, got {beta}")
        self.beta, self.dims, self.length = float(beta), int(dims), int(length)
        self.sequence: np.ndarray | None = None
        """The current sequence, shape ``(length, dims)`` (None: white noise, or none drawn yet)."""
        self.position = 0

    def __call__(self, rng: np.random.Generator, new_episode: bool) -> np.ndarray:
        """This step's noise, shape ``(dims,)``; ``new_episode``: the step is an episode's first."""
        if self.beta == 0.0:
            return rng.normal(size=self.dims)
        if new_episode or self.sequence is None or self.position >= self.length:
            self.sequence, self.position = powerlaw_noise(self.beta, self.length, self.dims, rng), 0
        self.position += 1
        return self.sequence[self.position - 1]

    def state_dict(self) -> dict[str, Any]:
        return {"sequence": None if self.sequence is None else self.sequence.copy(), "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        seq = state.get("sequence")
        if seq is not None:
            seq = np.asarray(seq, dtype=np.float64)
            if seq.shape != (self.length, self.dims):
                raise InputError(f"expected a noise sequence of shape {(self.length, self.dims)}, got {seq.shape}")
        self.sequence, self.position = seq, int(state.get("position", 0))
