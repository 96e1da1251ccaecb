"""MPC with the exact Riccati Q as cost-to-go on qmpc's point mass: every horizon gives the
LQR action, and the closed loop matches the LQR controller.

    python examples/closed_loop_lqr.py [--episodes 3] [--horizon 5]
"""

from __future__ import annotations

import argparse

import numpy as np

import qmpc
from qmpc.env import make_env
from qmpc.lqr import dare, lqr_q_matrix
from qmpc.runner import format_episodes, run_episodes


def main(episodes: int = 3, horizon: int = 5, gamma: float = 0.9) -> float:
    env = make_env("qmpc/PointMass-v0", seed=0)
    task = env.unwrapped
    A, B = task.linear_dynamics()
    _, K = dare(A, B, task.Qc, task.R, gamma)
    q = qmpc.QuadraticQ.from_quadratic(lqr_q_matrix(A, B, task.Qc, task.R, gamma), nx=4)
    f, c = task.casadi_model()
    ctrl = qmpc.Controller(
        q, env.action_space.low, env.action_space.high, horizon=horizon, dynamics=f, stage_cost=c, discount=gamma
    )
    eps, _ = run_episodes(ctrl, env, episodes, seed=0)
    print(format_episodes(eps))
    # the same states, LQR action: the largest difference along the first episode
    diff = max(
        np.abs(np.clip(-K @ o, -2, 2) - a).max() for o, a in zip(eps[0].observations, eps[0].actions, strict=False)
    )
    print(f"max |u_mpc - clip(-Kx)| along episode 0: {diff:.2e}")
    return diff


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--episodes", type=int, default=3)
    ap.add_argument("--horizon", type=int, default=5)
    a = ap.parse_args()
    main(a.episodes, a.horizon)
