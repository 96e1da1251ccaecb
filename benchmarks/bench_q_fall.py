"""Does Q see a fall coming? Q's error against what the greedy controller then pays, by steps before the end.

    python benchmarks/bench_q_fall.py --checkpoint RUN/policy.pt [--episodes 10] [--seed 100]

Runs the checkpoint's greedy controller (H = 1) for ``--episodes`` episodes of its task (reset
seeds ``seed + i``) and compares, at every step, Q's value of the action taken with the discounted
cost-to-go the episode then paid (costs × ``train.cost_scale``, γ the run's, nothing after a
termination; steps whose discounted tail a truncation cuts short are left out, as ``eval/q_bias``
does). The table groups the steps of episodes that ended by termination (a fall) by how many steps
before it they were taken, and gives the steps of episodes that did not fall on their own row.
Negative errors are an optimistic Q (less cost than was paid). A Q that sees the fall coming has
errors near zero at every distance; one that sees it only at the last moment has them near zero
only in the last rows.
"""

from __future__ import annotations

import argparse

import numpy as np

from qmpc.checkpoint import load_checkpoint
from qmpc.controller import Controller, trained_units
from qmpc.env import make_env
from qmpc.runner import run_episodes
from qmpc.trainer import q_gaps

BINS = ((0, 5), (5, 15), (15, 40), (40, 100), (100, 300), (300, None))
"""Steps before the termination, ``[lo, hi)``; the last bin is open-ended."""


def _label(lo: int, hi: int | None) -> str:
    return f"{lo}+ steps before a fall" if hi is None else f"{lo}–{hi - 1} steps before a fall"


def table(errors) -> list[tuple[str, int, float, float, float]]:
    """Rows ``(label, steps, mean Q − G, its std, mean G)``: the falls' steps by distance to the fall,
    then the steps of the episodes that did not fall."""
    groups: dict[str, list[tuple[float, float]]] = {_label(*b): [] for b in BINS}
    groups["episodes that did not fall"] = []
    for err, g, valid, terminated in errors:
        before = len(err) - np.arange(len(err))
        for k, e, gk, ok in zip(before, err, g, valid, strict=True):
            if not ok:
                continue
            label = "episodes that did not fall"
            if terminated:
                label = _label(*next(b for b in BINS if b[0] <= k and (b[1] is None or k < b[1])))
            groups[label].append((e, gk))
    rows = []
    for label, v in groups.items():
        if v:
            a = np.array(v)
            rows.append((label, len(a), float(a[:, 0].mean()), float(a[:, 0].std()), float(a[:, 1].mean())))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--episodes", type=int, default=10)
    ap.add_argument("--seed", type=int, default=100)
    args = ap.parse_args()
    ckpt = load_checkpoint(args.checkpoint)
    units = trained_units(ckpt)
    env = make_env(ckpt["spec"]["env_id"])
    controller = Controller.from_policy(ckpt, env=env, where=args.checkpoint)
    done, _ = run_episodes(controller, env, args.episodes, seed=args.seed)
    print(f"{args.checkpoint}: {len(done)} episodes from reset seed {args.seed}")
    for e in done:
        print(f"  return {e.ret:8.1f}  length {len(e.costs):4d}  {'fell' if e.terminated else 'did not fall'}")
    print(f"\n{'steps':<32} {'n':>6} {'Q − G mean':>11} {'std':>6} {'G mean':>8}")
    gaps = q_gaps(controller.q, done, units["discount"], units["cost_scale"])
    errors = [(gap.error, gap.cost_to_go, gap.valid, e.terminated) for gap, e in zip(gaps, done, strict=True)]
    for label, n, mean, std, g in table(errors):
        print(f"{label:<32} {n:>6} {mean:>11.2f} {std:>6.2f} {g:>8.2f}")


if __name__ == "__main__":
    main()
