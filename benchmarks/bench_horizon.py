"""Closed-loop quality of the greedy controller (H = 1) against MPC through the learned model
(H > 1), on trained checkpoints.

    python benchmarks/bench_horizon.py [--checkpoints models/inverted_pendulum.pt ...]
                                       [--horizons 1 10] [--episodes 10] [--seed 100]
                                       [--shooting single multiple]

For every checkpoint and horizon, runs ``--episodes`` episodes (seeds ``seed, seed+1, …``, the
same for every horizon) and prints one table: mean ± std return (sum of rewards = −total cost),
mean length, control-step time p50 / p99 and fallback steps. Horizons > 1 plan through the
checkpoint's learned dynamics model (``model.learn = true``) with the task's stage cost
(:mod:`qmpc.costs`) and Q as the cost-to-go. ``--obs-noise ε`` adds seeded ``N(0, ε²)`` noise to
every observation the controller sees (not to the simulation): a control for how much a closed
loop amplifies differences of that size between two runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import gymnasium
import numpy as np

from qmpc.checkpoint import load_checkpoint
from qmpc.controller import TERMINATIONS, Controller
from qmpc.env import make_env
from qmpc.runner import run_episodes

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = [ROOT / "models" / f"{n}.pt" for n in ("inverted_pendulum", "inverted_double_pendulum", "reacher")]


class ObservationNoise(gymnasium.ObservationWrapper):
    """Adds ``N(0, eps²)`` to every observation (seeded), leaving the simulated state alone."""

    def __init__(self, env, eps: float, seed: int = 0):
        super().__init__(env)
        self.eps, self.rng = float(eps), np.random.default_rng(seed)

    def observation(self, observation):
        return observation + self.eps * self.rng.normal(size=np.shape(observation))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoints", nargs="+", default=[str(p) for p in DEFAULT])
    ap.add_argument("--horizons", type=int, nargs="+", default=[1, 10])
    ap.add_argument("--episodes", type=int, default=10)
    ap.add_argument("--seed", type=int, default=100)
    ap.add_argument("--model", default="learned", help="model source for H > 1 (see qmpc run --model)")
    ap.add_argument("--shooting", nargs="+", default=["auto"], help="for H > 1, one row each: auto, single, multiple")
    rho_help = "for H > 1, one row each: the plan's trust region around the greedy plan (qmpc run --trust-region)"
    ap.add_argument("--trust-region", type=float, nargs="+", default=[0.0], help=rho_help)
    ap.add_argument("--termination", default="auto", choices=TERMINATIONS, help="for H > 1 (qmpc run --termination)")
    ap.add_argument("--obs-noise", type=float, default=0.0, help="std of noise added to each observation (0: none)")
    args = ap.parse_args()
    head = (
        f"{'checkpoint':<22} {'task':<26} {'H':>3} {'shooting':<9} {'trust':>5} {'return (mean ± std)':>22} "
        f"{'length':>7} {'step p50':>9} {'p99':>8} {'fallback':>8}"
    )
    rows = []
    for path in args.checkpoints:
        env_id = load_checkpoint(path)["spec"]["env_id"]
        p = Path(path)
        in_run_dir = p.name in ("policy.pt", "checkpoint.pt")
        label = (p.parent.name if in_run_dir else p.stem)[:22]  # a run directory's, or the file's
        rows_of = [(hh, s, t) for hh in args.horizons for s in (args.shooting if hh > 1 else ["-"])
                   for t in (args.trust_region if hh > 1 else [0.0])]  # fmt: skip
        for h, shooting, rho in rows_of:
            kw = {"shooting": shooting, "trust_region": rho} if h > 1 else {}
            ctrl = Controller.from_checkpoint(path, horizon=h, model=args.model, termination=args.termination, **kw)
            shooting = ctrl.problem.shooting if h > 1 else "-"
            env = make_env(env_id)
            env = ObservationNoise(env, args.obs_noise) if args.obs_noise else env
            eps, _ = run_episodes(ctrl, env, args.episodes, seed=args.seed)
            rets = np.array([e.ret for e in eps])
            ms = np.concatenate([e.solve_ms for e in eps])
            row = (
                f"{label:<22} {env_id:<26} {h:>3} {shooting:<9} {rho:>5g} {rets.mean():>12.1f} ± {rets.std():>7.1f} "
                f"{np.mean([e.length for e in eps]):>7.0f} {np.percentile(ms, 50):>7.2f}ms "
                f"{np.percentile(ms, 99):>6.2f}ms {sum(e.fallback for e in eps):>8}"
            )
            rows.append(row)
            print(row, flush=True)
    noise = f", observation noise {args.obs_noise:g}" if args.obs_noise else ""
    print(f"\n{args.episodes} episodes per row (seeds {args.seed}…), model for H > 1: {args.model}, "
          f"termination: {args.termination}{noise}")  # fmt: skip
    print(head)
    print("-" * len(head))
    print("\n".join(rows))


if __name__ == "__main__":
    main()
