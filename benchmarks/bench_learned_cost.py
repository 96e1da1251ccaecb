"""The learned stage cost and termination against the symbolic costs of :mod:`qmpc.costs`.

    python benchmarks/bench_learned_cost.py [--transitions 3000] [--iters 3000]

The shipped checkpoints in ``models/`` predate the learned heads, so for each of their tasks this
collects ``--transitions`` transitions with the shipped greedy controller (horizon 1) plus Gaussian
action noise (episodes of at most 100 steps, the noise scale drawn per episode from 0.1, 0.5, 1
and 3 of the half range, so that the balancing tasks also fall), fits an
:class:`~qmpc.dynamics.OutcomeModel` (the launch file's model widths) on the first 80 % of the
steps and reports, on the last 20 % (held out):

* the mean absolute error of the learned cost and of the symbolic cost (both in Q's units,
  ``−reward × train.cost_scale``) against the simulator's, and their relative error (MAE /
  standard deviation of the true cost; of its mean for a constant cost), on the steps that did
  not terminate (where the symbolic costs are exact or documented approximations);
* the learned cost's error against the symbolic cost;
* the fraction of terminal steps, the termination head's accuracy (``p > 0.5``) and its recall
  on the terminal steps.

Measured (3000 transitions, 3000 Adam steps of batch 256, ~40 s in all on 2 shared cores):

| task | train / test | std c | MAE learned (rel.) | MAE symbolic (rel.) | learned − sym. | terminal | acc. | recall |
|---|---|---|---|---|---|---|---|---|
| InvertedPendulum-v5 | 2400 / 600 | 0.099 | 0.000864 (0.9%) | 0 (0.0%) | 0.000864 | 1.0% | 99.5% | 50% |
| InvertedDoublePendulum-v5 | 2400 / 600 | 0.00688 | 0.00623 (90.5%) | 1.01e-07 (0.0%) | 0.00623 | 1.7% | 99.5% | 80% |
| Reacher-v5 | 2400 / 600 | 0.755 | 0.0194 (2.6%) | 6.17e-06 (0.0%) | 0.0194 | 0.0% | 100.0% | – |
| HalfCheetah-v5 | 2400 / 600 | 0.21 | 0.00707 (3.4%) | 0.0196 (9.3%) | 0.0195 | 0.0% | 100.0% | – |
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from qmpc.checkpoint import load_checkpoint
from qmpc.controller import Controller, scaled, trained_units
from qmpc.costs import stage_cost
from qmpc.dynamics import OutcomeModel
from qmpc.env import make_env

SIGMAS = [0.1, 0.5, 1.0, 3.0]
"""Action noise scales (of the half range), one drawn per episode; 3: nearly bang-bang random."""
EPISODE = 100
"""Episodes are cut after this many steps: many short episodes, many starts and falls."""
ROOT = Path(__file__).resolve().parents[1]
MODELS = {
    "InvertedPendulum-v5": "inverted_pendulum.pt",
    "InvertedDoublePendulum-v5": "inverted_double_pendulum.pt",
    "Reacher-v5": "reacher.pt",
    "HalfCheetah-v5": "half_cheetah.pt",
}


def collect(path: Path, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    ckpt = load_checkpoint(path)
    env = make_env(ckpt["spec"]["env_id"], seed=seed)
    ctrl = Controller.from_checkpoint(path, horizon=1)
    rng = np.random.default_rng(seed)
    half = 0.5 * (env.action_space.high - env.action_space.low)
    cols: dict[str, list] = {k: [] for k in ("obs", "act", "reward", "next_obs", "terminated", "episode")}
    obs, _ = env.reset(seed=seed)
    ctrl.reset()
    ep, sigma, t = 0, rng.choice(SIGMAS), 0
    for _ in range(n):
        a, _ = ctrl.act(obs)
        a = np.clip(a + sigma * half * rng.normal(size=a.shape), env.action_space.low, env.action_space.high)
        nxt, r, term, trunc, _ = env.step(a)
        for k, v in zip(cols, (obs, a, r, nxt, float(term), ep), strict=True):
            cols[k].append(v)
        obs, t = nxt, t + 1
        if term or trunc or t >= EPISODE:
            obs, _ = env.reset()
            ctrl.reset()
            ep, sigma, t = ep + 1, rng.choice(SIGMAS), 0
    return {k: np.asarray(v, np.float64) for k, v in cols.items()}


def fit(data: dict[str, np.ndarray], train: np.ndarray, cost: np.ndarray, hidden, activation, iters: int, seed: int):
    torch.manual_seed(seed)
    m = OutcomeModel(data["obs"].shape[1], data["act"].shape[1], hidden, activation)
    t = {k: torch.as_tensor(data[k][train], dtype=torch.float32) for k in ("obs", "act", "next_obs", "terminated")}
    c = torch.as_tensor(cost[train], dtype=torch.float32)
    m.fit_normalization(t["obs"], c)
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    rng = np.random.default_rng(seed)
    for _ in range(iters):
        i = torch.as_tensor(rng.integers(0, len(c), 256))
        c_loss, t_loss = m.losses(t["obs"][i], t["act"][i], t["next_obs"][i], c[i], t["terminated"][i])
        opt.zero_grad()
        (c_loss + t_loss).backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 10.0)
        opt.step()
    return m.double()


def evaluate(env_id: str, n: int, iters: int) -> dict[str, float]:
    path = ROOT / "models" / MODELS[env_id]
    ckpt = load_checkpoint(path)
    s = trained_units(ckpt)["cost_scale"]
    mc = ckpt.get("config", {}).get("model", {})
    t0 = time.perf_counter()
    data = collect(path, n)
    train = np.arange(n) < 0.8 * n  # held out: the last 20 % of the steps
    test = ~train
    cost = -data["reward"] * s
    m = fit(data, train, cost, mc.get("hidden", [64, 64]), mc.get("activation", "silu"), iters, 0)
    X, U, Xn = (data[k][test] for k in ("obs", "act", "next_obs"))
    with torch.no_grad():
        tx = [torch.from_numpy(a) for a in (X, U, Xn)]
        learned, p = m.cost(*tx).numpy(), m.termination(*tx).numpy()
    sym_f = scaled(stage_cost(make_env(env_id)), s).map(len(X))
    symbolic = np.asarray(sym_f(X.T, U.T, Xn.T)).ravel()
    true, term = cost[test], data["terminated"][test].astype(bool)
    alive = ~term
    std = float(np.std(true[alive])) if np.std(true[alive]) > 1e-9 else abs(float(np.mean(true)))
    return {
        "train": int(train.sum()),
        "test": int(test.sum()),
        "std": std,
        "mae_learned": float(np.mean(np.abs(learned - true)[alive])),
        "mae_symbolic": float(np.mean(np.abs(symbolic - true)[alive])),
        "mae_learned_vs_symbolic": float(np.mean(np.abs(learned - symbolic)[alive])),
        "term_rate": float(term.mean()),
        "term_acc": float(np.mean((p > 0.5) == term)),
        "term_recall": float(np.mean(p[term] > 0.5)) if term.any() else float("nan"),
        "s": time.perf_counter() - t0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--transitions", type=int, default=3000)
    ap.add_argument("--iters", type=int, default=3000)
    ap.add_argument("--tasks", nargs="*", default=list(MODELS))
    args = ap.parse_args()
    print(
        "| task | train / test | std c | MAE learned (rel.) | MAE symbolic (rel.) | learned vs symbolic | "
        "terminal | term. accuracy | terminal recall | s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for env_id in args.tasks:
        r = evaluate(env_id, args.transitions, args.iters)
        std = r["std"]
        print(
            f"| {env_id} | {r['train']} / {r['test']} | {std:.3g} | {r['mae_learned']:.3g} "
            f"({r['mae_learned'] / std:.1%}) | {r['mae_symbolic']:.3g} ({r['mae_symbolic'] / std:.1%}) | "
            f"{r['mae_learned_vs_symbolic']:.3g} | {r['term_rate']:.1%} | {r['term_acc']:.1%} | "
            f"{r['term_recall']:.0%} | {r['s']:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
