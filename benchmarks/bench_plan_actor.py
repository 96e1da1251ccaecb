"""What a run that acts with the plan (``train.horizon > 1``) pays for its controller: the rebuild
from the policy every ``train.plan_refresh`` steps, with the NLP plugins built at construction
(``lazy_plugins=False``) and at their first use (``True``, what :mod:`qmpc.plan_actor` builds),
side by side in this process, and one control step of the rebuilt controller.

    python benchmarks/bench_plan_actor.py [--checkpoint models/hopper.pt] [--horizon 3]
                                          [--rebuilds 30] [--steps 50]

Reads the checkpoint's saved training config (trust region, termination) as the run would;
prints the median and p90 rebuild time of each arm (alternated, one rebuild each in turn), their
ratio, the control step's p50 / p99 on ``--steps`` states of a closed loop, and whether both arms
act the same.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from qmpc.checkpoint import load_checkpoint
from qmpc.config import config_from_dict
from qmpc.env import make_env
from qmpc.plan_actor import plan_controller

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=str(ROOT / "models" / "hopper.pt"))
    ap.add_argument("--horizon", type=int, default=3)
    ap.add_argument("--rebuilds", type=int, default=30)
    ap.add_argument("--steps", type=int, default=50)
    args = ap.parse_args()
    torch.set_num_threads(1)  # as training runs (train.torch_threads = 1)
    policy = load_checkpoint(args.checkpoint)
    tc = config_from_dict(policy["config"]).train
    env = make_env(policy["spec"]["env_id"], seed=0)
    times: dict[bool, list[float]] = {False: [], True: []}
    # the kernels loaded before any is timed
    ctrl = {lazy: plan_controller(tc, policy, args.horizon, env, lazy_plugins=lazy) for lazy in (False, True)}
    for _ in range(args.rebuilds):
        for lazy in (False, True):
            t = time.perf_counter()
            ctrl[lazy] = plan_controller(tc, policy, args.horizon, env, lazy_plugins=lazy)
            times[lazy].append(1e3 * (time.perf_counter() - t))
    step_ms, same = [], True
    x, _ = env.reset(seed=0)
    for _ in range(args.steps):
        t = time.perf_counter()
        u, _ = ctrl[True].act(x)
        step_ms.append(1e3 * (time.perf_counter() - t))
        same &= bool(np.array_equal(u, ctrl[False].act(x)[0]))
        x, _, term, trunc, _ = env.step(u)
        if term or trunc:
            x, _ = env.reset()
            ctrl[True].reset(), ctrl[False].reset()
    med = {k: float(np.median(v)) for k, v in times.items()}
    print(f"{policy['spec']['env_id']}, H = {args.horizon}, {args.rebuilds} rebuilds each, alternated")
    print("| plugins | rebuild median | p90 |")
    print("|---|---|---|")
    for lazy, name in ((False, "at construction"), (True, "at first use (the plan actor's)")):
        print(f"| {name} | {med[lazy]:.1f} ms | {np.percentile(times[lazy], 90):.1f} ms |")
    print(f"ratio (construction / first use): {med[False] / med[True]:.2f}")
    p50, p99 = np.percentile(step_ms, [50, 99])
    print(f"control step of the rebuilt controller: p50 {p50:.2f} ms, p99 {p99:.2f} ms")
    print(f"both arms act the same on all {args.steps} steps: {same}")


if __name__ == "__main__":
    main()
