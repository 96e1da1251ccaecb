"""Control-step latency of the closed-loop controller, next to one MuJoCo step.

    python benchmarks/bench_controller.py [--steps 300]

For InvertedPendulum-v5- and HalfCheetah-v5-sized PICNNs (untrained, seeded) and horizons 1
and 10, runs the controller on states from a random rollout of the real environment and reports
p50 / p99 / max of ``Controller.act`` (solve + Python overhead) and of ``env.step``.
Horizon 10 plans through a stable random linear model of the task's size (``x⁺ = A x + B u``,
spectral radius 0.98: a stand-in for a linearisation along the plan) with a quadratic stage cost.
"""

from __future__ import annotations

import argparse
import time

import casadi as ca
import numpy as np
import torch

import qmpc
from qmpc.env import env_spec, make_env


def percentiles(ms: list[float]) -> tuple[float, float, float]:
    a = np.asarray(ms)
    return float(np.percentile(a, 50)), float(np.percentile(a, 99)), float(a.max())


def states(env_id: str, n: int, seed: int = 0) -> tuple[np.ndarray, list[float]]:
    env = make_env(env_id, seed=seed)
    obs, _ = env.reset(seed=seed)
    xs, step_ms = [], []
    for _ in range(n):
        xs.append(obs)
        a = env.action_space.sample()
        t0 = time.perf_counter()
        obs, _, term, trunc, _ = env.step(a)
        step_ms.append((time.perf_counter() - t0) * 1e3)
        if term or trunc:
            obs, _ = env.reset()
    return np.array(xs), step_ms


def stable_linear_model(nx: int, nu: int, seed: int = 0) -> dict:
    """A random linear model with spectral radius 0.98 and a quadratic stage cost."""
    rng = np.random.default_rng(seed)
    A = np.eye(nx) + 0.1 * rng.normal(size=(nx, nx))
    A *= 0.98 / max(abs(np.linalg.eigvals(A)))
    B = 0.1 * rng.normal(size=(nx, nu))
    x, u = ca.SX.sym("x", nx), ca.SX.sym("u", nu)
    f = ca.Function("f", [x, u], [ca.mtimes(A, x) + ca.mtimes(B, u)])
    c = ca.Function("c", [x, u], [ca.sumsqr(x) + 0.1 * ca.sumsqr(u)])
    return {"dynamics": f, "stage_cost": c}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--hidden", type=int, nargs="+", default=[64, 64])
    args = ap.parse_args()
    print(
        f"casadi {ca.__version__}, torch {torch.__version__}; PICNN hidden={tuple(args.hidden)}; "
        f"{args.steps} control steps per row; times in ms"
    )
    head = f"{'task':<20} {'H':>3} {'p50':>7} {'p99':>7} {'max':>7} {'fallback':>8}   {'mujoco step p50':>15}"
    print(head)
    print("-" * len(head))
    for env_id in ("InvertedPendulum-v5", "HalfCheetah-v5"):
        env = make_env(env_id)
        spec = env_spec(env)
        xs, step_ms = states(env_id, args.steps)
        torch.manual_seed(0)
        q = qmpc.PICNN(spec.obs_dim, spec.act_dim, hidden=tuple(args.hidden)).double()
        for horizon in (1, 10):
            model = {}
            if horizon > 1:
                model = stable_linear_model(spec.obs_dim, spec.act_dim)
            ctrl = qmpc.Controller(q, spec.low, spec.high, horizon=horizon, discount=0.99, **model)
            ctrl.act(xs[0])  # build the batch-1 maps outside the timings
            ctrl.reset()
            ms = []
            for x in xs:
                t0 = time.perf_counter()
                ctrl.act(x)
                ms.append((time.perf_counter() - t0) * 1e3)
            p50, p99, mx = percentiles(ms)
            print(
                f"{env_id:<20} {horizon:>3} {p50:>7.2f} {p99:>7.2f} {mx:>7.2f} {ctrl.stats['fallback']:>8}   "
                f"{np.percentile(step_ms, 50):>15.3f}"
            )


if __name__ == "__main__":
    main()
