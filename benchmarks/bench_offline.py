"""Offline training against d3rlpy on the same datasets: normalised scores over seeds (issue 22).

    python benchmarks/bench_offline.py --task InvertedPendulum-v5 --kinds random medium --seeds 0 1 2 \\
        --steps 10000 --eval-every 1000 --algos bc td3plusbc iql cql \\
        --variant plain: --variant behaviour:train.behaviour_weight=1.0 --out benchmarks/offline_ip

The datasets are qmpc's (``qmpc datasets make TASK KIND``: Minari ids ``qmpc/<task>/<kind>-v0``
with their reference returns). Every method trains for ``--steps`` gradient steps on exactly the
same transitions and is evaluated the same way every ``--eval-every`` steps: the deterministic
controller or policy, ``--eval-episodes`` episodes reset with seeds ``10000 + seed + i`` (qmpc's
evaluation environment; the d3rlpy worker is given the same seeds).

* **qmpc**: one ``qmpc sweep`` of the task's offline launch file per dataset and variant
  (``--variant NAME:KEY=V,KEY=V``: ``--set`` overrides), so that an interrupted benchmark
  continues with ``--resume``; the returns are the runs' ``eval/return``.
* **d3rlpy** (IQL, TD3+BC, CQL, ReBRAC, BC): in its own virtual environment
  (``benchmarks/offline_peers.py``; d3rlpy 2.8 pins ``gymnasium==1.0.0``), one worker process
  per run (``benchmarks/d3rlpy_worker.py``), fed the dataset's arrays; a finished run's JSON is
  kept and not run again. ``--jobs N`` runs N at a time (a many-core machine), ``--peer-device
  cuda`` on a GPU (CQL's 10k steps take 26–58 min on one core here).

``--parts`` picks what runs (``d3rlpy``, ``qmpc``, ``report``): the two trainings can run side by
side in two invocations on a 2-core machine, and ``report`` alone prints the table from what is
there and writes it to ``--out/table_<task>.md`` (beside ``curves_<task>.csv`` and the plot).
The report: per dataset and method, the normalised score
``100 · (R − R_random) / (R_expert − R_random)`` of the last evaluation and of the best, mean ±
std over the seeds that finished, and a plot of the curves.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import offline_peers

from qmpc.data import dataset_metadata, read_episodes
from qmpc.datasets import dataset_id, normalized_score

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = {
    "InvertedPendulum-v5": "launch/inverted_pendulum_offline.toml",
    "InvertedDoublePendulum-v5": "launch/inverted_double_pendulum_offline.toml",
    "HalfCheetah-v5": "launch/half_cheetah_offline.toml",
    "Hopper-v5": "launch/hopper_offline.toml",
}


def _references(ds_id: str) -> tuple[float, float]:
    meta = dataset_metadata(ds_id)
    return float(meta["ref_min_score"]), float(meta["ref_max_score"])


def _npz(ds_id: str, out: Path) -> Path:
    """The dataset's transitions as the d3rlpy worker's ``.npz`` (episode ends from the dataset)."""
    path = out / "data" / (ds_id.replace("/", "_") + ".npz")
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    eps = read_episodes(ds_id)
    cat = np.concatenate
    ends = cat([np.arange(len(e.actions)) == len(e.actions) - 1 for e in eps])
    return offline_peers.write_npz(
        path,
        cat([e.observations[:-1] for e in eps]),
        cat([e.actions for e in eps]),
        cat([-np.asarray(e.rewards) for e in eps]),
        cat([e.observations[1:] for e in eps]),
        cat([e.terminations for e in eps]),
        ends,
    )


def run_d3rlpy(args: argparse.Namespace) -> None:
    """Every d3rlpy run of the arguments whose result JSON is not there yet, ``--jobs`` at a time
    (worker processes); a run that fails is reported at the end and does not stop the others."""
    python = offline_peers.ensure_venv()
    runs = []
    for kind in args.kinds:
        npz = _npz(dataset_id(args.task, kind), args.out)
        for algo in args.algos:
            for seed in args.seeds:
                res = args.out / "d3rlpy" / kind / algo / f"seed{seed}.json"
                if not res.is_file():
                    res.parent.mkdir(parents=True, exist_ok=True)
                    runs.append((kind, algo, seed, npz, res))
    failed = []
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(_peer_run, python, run, args): run for run in runs}
        for fut in as_completed(futures):
            kind, algo, seed = futures[fut][:3]
            try:
                print(f"d3rlpy {algo} {kind} seed {seed}: {fut.result()}", flush=True)
            except RuntimeError as e:
                failed.append(f"{algo} {kind} seed {seed}: {e}")
    if failed:
        raise SystemExit(f"{len(failed)} of {len(runs)} d3rlpy runs failed:\n" + "\n".join(failed))


def _peer_run(python: Path, run: tuple, args: argparse.Namespace) -> str:
    """One d3rlpy run (``run``: kind, algo, seed, npz, result path); a line about its result."""
    _kind, algo, seed, npz, res = run
    t0 = time.perf_counter()
    r = offline_peers.run_peer(
        python,
        npz,
        args.task,
        algo,
        args.steps,
        args.eval_every,
        seed,
        res,
        args.eval_episodes,
        10000 + seed,
        device=args.peer_device,
    )
    return f"last {r['returns'][-1]:.1f} in {time.perf_counter() - t0:.0f} s on {r.get('device', 'cpu')}"


def _variants(specs: list[str]) -> dict[str, list[str]]:
    out = {}
    for spec in specs:
        name, _, sets = spec.partition(":")
        out[name] = [s for s in re.split(r",(?![^\[]*\])", sets) if s]  # commas inside [...] stay
    return out


def run_qmpc(args: argparse.Namespace) -> None:
    launch = ROOT / LAUNCH[args.task]
    for kind in args.kinds:
        ds = dataset_id(args.task, kind)
        for name, sets in _variants(args.variant).items():
            out = args.out / "qmpc" / kind / name
            cmd = ["qmpc", "sweep", str(launch), "--seeds", *map(str, args.seeds), "--out", str(out), "--num-cpus", "1"]
            cmd.append("--resume")  # finishes an interrupted benchmark; nothing to resume is a new sweep
            common = [f'train.dataset="{ds}"', f"train.steps={args.steps}", f"train.eval_every={args.eval_every}"]
            common += [f"train.eval_episodes={args.eval_episodes}", f"train.checkpoint_every={args.eval_every}"]
            for s in common + args.set + sets:
                cmd += ["--set", s]
            print(" ".join(cmd), flush=True)
            subprocess.run(cmd, check=False)


def _qmpc_curves(out: Path) -> dict[int, tuple[list[int], list[float]]]:
    """seed -> (steps, eval returns) of each trial of a sweep directory."""
    curves = {}
    for metrics in sorted(out.glob("seed*/metrics.csv")):
        seed = int(metrics.parent.name.removeprefix("seed"))
        steps, rets = [], []
        with metrics.open() as f:
            for row in csv.reader(f):
                if len(row) == 3 and row[1] == "eval/return":
                    steps.append(int(row[0]))
                    rets.append(float(row[2]))
        if steps:
            curves[seed] = (steps, rets)
    return curves


def _d3rlpy_curves(out: Path) -> dict[int, tuple[list[int], list[float]]]:
    curves = {}
    for res in sorted(out.glob("seed*.json")):
        r = json.loads(res.read_text())
        curves[int(r["seed"])] = (list(r["steps"]), list(r["returns"]))
    return curves


def collect_results(args: argparse.Namespace) -> dict[str, dict[str, dict[int, tuple[list[int], list[float]]]]]:
    """kind -> method -> seed -> (steps, returns), for the runs that reached ``--steps``."""
    results: dict[str, dict] = {}
    for kind in args.kinds:
        methods = {f"qmpc {n}": _qmpc_curves(args.out / "qmpc" / kind / n) for n in _variants(args.variant)}
        methods |= {a: _d3rlpy_curves(args.out / "d3rlpy" / kind / a) for a in args.algos}
        done = {m: {s: c for s, c in cs.items() if c[0] and c[0][-1] >= args.steps} for m, cs in methods.items()}
        results[kind] = {m: cs for m, cs in done.items() if cs}
    return results


def report(args: argparse.Namespace) -> str:
    results = collect_results(args)
    lines = [
        f"{args.task}: normalised score 100·(R − R_random)/(R_expert − R_random), {args.steps} gradient steps, "
        f"evaluation every {args.eval_every} ({args.eval_episodes} episodes), mean ± std over seeds",
        "",
        "| dataset | method | seeds | last | best | last return |",
        "|---|---|---|---|---|---|",
    ]
    for kind, methods in results.items():
        lo, hi = _references(dataset_id(args.task, kind))
        for m, cs in methods.items():
            last = _last_scores(cs, lo, hi)
            best = np.array([normalized_score(max(c[1]), lo, hi) for c in cs.values()])
            ret = np.array([c[1][-1] for c in cs.values()])
            lines.append(
                f"| {kind} | {m} | {len(cs)} | {last.mean():.1f} ± {last.std():.1f} | {best.mean():.1f} ± "
                f"{best.std():.1f} | {ret.mean():.1f} |"
            )
    _plot(results, args)
    _write_curves(results, args.out / f"curves_{args.task}.csv")
    return "\n".join([*lines, "", *verdicts(results, args)])


def _last_scores(curves: dict, lo: float, hi: float) -> np.ndarray:
    """The normalised score of each seed's last evaluation, ``curves``: seed -> (steps, returns)."""
    return np.array([normalized_score(c[1][-1], lo, hi) for c in curves.values()])


def verdicts(results: dict, args: argparse.Namespace) -> list[str]:
    """Issue 22's comparison per dataset and qmpc variant: the mean normalised score of the last
    evaluation against the best d3rlpy algorithm's and BC's on the same dataset (the seeds each
    finished), and by how much it is above (+) or below (−) them."""
    lines = [
        "| dataset | qmpc | last | best d3rlpy (last) | − best | BC (last) | − BC |",
        "|---|---|---|---|---|---|---|",
    ]
    for kind, methods in results.items():
        lo, hi = _references(dataset_id(args.task, kind))
        score = {m: float(_last_scores(cs, lo, hi).mean()) for m, cs in methods.items()}
        peers = {m: v for m, v in score.items() if not m.startswith("qmpc ")}
        for m in (m for m in score if m.startswith("qmpc ")):
            best = max(peers, key=peers.get) if peers else None
            vs_best = f"{best} {peers[best]:.1f} | {score[m] - peers[best]:+.1f}" if best else "— | —"
            vs_bc = f"{peers['bc']:.1f} | {score[m] - peers['bc']:+.1f}" if "bc" in peers else "— | —"
            lines.append(f"| {kind} | {m.removeprefix('qmpc ')} | {score[m]:.1f} | {vs_best} | {vs_bc} |")
    return lines


def _write_curves(results: dict, path: Path) -> None:
    """Every evaluation of every finished run: ``dataset,method,seed,step,return``."""
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["dataset", "method", "seed", "step", "return"])
        for kind, methods in results.items():
            for m, cs in methods.items():
                for seed, (steps, rets) in sorted(cs.items()):
                    w.writerows([kind, m, seed, st, r] for st, r in zip(steps, rets, strict=True))


def _plot(results: dict, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * max(1, len(results)), 4), squeeze=False)
    for ax, (kind, methods) in zip(axes[0], results.items(), strict=True):
        lo, hi = _references(dataset_id(args.task, kind))
        for m, cs in methods.items():
            steps = next(iter(cs.values()))[0]
            runs = [c[1] for c in cs.values() if c[0] == steps]
            s = np.array([normalized_score(r, lo, hi) for r in runs])
            ax.plot(steps, s.mean(axis=0), label=f"{m} ({len(runs)})")
            ax.fill_between(steps, s.min(axis=0), s.max(axis=0), alpha=0.15)
        ax.set_title(f"{args.task} {kind}")
        ax.set_xlabel("gradient steps")
        ax.set_ylabel("normalised score")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out / f"curves_{args.task}.png", dpi=100)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", default="InvertedPendulum-v5", choices=sorted(LAUNCH))
    p.add_argument("--kinds", nargs="+", default=["random", "medium"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=10000)
    p.add_argument("--eval-every", type=int, default=1000)
    p.add_argument("--eval-episodes", type=int, default=10)
    p.add_argument("--algos", nargs="+", default=["bc", "td3plusbc", "iql", "cql"], choices=offline_peers.ALGOS)
    p.add_argument(
        "--variant", action="append", default=None, help="NAME:KEY=V,KEY=V (qmpc --set overrides; V may be [a,b])"
    )
    p.add_argument(
        "--set",
        action="append",
        default=None,
        help="qmpc --set override of every variant (default: model.learn=false, no plan uses a model here)",
    )
    p.add_argument("--jobs", type=int, default=1, help="d3rlpy runs at a time (one worker process each)")
    p.add_argument("--peer-device", default="cpu", help="torch device of the d3rlpy runs: cpu, cuda, cuda:1 …")
    p.add_argument("--parts", nargs="+", default=["d3rlpy", "qmpc", "report"], choices=("d3rlpy", "qmpc", "report"))
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "offline")
    args = p.parse_args()
    if args.jobs < 1:
        p.error(f"--jobs must be at least 1, got {args.jobs}")
    args.variant = args.variant or ["plain:"]
    args.set = ["model.learn=false"] if args.set is None else args.set
    args.out.mkdir(parents=True, exist_ok=True)
    if "d3rlpy" in args.parts:
        run_d3rlpy(args)
    if "qmpc" in args.parts:
        run_qmpc(args)
    if "report" in args.parts:
        text = report(args)
        print(text)
        table = args.out / f"table_{args.task}.md"
        table.write_text(text + "\n")
        print(f"wrote {table}")


if __name__ == "__main__":
    main()
