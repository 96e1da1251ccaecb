"""Control-step latency of the closed-loop controller, next to one MuJoCo step.

    python benchmarks/bench_controller.py [--steps 300] [--codegen]

For InvertedPendulum-v5 and HalfCheetah-v5, with the Q network and dynamics model sized as in
their launch files (untrained, seeded), runs the controller on states from a random rollout of
the real environment and reports p50 / p99 / max of ``Controller.act`` (solve + Python overhead)
and of ``env.step``. Horizon 10 plans through (a) the learned-model architecture of the launch
file (an MLP with baked weights, normalised on the rollout) with the task's stage cost from
:mod:`qmpc.costs`, and (b) a stable random linear model of the task's size (``x⁺ = A x + B u``,
spectral radius 0.98) with a quadratic cost, the cost of a linearised model; each with single
shooting (the controller's default: states eliminated, condensed exact Hessian) and multiple
shooting (states as variables) side by side. Rows for the
shipped checkpoints in ``models/`` show trained networks. ``--codegen`` adds, per row, raw
solver calls through CasADi's virtual machine next to the same solver generated as C and
compiled (the measurement behind qmpc not generating code: see the README).
"""

from __future__ import annotations

import argparse
import time

import casadi as ca
import numpy as np
import torch

import qmpc
from qmpc.env import env_spec, make_env


def _is_number(text: str) -> bool:
    try:
        return bool(np.isfinite(float(text)))
    except ValueError:
        return False


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
    derivatives = m.stage_derivatives()  # closed form, for single shooting
    return {"dynamics": m.casadi_function(), "dynamics_derivatives": derivatives, "stage_cost": stage_cost(env)}


def time_controller(ctrl: qmpc.Controller, xs: np.ndarray) -> list[float]:
    ctrl.act(xs[0])  # build the batch-1 maps outside the timings
    ctrl.reset()
    ms = []
    for x in xs:
        t0 = time.perf_counter()
        ctrl.act(x)
        ms.append((time.perf_counter() - t0) * 1e3)
    return ms


def codegen_rows(P, theta, lbw, ubw, xs: np.ndarray, label: str) -> None:
    """Raw ``nlpsol`` calls (no controller overhead, cold starts) with CasADi's virtual machine
    against the same solver generated as C and compiled with ``cc -O2``, side by side."""
    import shutil
    import subprocess
    import tempfile

    from qmpc.solver import SolverOptions, _plugin_options

    if shutil.which("cc") is None:
        print(f"{label}: no C compiler, codegen rows skipped")
        return
    opts = _plugin_options(SolverOptions(max_iter=50, tol=1e-8, convexify="none"))  # convexify has no codegen
    vm = ca.nlpsol("vm", "sqpmethod", P.nlp, opts)
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        gen = ca.CodeGenerator("qmpc_cg.c")
        gen.add(vm)
        gen.generate(d + "/")
        subprocess.run(["cc", "-O2", "-fPIC", "-shared", f"{d}/qmpc_cg.c", "-o", f"{d}/qmpc_cg.so", "-lm"], check=True)
        build = time.perf_counter() - t0
        compiled = ca.external("vm", f"{d}/qmpc_cg.so")
        res = {}
        for name, f in (("VM", vm), ("C", compiled)):
            ms = []
            for x in xs[:100]:
                t0 = time.perf_counter()
                try:
                    f(x0=0, p=ca.vertcat(x, theta), lbx=lbw, ubx=ubw, lbg=0, ubg=0)
                except RuntimeError:  # the generated solver returns an error flag on failure
                    pass
                ms.append((time.perf_counter() - t0) * 1e3)
            res[name] = percentiles(ms)
    print(
        f"{label}: raw nlpsol p50 VM {res['VM'][0]:.2f} ms, generated C {res['C'][0]:.2f} ms "
        f"(ratio {res['C'][0] / res['VM'][0]:.2f}; build {build:.1f} s)",
        flush=True,
    )


SHIPPED = {
    "inverted_pendulum": 40.0,
    "inverted_pendulum_plan": 40.0,
    "inverted_double_pendulum": 50.0,
    "inverted_double_pendulum_plan": 50.0,
    "reacher": 20.0,
    "half_cheetah": 50.0,
    "hopper": 8.0,
    "walker2d": 8.0,
}
"""Shipped checkpoints and their tasks' control periods (ms): the latency a step must meet."""


def closed_loop_row(path, horizon: int, shooting: str, steps: int, seed: int = 100, trust_region: float = 0.0) -> dict:
    """The controller of a shipped checkpoint in closed loop on its own rollout (no time budget,
    so every step is solved to the end): solve rate, fallbacks, step-time percentiles, return."""
    from qmpc.checkpoint import load_checkpoint
    from qmpc.solver import Status

    kw = {"shooting": shooting, "trust_region": trust_region} if horizon > 1 else {}
    ctrl = qmpc.Controller.from_checkpoint(path, horizon=horizon, model="learned", **kw)
    env = make_env(load_checkpoint(path)["spec"]["env_id"])
    obs, _ = env.reset(seed=seed)
    ctrl.act(obs)  # build the batch-1 functions outside the timings
    ctrl.reset()
    ms, solved, first, ret, n = [], 0, 0, 0.0, 0
    while n < steps:
        t0 = time.perf_counter()
        a, info = ctrl.act(obs)
        ms.append((time.perf_counter() - t0) * 1e3)
        solved += bool(Status.ok(np.array([info["status"]]))[0]) and not info["fallback"]
        first += info["status"] == Status.SOLVED
        obs, r, term, trunc, _ = env.step(a)
        ret, n = ret + float(r), n + 1
        if term or trunc:
            obs, _ = env.reset(seed=seed + n)
            ctrl.reset()
    p50, p99, mx = percentiles(ms)
    shooting = ctrl.problem.shooting if horizon > 1 else "-"
    return {"H": horizon, "shooting": shooting, "steps": n, "solved": solved / n, "first": first / n,
            "fallback": ctrl.stats["fallback"], "p50": p50, "p99": p99, "max": mx, "return": ret,
            "rho": ctrl.trust_region if horizon > 1 else 0.0}  # fmt: skip


def _trust_regions(path, shooting: str, asked: tuple[str, ...]) -> list[float]:
    """The trust regions of a plan's rows: ``checkpoint`` is the one ``qmpc run`` plans with by
    default (the checkpoint's ``train.trust_region``, 0 without one); none for multiple shooting."""
    from qmpc.checkpoint import load_checkpoint

    if shooting != "single":
        return [0.0]
    own = float(load_checkpoint(path).get("config", {}).get("train", {}).get("trust_region", 0.0))
    return sorted({own if a == "checkpoint" else float(a) for a in asked})


def shipped_table(
    root,
    steps: int,
    horizons: tuple[int, ...],
    shootings: tuple[str, ...],
    trust: tuple[str, ...] = ("checkpoint",),
    names: tuple[str, ...] | None = None,
) -> None:
    """One row per shipped checkpoint (of ``names``, default all), horizon, shooting and trust
    region, on the states of its own rollout."""
    print(f"\nshipped checkpoints, closed loop on their own rollouts ({steps} steps each, no budget, learned model)")
    head = (
        f"{'checkpoint':<36} {'H':>2} {'shooting':<9} {'rho':>5} {'solved':>7} {'1st try':>7} {'fallback':>8} "
        f"{'p50':>7} {'p99':>7} {'max':>7} {'period':>6} {'return':>9}"
    )
    print(head)
    print("-" * len(head))
    for task, period in SHIPPED.items():
        if names and task not in names:
            continue
        path = root / "models" / f"{task}.pt"
        cases = [(1, "-", 0.0)] + [
            (h, s, rho) for h in horizons if h > 1 for s in shootings for rho in _trust_regions(path, s, trust)
        ]
        for horizon, shooting, rho in cases:
            r = closed_loop_row(path, horizon, shooting, steps, trust_region=rho)
            print(
                f"{'models/' + path.name:<36} {r['H']:>2} {r['shooting']:<9} {r['rho']:>5g} {100 * r['solved']:>6.1f}% "
                f"{100 * r['first']:>6.1f}% {r['fallback']:>8} {r['p50']:>7.2f} {r['p99']:>7.2f} {r['max']:>7.2f} "
                f"{period:>6.0f} {r['return']:>9.1f}",
                flush=True,
            )


def main() -> None:
    from pathlib import Path

    from qmpc.config import load_config

    root = Path(__file__).resolve().parents[1]
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--codegen", action="store_true", help="also time CasADi-generated C solvers (needs cc)")
    ap.add_argument("--shipped-only", action="store_true", help="only the shipped checkpoints' closed-loop table")
    ap.add_argument("--shipped-steps", type=int, default=300, help="closed-loop steps per shipped-checkpoint row")
    ap.add_argument("--horizons", type=int, nargs="+", default=[3, 5], help="horizons > 1 of the shipped table")
    ap.add_argument(
        "--shootings", nargs="+", default=["single", "multiple"], choices=["single", "multiple"],
        help="shootings of the shipped table's rows with H > 1",
    )  # fmt: skip
    ap.add_argument(
        "--trust-regions", nargs="+", default=["checkpoint"],
        help="trust regions of the shipped single-shooting plans: numbers, or 'checkpoint' (its own, as qmpc run)",
    )  # fmt: skip
    ap.add_argument("--checkpoints", nargs="+", default=None, help="only these of the shipped checkpoints (names)")
    args = ap.parse_args()
    for name in args.checkpoints or []:
        if name not in SHIPPED:
            ap.error(f"expected --checkpoints among {sorted(SHIPPED)}, got {name!r}")
    for rho in args.trust_regions:
        if rho != "checkpoint" and not (_is_number(rho) and 0.0 <= float(rho)):
            ap.error(f"expected --trust-regions as numbers >= 0 or 'checkpoint', got {rho!r}")
    shipped = (args.shipped_steps, tuple(args.horizons), tuple(args.shootings), tuple(args.trust_regions))
    names = tuple(args.checkpoints or ())
    if args.shipped_only:
        shipped_table(root, *shipped, names=names)
        return
    print(f"casadi {ca.__version__}, torch {torch.__version__}; {args.steps} control steps per row; times in ms")
    head = (
        f"{'task':<20} {'network':<22} {'H':>3} {'model':<22} {'shooting':<9} {'p50':>7} {'p99':>7} {'max':>7} "
        f"{'fallback':>8}   {'mujoco step p50':>15}"
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
        rows = [(net, 1, "-", {}, "-")]
        mh = "x".join(map(str, cfg.model.hidden))
        learned = learned_model(env, xs, cfg.model.hidden, cfg.model.activation)
        linear = stable_linear_model(spec.obs_dim, spec.act_dim)
        for model_name, model in ((f"learned MLP {mh}", learned), ("linear", linear)):
            rows += [(net, 10, model_name, model, shooting) for shooting in ("single", "multiple")]
        p50s, p99s = {}, {}
        for name, horizon, model_name, model, shooting in rows:
            kw = {"shooting": shooting} if horizon > 1 else {}
            ctrl = qmpc.Controller(q, spec.low, spec.high, horizon=horizon, discount=0.99, **model, **kw)
            p50, p99, mx = percentiles(time_controller(ctrl, xs))
            p50s[(model_name, shooting)], p99s[(model_name, shooting)] = p50, p99
            print(
                f"{env_id:<20} {name:<22} {horizon:>3} {model_name:<22} {shooting:<9} {p50:>7.2f} {p99:>7.2f} "
                f"{mx:>7.2f} {ctrl.stats['fallback']:>8}   {np.percentile(step_ms, 50):>15.3f}",
                flush=True,
            )
            if args.codegen and model_name != "linear" and shooting != "single":  # no callbacks in C
                P = ctrl.planner.problem
                theta = ctrl.planner.problem_theta()
                codegen_rows(P, theta, P.lbw, P.ubw, xs, f"  {env_id} H={horizon} {model_name}")
        for model_name in (f"learned MLP {mh}", "linear"):
            r = p50s[(model_name, "multiple")] / p50s[(model_name, "single")]
            print(f"  {env_id} H=10 {model_name}: single shooting is {r:.1f}x faster than multiple (p50)")
        # the targets: H = 1 p99 < 1 ms on InvertedPendulum-v5, H = 10 p50 < 10 ms
        if task == "inverted_pendulum":
            p99 = p99s[("-", "-")]
            print(f"  target H=1 p99 < 1 ms: {p99:.2f} ms, {'met' if p99 < 1 else 'NOT met'}")
        p50 = p50s[(f"learned MLP {mh}", "single")]
        print(
            f"  target H=10 p50 < 10 ms (learned model, default shooting): {p50:.2f} ms, "
            f"{'met' if p50 < 10 else 'NOT met'}"
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
                shooting = "-" if horizon == 1 else ctrl.problem.shooting
                print(
                    f"{env_id:<20} {'models/' + shipped.name:<22} {horizon:>3} {model_name:<22} {shooting:<9} "
                    f"{p50:>7.2f} {p99:>7.2f} {mx:>7.2f} {ctrl.stats['fallback']:>8}   "
                    f"{np.percentile(step_ms, 50):>15.3f}",
                    flush=True,
                )
    shipped_table(root, *shipped, names=names)


if __name__ == "__main__":
    main()
