"""Training throughput, side by side in one process: qmpc (its launch file) against
Stable-Baselines3 SAC (defaults), training steps per second after ``learning_starts``.

    pip install -e ".[benchmark]"
    python benchmarks/bench_throughput.py [--tasks inverted_pendulum half_cheetah] [--steps 300]
                                          [--variants newton plugin] [--methods qmpc SAC]
                                          [--runs 3] [--set model.updates_per_step=1 ...]

For each task, qmpc trains its launch file for ``learning_starts + --steps`` environment steps
(the same code path as ``qmpc train``; no evaluation or checkpoint inside the timed window) and
SAC learns for its own ``learning_starts + --steps``, once before and once after qmpc's runs
(this machine's speed drifts by ±20 % over minutes: SAC's rate is the mean of the two).
Throughput is counted over the learning steps only. qmpc's per-stage times come from the run's
``time/*_ms`` metrics (mean per learning step): the TD loss (its solves and forward pass), the
solves alone (``solver/solve_ms``), the update (backward, Adam, Polyak), the dynamics model's
updates, the actor's solve and the environment step. ``--variants``: ``newton`` (the batched
Newton of the TD target, the default) and ``plugin`` (``solver.newton = false``: one CasADi
solve per sample). ``--runs``: the whole comparison repeated (a row per run); ``--set``: overrides
of every qmpc run's launch file.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from qmpc.config import load_config
from qmpc.env import make_env
from qmpc.trainer import read_metrics, train

ROOT = Path(__file__).resolve().parents[1]
STAGES = [
    ("time/td_loss_ms", "TD loss"),
    ("solver/solve_ms", "of it solves"),
    ("time/update_ms", "update"),
    ("time/model_ms", "model"),
    ("time/act_ms", "act"),
    ("time/env_ms", "env"),
]


def run_qmpc(
    task: str, steps: int, variant: str, out: Path, extra: list[str] = ()
) -> tuple[str, float, dict[str, float]]:
    cfg = load_config(ROOT / "launch" / f"{task}.toml")
    start = cfg.train.learning_starts
    sets = [
        f"train.steps={start + steps}",
        f"train.eval_every={10 * (start + steps)}",
        "train.eval_episodes=1",
        f"train.checkpoint_every={10 * (start + steps)}",
        "train.log_every=1",
        f"solver.newton={'true' if variant == 'newton' else 'false'}",
        f'run_dir="{out / f"{task}-{variant}"}"',
        *extra,
    ]
    cfg = load_config(ROOT / "launch" / f"{task}.toml", sets)
    train(cfg, progress=False)
    m = read_metrics(cfg.resolved_run_dir() / "metrics.csv")

    def mean_after(tag: str) -> float:
        if tag not in m:
            return 0.0
        s, v = m[tag]
        sel = (s > start) & (s < start + steps)  # the last step holds the final evaluation
        return float(v[sel].mean()) if sel.any() else 0.0

    per_step = mean_after("time/step_ms")
    return cfg.env.id, 1e3 / per_step, {tag: mean_after(tag) for tag, _ in STAGES}


def run_sac(env_id: str, steps: int) -> float:
    from stable_baselines3 import SAC
    from stable_baselines3.common.callbacks import BaseCallback

    model = SAC("MlpPolicy", make_env(env_id, seed=0), seed=0, verbose=0, device="cpu")
    start = model.learning_starts
    marks: dict[str, float] = {}

    class Clock(BaseCallback):
        def _on_step(self) -> bool:
            if self.num_timesteps == start + 1:
                marks["t0"] = time.perf_counter()
            if self.num_timesteps == start + 1 + steps:
                marks["t1"] = time.perf_counter()
            return True

    model.learn(total_timesteps=start + steps + 1, callback=Clock())
    return steps / (marks["t1"] - marks["t0"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=["inverted_pendulum", "half_cheetah"])
    ap.add_argument("--steps", type=int, default=500, help="learning steps timed per run")
    ap.add_argument("--variants", nargs="+", default=["newton", "plugin"], choices=["newton", "plugin"])
    ap.add_argument("--methods", nargs="+", default=["qmpc", "SAC"], choices=["qmpc", "SAC"])
    ap.add_argument("--runs", type=int, default=1, help="repeat the whole side-by-side comparison")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a field of qmpc's runs")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)  # as qmpc's train.torch_threads; SAC the same
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for run, task in [(r, t) for r in range(args.runs) for t in args.tasks]:
            env_id = load_config(ROOT / "launch" / f"{task}.toml").env.id
            # SAC before and after qmpc (this machine's speed drifts by ±20 % over minutes): the mean
            sac = [run_sac(env_id, args.steps)] if "SAC" in args.methods else []
            task_rows = []
            for variant in args.variants if "qmpc" in args.methods else []:
                _, rate, stages = run_qmpc(task, args.steps, variant, Path(tmp) / f"run{run}", args.set)
                task_rows.append((env_id, variant, rate, stages))
                print(f"{env_id} qmpc ({variant}): {rate:.1f} steps/s", flush=True)
            sac += [run_sac(env_id, args.steps)] if sac else []
            print(f"{env_id} SAC: {' and '.join(f'{r:.1f}' for r in sac)} steps/s", flush=True)
            rows += [(e, v, r, float(np.mean(sac)) if sac else float("nan"), st) for e, v, r, st in task_rows]
    head = f"{'task':<22} {'qmpc':<7} {'steps/s':>8} {'SAC':>7} {'ratio':>6} " + " ".join(
        f"{name:>12}" for _, name in STAGES
    )
    sets = f"; qmpc with {' '.join(args.set)}" if args.set else ""
    print(f"\n{args.steps} learning steps per run{sets}; stage times in ms per learning step")
    print(f"{head}\n{'-' * len(head)}")
    for env_id, variant, rate, sac, st in rows:
        cells = " ".join(f"{st[tag]:>12.2f}" for tag, _ in STAGES)
        print(f"{env_id:<22} {variant:<7} {rate:>8.1f} {sac:>7.1f} {rate / sac:>6.2f} {cells}")
    if not rows:
        print("(no qmpc rows)")
    print("\nratio = qmpc steps/s ÷ SAC steps/s (the mean of SAC's runs before and after qmpc's, same process)")


if __name__ == "__main__":
    main()
