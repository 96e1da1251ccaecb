"""Environments: any gymnasium MuJoCo task with a Box action space, by id, and qmpc's own tasks.

qmpc's tasks are registered with gymnasium under ``qmpc/…`` ids when this module is imported.
"""

from __future__ import annotations

import contextlib
import ctypes.util
import functools
import os
import sys
import warnings
from collections.abc import Iterator
from typing import NamedTuple

import gymnasium as gym
import numpy as np

from qmpc.errors import ConfigError, InputError, MujocoWarning

__all__ = ["QMPC_TASKS", "EnvSpec", "env_spec", "make_env", "offscreen_gl"]

QMPC_TASKS = {"qmpc/PointMass-v0": ("qmpc.tasks.point_mass:PointMassEnv", 100)}
for _id, (_entry, _steps) in QMPC_TASKS.items():
    if _id not in gym.registry:
        gym.register(id=_id, entry_point=_entry, max_episode_steps=_steps)


class EnvSpec(NamedTuple):
    """What a controller and a dataset need to know about a task."""

    env_id: str
    obs_dim: int
    act_dim: int
    low: np.ndarray
    high: np.ndarray


def make_env(env_id: str, seed: int | None = None, render_mode: str | None = None) -> gym.Env:
    """``gymnasium.make(env_id)`` with a clear error for unknown ids and non-Box action spaces.

    MuJoCo's own warnings (printed at every model compile otherwise) become :class:`~qmpc.errors.MujocoWarning`
    warnings, each message shown once, unless a handler of MuJoCo's warnings was installed before.
    """
    _route_mujoco_warnings()
    try:
        env = gym.make(env_id, render_mode=render_mode)
    except gym.error.Error as e:
        raise ConfigError(f"expected a registered gymnasium environment id, got {env_id!r} ({e})") from None
    if not isinstance(env.action_space, gym.spaces.Box) or not isinstance(env.observation_space, gym.spaces.Box):
        raise ConfigError(
            f"expected Box observation and action spaces for {env_id!r}, got "
            f"{type(env.observation_space).__name__} and {type(env.action_space).__name__}"
        )
    if len(env.observation_space.shape) != 1 or len(env.action_space.shape) != 1:
        raise ConfigError(f"expected flat observations and actions for {env_id!r}")
    from qmpc.checkpoint import check_bounds  # here: checkpoint imports torch and the networks

    try:
        check_bounds(np.asarray(env.action_space.low, float), np.asarray(env.action_space.high, float))
    except InputError as e:
        raise ConfigError(f"{e} (the action space of {env_id!r})") from None
    if seed is not None:
        env.reset(seed=seed)
        env.action_space.seed(seed)
    return env


def _route_mujoco_warnings() -> None:
    import mujoco

    if mujoco.get_mju_user_warning() is None:
        mujoco.set_mju_user_warning(_mujoco_warning)


def _mujoco_warning(message: str) -> None:
    """MuJoCo calls this from C, where an exception aborts the process: a warnings filter set to "error"
    gets MuJoCo's own line on stderr instead."""
    try:
        warnings.warn(f"MuJoCo: {message}", MujocoWarning, stacklevel=1)
    except Exception:
        sys.stderr.write(f"WARNING: {message}\n")


def env_spec(env: gym.Env) -> EnvSpec:
    """Sizes and action bounds of an environment."""
    return EnvSpec(
        env.spec.id if env.spec else type(env).__name__,
        int(env.observation_space.shape[0]),
        int(env.action_space.shape[0]),
        np.asarray(env.action_space.low, dtype=np.float64),
        np.asarray(env.action_space.high, dtype=np.float64),
    )


@functools.cache
def _has_egl() -> bool:
    return ctypes.util.find_library("EGL") is not None


@contextlib.contextmanager
def offscreen_gl() -> Iterator[None]:
    """Render MuJoCo offscreen on a headless machine: around ``env.render()``, ``MUJOCO_GL=egl``
    when the user has not set ``MUJOCO_GL``, there is no ``DISPLAY`` and EGL is installed
    (gymnasium's MuJoCo renderer, which qmpc's tasks use too, reads it when it creates its
    OpenGL context, at the first render); the environment variable is removed again afterwards,
    so the process's environment is left as it was."""
    if "MUJOCO_GL" in os.environ or os.environ.get("DISPLAY") or not _has_egl():
        yield
        return
    os.environ["MUJOCO_GL"] = "egl"
    try:
        yield
    finally:
        os.environ.pop("MUJOCO_GL", None)
