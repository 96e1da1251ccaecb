"""Learning quality, side by side: qmpc (online, from its launch file) and Stable-Baselines3 SAC
with the same environment-step budget (each launch file's ``train.steps`` unless ``--steps``) and
seeds, evaluating the deterministic policy every ``--eval-every`` steps on the same evaluation seeds.

    pip install -e ".[benchmark,ray]"
    python benchmarks/bench_learning.py [--tasks inverted_pendulum inverted_double_pendulum reacher]
                                        [--steps N] [--seeds 0 1 2 3 4] [--out benchmarks/results]
                                        [--horizons 1 3] [--plan-set train.rollout_td=2 ...]
                                        [--set key=value ...] [--num-cpus N | --address HOST:PORT]

Every (task, method, seed) is one trial of the sweep machinery of ``qmpc sweep`` (:mod:`qmpc.sweep`,
Ray Tune): trials run side by side, one CPU each, and each writes ``--out/<task>-<method>/seed<s>/
result.json``. A killed benchmark continues where it stopped: finished trials are read back, qmpc
runs resume from their checkpoints, SAC runs from theirs (``sac.pkl``, after each evaluation).
Prints, per task, the mean ± std over seeds of the final and best evaluation returns, the seeds
solved (IP: 1000, IDP: 9300) in all and by every second evaluation, and writes, per task, the mean
curves with a band across seeds (``curves_<task>.png``) and one row per trial
(``results_<task>.csv``). Returns are sums of rewards (= −total cost).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from qmpc.config import load_config
from qmpc.env import make_env
from qmpc.sweep import Trial, format_table, plan_trials, plot_curves, qmpc_trial, run_sweep, write_results

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


def run_sac(
    env_id: str, steps: int, seed: int, eval_every: int, episodes: int, run_dir: Path | None = None
) -> tuple[list, list, float]:
    """SB3 SAC with its defaults, evaluated every ``eval_every`` steps. With ``run_dir`` it writes
    ``sac.pkl`` there after each evaluation (atomically: the model, its replay buffer and the curve
    so far) and a run that finds one continues from it (not bit for bit: the episode that was cut
    off starts again, and the random streams are not restored)."""
    import io
    import pickle

    from stable_baselines3 import SAC
    from stable_baselines3.common.callbacks import BaseCallback

    from qmpc.data import atomic_write

    ckpt = run_dir / "sac.pkl" if run_dir is not None else None
    xs, ys, before = [], [], 0.0
    if ckpt is not None and ckpt.exists():
        with open(ckpt, "rb") as f:
            saved = pickle.load(f)
        model = SAC.load(io.BytesIO(saved["model"]), env=make_env(env_id, seed=seed), device="cpu")
        model.load_replay_buffer(io.BytesIO(saved["buffer"]))
        xs, ys, before = saved["eval_steps"], saved["eval_returns"], saved["seconds"]
    else:  # buffer_size = steps: the default 1e6 is never reached in a run of ``steps``, so the same
        # transitions are kept and sampled; only the preallocated memory (and the checkpoint) is smaller
        model = SAC("MlpPolicy", make_env(env_id, seed=seed), seed=seed, verbose=0, device="cpu", buffer_size=steps)
    t0 = time.perf_counter()

    def save() -> None:
        model_bytes, buffer_bytes = io.BytesIO(), io.BytesIO()
        model.save(model_bytes)
        model.save_replay_buffer(buffer_bytes)
        state = {"model": model_bytes.getvalue(), "buffer": buffer_bytes.getvalue(), "eval_steps": xs,
                 "eval_returns": ys, "seconds": before + time.perf_counter() - t0}  # fmt: skip

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                pickle.dump(state, f)

        atomic_write(ckpt, write)

    class Eval(BaseCallback):
        def _on_step(self) -> bool:
            if self.num_timesteps % eval_every == 0:
                pol = lambda o: self.model.predict(o, deterministic=True)[0]  # noqa: E731
                xs.append(self.num_timesteps)
                ys.append(eval_policy(pol, env_id, episodes, 10_000 + seed))
                if ckpt is not None:
                    save()
            return True

    left = steps - model.num_timesteps
    if left > 0:
        model.learn(total_timesteps=left, callback=Eval(), reset_num_timesteps=model.num_timesteps == 0)
    return xs, ys, before + time.perf_counter() - t0


def sac_trial(trial: Trial) -> dict:
    """One SAC run as a sweep trial (the same ``result.json`` as a qmpc trial), continuing from its
    ``sac.pkl`` if a killed sweep left one."""
    import torch

    torch.set_num_threads(1)
    p = trial.params
    xs, ys, sec = run_sac(p["env_id"], p["steps"], trial.seed, p["eval_every"], p["episodes"], Path(trial.run_dir))
    return {"eval_steps": xs, "eval_returns": ys, "steps": p["steps"], "seconds": sec, "fail_frac": 0.0}


def trial_fn(trial: Trial) -> dict:
    return qmpc_trial(trial) if "launch" in trial.params else sac_trial(trial)


SOLVED = {"InvertedPendulum-v5": 1000.0, "InvertedDoublePendulum-v5": 9300.0}
"""Returns at which a run counts as solved (the tasks' maxima: 1000, and ~9350 for IDP)."""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=["inverted_pendulum", "inverted_double_pendulum", "reacher"])
    ap.add_argument("--steps", type=int, default=None, help="every task's budget (default: its launch file's)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--eval-every", type=int, default=1000)
    ap.add_argument("--eval-episodes", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--methods", nargs="+", default=["qmpc", "SAC"], choices=["qmpc", "SAC"])
    ap.add_argument(
        "--horizons",
        type=int,
        nargs="+",
        default=[1],
        help="qmpc trained (train.horizon) and evaluated at each horizon: one method each (qmpc-h3 …; qmpc for 1)",
    )
    ap.add_argument(
        "--plan-set",
        action="append",
        default=[],
        help="qmpc config override of the trials with a horizon > 1 (e.g. train.rollout_td=2)",
    )
    ap.add_argument("--set", action="append", default=[], help="qmpc config override (every qmpc trial)")
    ap.add_argument("--workers", type=int, default=1, help="qmpc solver threads per trial")
    ap.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    ap.add_argument("--address", default=None, help="Ray cluster HOST:PORT or 'auto' (default: a local Ray)")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    sets = [f"train.eval_every={args.eval_every}", f"train.eval_episodes={args.eval_episodes}"]
    sets += [f"solver.workers={args.workers}", *args.set]
    trials: dict[tuple[str, str], list[Trial]] = {}
    budget: dict[str, int] = {}
    for task in args.tasks:
        launch = ROOT / "launch" / f"{task}.toml"
        cfg = load_config(launch)
        env_id, steps = cfg.env.id, args.steps or cfg.train.steps
        budget[env_id] = steps
        methods = [m for m in args.methods if m != "qmpc"]
        if "qmpc" in args.methods:
            methods = [f"qmpc-h{h}" if h > 1 else "qmpc" for h in args.horizons] + methods
        for method in methods:
            d = out / f"{task}-{method}"
            if method.startswith("qmpc"):
                h = int(method[6:]) if method != "qmpc" else 1
                plan = [f"train.horizon={h}", *(args.plan_set if h > 1 else [])]
                ts = plan_trials(launch, args.seeds, [f"train.steps={steps}", *sets, *plan], [], d)
            else:
                params = {"env_id": env_id, "steps": steps, "eval_every": args.eval_every}
                ts = [
                    Trial(f"seed{s}", s, {}, d / f"seed{s}", {**params, "episodes": args.eval_episodes})
                    for s in args.seeds
                ]
            for t in ts:  # names unique across tasks and methods; the table groups by method
                t.name, t.grid = f"{task}-{method}-{t.name}", {"method": method}
            trials[(env_id, method)] = ts
    # every trial at once, on Ray Tune (finished ones are read back, unfinished ones resumed)
    every = [t for ts in trials.values() for t in ts]
    outcomes = run_sweep(every, out, trial_fn, address=args.address, num_cpus=args.num_cpus, resume=True)
    by_trial = {id(o.trial): o for o in outcomes}
    print(f"\nseeds {args.seeds}; evaluation every {args.eval_every} steps, {args.eval_episodes} episodes,")
    print("deterministic policy; mean ± std over seeds")
    for env_id in dict.fromkeys(e for e, _ in trials):
        group = [by_trial[id(t)] for (e, _), ts in trials.items() if e == env_id for t in ts]
        milestones = list(range(2 * args.eval_every, budget[env_id] + 1, 2 * args.eval_every))
        print(f"\n{env_id}, {budget[env_id]} environment steps per run")
        print(format_table(group, SOLVED.get(env_id), milestones if env_id in SOLVED else None))
        name = env_id.split("-")[0].split("/")[-1].lower()
        print(f"curves: {plot_curves(group, out / f'curves_{name}.png', title=f'{env_id}, {len(args.seeds)} seeds')}")
        print(f"results: {write_results(group, out / f'results_{name}.csv', SOLVED.get(env_id))}")


if __name__ == "__main__":
    main()
