"""Control-step latency of the closed-loop controller, next to one MuJoCo step.

    python benchmarks/bench_controller.py [--steps 300]

For InvertedPendulum-v5 and HalfCheetah-v5, with the Q network and dynamics model sized as in
their launch files (untrained, seeded), runs the controller on states from a random rollout of
the real environment and reports p50 / p99 / max of ``Controller.act`` (solve + Python overhead)
and of ``env.step``. Horizon 10 plans through (a) the learned-model architecture of the launch
file (an MLP with baked weights, normalised on the rollout) with the task's stage cost from
:mod:`qmpc.costs`, and (b) a stable random linear model of the task's size (``x⁺ = A x + B u``,
spectral radius 0.98) with a quadratic cost, the cost of a linearised model. Rows for the
shipped checkpoints in ``models/`` show trained networks.
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


def learned_model(env, xs: np.ndarray, hidden: list[int], activation: str) -> dict:
    """An untrained learned-model architecture, normalised on ``xs``, with the task's stage cost."""
    from qmpc.costs import stage_cost
    from qmpc.dynamics import DynamicsModel

    spec = env_spec(env)
    m = DynamicsModel(spec.obs_dim, spec.act_dim, hidden, activation).double()
    x = torch.as_tensor(xs)
    m.fit_normalization(x[:-1], x[1:])
    return {"dynamics": m.casadi_function(), "stage_cost": stage_cost(env)}


def time_controller(ctrl: qmpc.Controller, xs: np.ndarray) -> list[float]:
    ctrl.act(xs[0])  # build the batch-1 maps outside the timings
    ctrl.reset()
    ms = []
    for x in xs:
        t0 = time.perf_counter()
        ctrl.act(x)
        ms.append((time.perf_counter() - t0) * 1e3)
    return ms


def main() -> None:
    from pathlib import Path

    from qmpc.config import load_config

    root = Path(__file__).resolve().parents[1]
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args()
    print(f"casadi {ca.__version__}, torch {torch.__version__}; {args.steps} control steps per row; times in ms")
    head = (
        f"{'task':<20} {'network':<22} {'H':>3} {'model':<22} {'p50':>7} {'p99':>7} {'max':>7} {'fallback':>8}"
        f"   {'mujoco step p50':>15}"
    )
    print(head)
    print("-" * len(head))
    for task, env_id in (("inverted_pendulum", "InvertedPendulum-v5"), ("half_cheetah", "HalfCheetah-v5")):
        cfg = load_config(root / "launch" / f"{task}.toml")
        env = make_env(env_id)
        spec = env_spec(env)
        xs, step_ms = states(env_id, args.steps)
        torch.manual_seed(0)
        q = qmpc.PICNN(spec.obs_dim, spec.act_dim, hidden=tuple(cfg.network.hidden)).double()
        net = f"PICNN {'x'.join(map(str, cfg.network.hidden))} untrained"
        rows = [(net, 1, "-", {})]
        mh = "x".join(map(str, cfg.model.hidden))
        rows.append((net, 10, f"learned MLP {mh}", learned_model(env, xs, cfg.model.hidden, cfg.model.activation)))
        rows.append((net, 10, "linear", stable_linear_model(spec.obs_dim, spec.act_dim)))
        for name, horizon, model_name, model in rows:
            ctrl = qmpc.Controller(q, spec.low, spec.high, horizon=horizon, discount=0.99, **model)
            p50, p99, mx = percentiles(time_controller(ctrl, xs))
            print(
                f"{env_id:<20} {name:<22} {horizon:>3} {model_name:<22} {p50:>7.2f} {p99:>7.2f} {mx:>7.2f} "
                f"{ctrl.stats['fallback']:>8}   {np.percentile(step_ms, 50):>15.3f}",
                flush=True,
            )
        shipped = root / "models" / f"{task}.pt"
        if shipped.exists():
            for horizon in (1, 10):
                try:
                    ctrl = qmpc.Controller.from_checkpoint(shipped, horizon=horizon, model="learned")
                except qmpc.QmpcError:  # a checkpoint without a learned model: H = 1 only
                    continue
                p50, p99, mx = percentiles(time_controller(ctrl, xs))
                model_name = "-" if horizon == 1 else "learned (trained)"
                print(
                    f"{env_id:<20} {'models/' + shipped.name:<22} {horizon:>3} {model_name:<22} {p50:>7.2f} "
                    f"{p99:>7.2f} {mx:>7.2f} {ctrl.stats['fallback']:>8}   {np.percentile(step_ms, 50):>15.3f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
