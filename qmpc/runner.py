"""Closed-loop runs of a :class:`~qmpc.controller.Controller` in a gymnasium MuJoCo task: a
per-episode table, a plot of states, actions (with their bounds) and solve times, and an MP4
rendered offscreen by MuJoCo.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

from qmpc.controller import BatchController, Controller
from qmpc.data import atomic_write, batch_rollouts, discounted_costs
from qmpc.env import offscreen_gl
from qmpc.errors import QmpcError

__all__ = [
    "Episode",
    "discounted_costs",
    "format_episodes",
    "plot_rollout",
    "run_batched",
    "run_episodes",
    "write_video",
]


class Episode(NamedTuple):
    """One closed-loop episode."""

    ret: float
    """Sum of rewards (= −total cost)."""
    length: int
    observations: np.ndarray
    """``(T + 1, obs_dim)``."""
    actions: np.ndarray
    """``(T, act_dim)``."""
    costs: np.ndarray
    """``(T,)`` stage costs ``−reward``."""
    solve_ms: np.ndarray
    """``(T,)`` controller time per step."""
    failed: int
    """Steps whose solve failed (after the retry)."""
    fallback: int
    """Steps that used the shifted previous plan or the safe default (failures and overruns)."""
    overrun: int = 0
    """Steps whose solve ran past the controller's wall-time budget."""
    terminated: bool = False
    """The episode ended in a terminal state (not by the time limit)."""


def run_episodes(
    controller: Controller, env, episodes: int, seed: int = 0, render: bool = False
) -> tuple[list[Episode], list[np.ndarray]]:
    """Run ``episodes`` episodes (seeds ``seed, seed+1, …``); returns them and, with
    ``render``, the frames of the first one (rendered offscreen: :func:`qmpc.env.offscreen_gl`)."""
    out, frames = [], []
    for i in range(episodes):
        obs, _ = env.reset(seed=seed + i)
        controller.reset()
        O, A, C, T = [obs], [], [], []
        done = False
        while not done:
            a, info = controller.act(obs)
            if not (np.all(a >= controller.low) and np.all(a <= controller.high)):
                raise QmpcError(f"controller emitted {a} outside [{controller.low}, {controller.high}]")
            obs, r, term, trunc, _ = env.step(a)
            O.append(obs), A.append(a), C.append(-float(r)), T.append(info["solve_ms"])
            if render and i == 0:
                with offscreen_gl():
                    frames.append(env.render())
            done = term or trunc
        out.append(
            Episode(
                -float(np.sum(C)),
                len(C),
                np.array(O),
                np.array(A),
                np.array(C),
                np.array(T),
                controller.stats["failed"],
                controller.stats["fallback"],
                controller.stats["overrun"],
                bool(term),
            )
        )
    return out, frames


def run_batched(controller: BatchController, envs: list, episodes: int, seed: int = 0) -> list[Episode]:
    """Run ``episodes`` episodes (seeds ``seed, seed+1, …``, in the order they start) in the
    environments ``envs`` stepped together, one batched greedy solve per step for all of them
    (:class:`~qmpc.controller.BatchController`). An episode's ``solve_ms`` is, per step, the time of
    the batched solve it took part in; ``failed`` and ``fallback`` count its steps whose solve
    failed (the previous action was kept)."""
    steps: list[list[tuple[float, bool]]] = []  # per episode, in the order episodes start
    episode_of: dict[int, int] = {}  # environment slot -> the episode running there

    def policy(obs: np.ndarray, slots: np.ndarray, fresh: np.ndarray) -> np.ndarray:
        for k in slots[fresh]:  # batch_rollouts starts episodes in this order
            episode_of[int(k)] = len(steps)
            steps.append([])
        t0 = time.perf_counter()
        u = controller(obs, slots, fresh)
        ms = (time.perf_counter() - t0) * 1e3
        for k, fell_back in zip(slots, controller.last_fallback, strict=True):
            steps[episode_of[int(k)]].append((ms, bool(fell_back)))
        return u

    out = []
    for ep, rec in zip(batch_rollouts(envs, policy, seed, episodes=episodes), steps, strict=True):
        ms, fell_back = np.array([r[0] for r in rec]), sum(r[1] for r in rec)
        costs = -np.asarray(ep.rewards, np.float64)
        out.append(
            Episode(-float(costs.sum()), len(costs), ep.observations, ep.actions, costs, ms, fell_back, fell_back,
                    terminated=bool(np.any(ep.terminations)))
        )  # fmt: skip
    return out


def format_episodes(eps: list[Episode], timing: str = "solve times in ms per control step") -> str:
    """The per-episode table (costs are ``−reward``: lower is better); ``timing`` says what the
    solve times are."""
    head = (
        f"{'episode':>7} {'return':>10} {'length':>6} {'mean cost':>10} {'solve p50':>9} {'p99':>7} {'max':>7} "
        f"{'failed':>6} {'overrun':>7} {'fallback':>8}"
    )
    lines = [head, "-" * len(head)]
    for i, e in enumerate(eps):
        p50, p99, mx = np.percentile(e.solve_ms, 50), np.percentile(e.solve_ms, 99), e.solve_ms.max()
        lines.append(
            f"{i:>7} {e.ret:>10.2f} {e.length:>6} {e.costs.mean():>10.4f} {p50:>7.2f}ms {p99:>5.2f}ms "
            f"{mx:>5.2f}ms {e.failed:>6} {e.overrun:>7} {e.fallback:>8}"
        )
    rets = np.array([e.ret for e in eps])
    lines.append(
        f"{'mean':>7} {rets.mean():>10.2f} ± {rets.std():.2f} over {len(eps)} episodes (return = −total cost; {timing})"
    )
    return "\n".join(lines)


def plot_rollout(ep: Episode, low: np.ndarray, high: np.ndarray, path: str | Path, title: str = "") -> Path:
    """States, actions with their bounds, and per-step solve time of one episode, as a PNG
    (drawn on a :class:`matplotlib.figure.Figure` of its own: pyplot and its backend are left alone)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 3.4))
    axes = fig.subplots(1, 3)
    axes[0].plot(ep.observations)
    axes[0].set_title("states", fontsize=9)
    for j in range(ep.actions.shape[1]):
        line = axes[1].plot(ep.actions[:, j], label=f"u{j}")[0]
        for b in (low[j], high[j]):
            if np.isfinite(b):
                axes[1].axhline(b, color=line.get_color(), ls="--", lw=0.8)
    axes[1].set_title("actions (dashed: bounds)", fontsize=9)
    axes[2].plot(ep.solve_ms)
    axes[2].set_title("controller time per step (ms)", fontsize=9)
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title or f"return {ep.ret:.2f} (= −cost)", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=90, format="png"))
    return path


def write_video(frames: list[np.ndarray], path: str | Path, fps: int = 30) -> Path:
    """Write RGB frames as an MP4 (H.264 through imageio's ffmpeg)."""
    import imageio.v2 as imageio

    if not frames or frames[0] is None:
        raise QmpcError("expected rendered frames, got none (is the environment's render_mode 'rgb_array'?)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    with imageio.get_writer(tmp, fps=fps, macro_block_size=1) as w:
        for f in frames:
            w.append_data(np.asarray(f))
    os.replace(tmp, path)
    return path
