"""Learning quality, side by side: qmpc (online, from its launch file) and Stable-Baselines3 SAC
with the same environment-step budget and seeds, evaluating the deterministic policy every
``--eval-every`` steps on the same evaluation seeds.

    pip install -e ".[benchmark]"
    python benchmarks/bench_learning.py [--tasks inverted_pendulum reacher inverted_double_pendulum]
                                        [--steps 20000] [--seeds 0] [--out benchmarks/results]
                                        [--workers 0] [--reuse]

Prints one table (final and best evaluation return per task and method, wall time) and writes a
plot of both learning curves per task. Returns are sums of rewards (= −total cost). qmpc runs live
in ``--out/<task>-qmpc-seed<seed>`` and are resumed if that holds a checkpoint; SAC results are
saved as JSON there and, with ``--reuse``, read back instead of retrained.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from qmpc.config import load_config
from qmpc.env import make_env
from qmpc.trainer import train

ROOT = Path(__file__).resolve().parents[1]


def eval_policy(policy, env_id: str, episodes: int, seed: int) -> float:
    env = make_env(env_id)
    rets = []
    for i in range(episodes):
        obs, _ = env.reset(seed=seed + i)
        done, ret = False, 0.0
        while not done:
            obs, r, term, trunc, _ = env.step(policy(obs))
            ret, done = ret + float(r), term or trunc
        rets.append(ret)
    return float(np.mean(rets))


def run_sac(env_id: str, steps: int, seed: int, eval_every: int, episodes: int) -> tuple[list, list, float]:
    from stable_baselines3 import SAC
    from stable_baselines3.common.callbacks import BaseCallback

    xs, ys = [], []

    class Eval(BaseCallback):
        def _on_step(self) -> bool:
            if self.num_timesteps % eval_every == 0:
                pol = lambda o: self.model.predict(o, deterministic=True)[0]  # noqa: E731
                xs.append(self.num_timesteps)
                ys.append(eval_policy(pol, env_id, episodes, 10_000 + seed))
            return True

    t0 = time.perf_counter()
    model = SAC("MlpPolicy", make_env(env_id, seed=seed), seed=seed, verbose=0, device="cpu")
    model.learn(total_timesteps=steps, callback=Eval())
    return xs, ys, time.perf_counter() - t0


def run_qmpc(
    task: str, steps: int, seed: int, eval_every: int, episodes: int, out: Path, workers: int
) -> tuple[list, list, float]:
    """Train from the task's launch file; a run directory with a checkpoint is resumed (a finished
    run returns at once), so a killed benchmark continues where it stopped."""
    sets = [
        f"solver.workers={workers}",
        f"train.steps={steps}",
        f"seed={seed}",
        f"train.eval_every={eval_every}",
        f"train.eval_episodes={episodes}",
        f'run_dir="{out / f"{task}-qmpc-seed{seed}"}"',
    ]
    cfg = load_config(ROOT / "launch" / f"{task}.toml", sets)
    s = train(cfg, resume=(cfg.resolved_run_dir() / "checkpoint.pt").exists(), progress=True)
    return s.eval_steps, s.eval_returns, s.seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=["inverted_pendulum", "reacher", "inverted_double_pendulum"])
    ap.add_argument("--steps", type=int, default=20000)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--eval-every", type=int, default=2000)
    ap.add_argument("--eval-episodes", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--methods", nargs="+", default=["qmpc", "SAC"], choices=["qmpc", "SAC"])
    ap.add_argument("--workers", type=int, default=0, help="qmpc solver threads (0: up to 4, one per core)")
    ap.add_argument("--reuse", action="store_true", help="reuse SAC results saved by an earlier run in --out")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)  # as qmpc's train.torch_threads: small networks, no spinning threads
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, curves = [], {}
    for task in args.tasks:
        env_id = load_config(ROOT / "launch" / f"{task}.toml").env.id
        for seed in args.seeds:
            for method in args.methods:
                saved = out / f"{task}-{method}-seed{seed}-{args.steps}.json"
                if method == "qmpc":
                    xs, ys, sec = run_qmpc(
                        task, args.steps, seed, args.eval_every, args.eval_episodes, out, args.workers
                    )
                elif args.reuse and saved.exists():
                    xs, ys, sec = json.loads(saved.read_text())
                else:
                    xs, ys, sec = run_sac(env_id, args.steps, seed, args.eval_every, args.eval_episodes)
                    saved.write_text(json.dumps([xs, ys, sec]))
                curves[(env_id, method, seed)] = (xs, ys)
                rows.append((env_id, method, seed, ys[-1] if ys else float("nan"), max(ys, default=float("nan")), sec))
                curve = ", ".join(f"{x}: {y:.1f}" for x, y in zip(xs, ys, strict=True))
                print(
                    f"{env_id} {method} seed {seed}: final {rows[-1][3]:.1f}, best {rows[-1][4]:.1f}, "
                    f"{sec:.0f} s; evaluations {{{curve}}}",
                    flush=True,
                )
    head = f"{'task':<28} {'method':<6} {'seed':>4} {'final return':>12} {'best return':>12} {'wall s':>8}"
    print(
        f"\n{args.steps} environment steps per run; evaluation every {args.eval_every} steps, "
        f"{args.eval_episodes} episodes, deterministic policy\n{head}\n{'-' * len(head)}"
    )
    for r in rows:
        print(f"{r[0]:<28} {r[1]:<6} {r[2]:>4} {r[3]:>12.1f} {r[4]:>12.1f} {r[5]:>8.0f}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    envs = sorted({k[0] for k in curves})
    fig, axes = plt.subplots(1, len(envs), figsize=(5 * len(envs), 3.5), squeeze=False)
    for ax, env_id in zip(axes[0], envs, strict=True):
        for (e, method, seed), (xs, ys) in curves.items():
            if e == env_id:
                ax.plot(xs, ys, marker="o", ms=3, label=f"{method} seed {seed}")
        ax.set_title(env_id, fontsize=9)
        ax.set_xlabel("environment steps")
        ax.set_ylabel("evaluation return")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "learning_curves.png", dpi=90)
    print(f"plot: {out / 'learning_curves.png'}")


if __name__ == "__main__":
    main()
