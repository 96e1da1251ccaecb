"""The ``qmpc`` command line.

    qmpc demo [--out DIR] [--overwrite]     collect, train and run on the built-in point mass
    qmpc check [--full]                     sensitivity checks of this installation (pass/fail table)
    qmpc collect --env ID --steps N --out DIR [--policy random|CHECKPOINT]
    qmpc datasets make TASK random|medium|medium-replay|expert|medium-expert [--seed S] [--steps N]
    qmpc datasets list
    qmpc train LAUNCH.toml [--set key=value ...] [--resume]
    qmpc sweep LAUNCH.toml --seeds 0 1 2 [--grid key=v1,v2 ...] [--set ...] [--out DIR] [--resume]
    qmpc run CHECKPOINT [--episodes N] [--horizon H] [--video out.mp4] [--plot out.png]
                                            (the plot defaults to ./rollout_<checkpoint name>_h<H>.png)

Costs, not rewards: Q is a cost-to-go (``c = −reward``) and the controller minimises it; the
returns printed are sums of rewards (``−total cost``), higher is better.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from qmpc.controller import MODELS, TERMINATIONS
from qmpc.errors import QmpcError

__all__ = ["main"]


def _cmd_check(args: argparse.Namespace) -> int:
    import casadi
    import torch

    from qmpc.check import format_table, run_checks

    print(f"qmpc check: casadi {casadi.__version__}, torch {torch.__version__}, {'full' if args.full else 'quick'} run")
    t0 = time.perf_counter()
    rows = []
    for row in run_checks(quick=not args.full):
        rows.append(row)
        if args.verbose:
            print(f"  {row.name}: {row.error:.2e}", flush=True)
    print(format_table(rows))
    failed = [r for r in rows if not r.passed]
    print(f"{len(rows) - len(failed)} passed, {len(failed)} failed in {time.perf_counter() - t0:.1f} s")
    return 1 if failed else 0


def _make_policy(policy: str, env, noise: float, seed: int):
    import numpy as np

    from qmpc.datasets import checkpoint_policy

    rng = np.random.default_rng(seed)
    if policy == "random":
        low, high = env.action_space.low, env.action_space.high
        return lambda obs: rng.uniform(low, high), "random"
    return checkpoint_policy(Path(policy), env, noise, rng), f"qmpc controller {policy} + noise {noise}"


def _check_args(args: argparse.Namespace, rules: dict[str, tuple[float, bool]]) -> None:
    """``rules``: option -> (lowest value, whether the lowest is allowed); every value finite."""
    import math

    from qmpc.errors import ConfigError

    for name, (lo, inclusive) in rules.items():
        v = getattr(args, name.lstrip("-").replace("-", "_"))
        if v is None:
            continue
        if not math.isfinite(v) or v < lo or (v == lo and not inclusive):
            bound = f">= {lo:g}" if inclusive else f"> {lo:g}"
            raise ConfigError(f"expected {name} to be a finite number {bound}, got {v:g}")


def _cmd_collect(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from qmpc.config import check_seed
    from qmpc.data import collect, ensure_dir
    from qmpc.env import make_env
    from qmpc.errors import InputError

    _check_args(args, {"--steps": (1, True), "--noise": (0, True)})
    check_seed(args.seed, "--seed")
    if Path(args.out).exists():
        raise InputError(f"expected a new dataset directory for --out, got an existing {args.out}")
    ensure_dir(Path(args.out).parent, "the parent directory of --out")
    env = make_env(args.env, seed=args.seed)
    policy, name = _make_policy(args.policy, env, args.noise, args.seed)
    with tqdm(total=args.steps, unit="step", desc=f"collect {args.env}") as bar:
        out = collect(env, policy, args.steps, args.out, seed=args.seed, algorithm=name, progress=bar.update)
    print(f"wrote {args.steps} transitions of {args.env} ({name}) as a Minari dataset to {out}")
    return 0


def _cmd_datasets(args: argparse.Namespace) -> int:
    from qmpc.datasets import dataset_id, describe_datasets, make_dataset

    if args.action == "list":
        print(describe_datasets(args.root))
        return 0
    positive = {"--steps": (1, True), "--train-steps": (1, True), "--eval-every": (1, True), "--envs": (1, True)}
    _check_args(args, {**positive, "--noise": (0, True)})
    out = make_dataset(
        args.task,
        args.kind,
        seed=args.seed,
        steps=args.steps,
        root=args.root,
        launch=args.launch,
        expert=args.expert,
        noise=args.noise,
        train_steps=args.train_steps,
        eval_every=args.eval_every,
        envs=args.envs,
        progress=not args.no_progress,
    )
    print(f"wrote {dataset_id(args.task, args.kind)} to {out}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from qmpc.config import load_config
    from qmpc.trainer import train

    cfg = load_config(args.launch, args.set)
    s = train(cfg, resume=args.resume, progress=not args.no_progress, overrides=args.set)
    print(f"run directory: {s.run_dir}")
    for st, r in zip(s.eval_steps, s.eval_returns, strict=True):
        print(f"  step {st:>7}: eval return {r:10.2f}  (= −cost, higher is better)")
    print(f"{s.steps} steps in {s.seconds:.0f} s; failed solves masked: {100 * s.fail_frac:.2f} %")
    print(f"checkpoint: {s.run_dir / 'checkpoint.pt'}  learning curve: {s.run_dir / 'learning_curve.png'}")
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from qmpc.sweep import format_table, plan_trials, plot_curves, run_sweep, write_results

    _check_args(args, {"--cpus-per-trial": (0, False), "--num-cpus": (1, True), "--schedule-timeout": (0, False)})
    out = Path(args.out or f"runs/sweep-{Path(args.launch).stem}")
    trials = plan_trials(args.launch, args.seeds, args.set, args.grid, out)
    print(f"qmpc sweep: {len(trials)} trials of {args.launch} in {out}")
    outcomes = run_sweep(
        trials,
        out,
        address=args.address,
        cpus_per_trial=args.cpus_per_trial,
        num_cpus=args.num_cpus,
        resume=args.resume,
        schedule_timeout=args.schedule_timeout,
    )
    csv_path = write_results(outcomes, out / "results.csv", args.solved_at)
    curves = plot_curves(outcomes, out / "curves.png", title=f"{Path(args.launch).name}: {len(args.seeds)} seeds")
    print(format_table(outcomes, args.solved_at))
    print(f"results: {csv_path}  curves: {curves}")
    return 0 if all(o.ok for o in outcomes) else 1


@contextlib.contextmanager
def _notice_if_slow(message: str, after_s: float = 3.0) -> Iterator[None]:
    """Print ``message`` to stderr if the block is still running after ``after_s`` seconds (the
    first controller of a machine compiles its kernels for about a minute and a half)."""
    timer = threading.Timer(after_s, lambda: print(message, file=sys.stderr, flush=True))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


BUILDING = (
    "building the controller: the first run on a machine compiles the plan's kernels with numba (about 1.5 min "
    "on a 2-core machine); later runs load them from numba's cache …"
)


def _cmd_run(args: argparse.Namespace) -> int:
    from qmpc.checkpoint import load_checkpoint
    from qmpc.config import check_seed
    from qmpc.controller import Controller
    from qmpc.data import ensure_output_file
    from qmpc.env import env_spec, make_env
    from qmpc.errors import InputError
    from qmpc.runner import format_episodes, plot_rollout, run_episodes, write_video

    _check_args(
        args,
        {
            "--episodes": (1, True),
            "--envs": (1, True),
            "--horizon": (1, True),
            "--budget-ms": (0, True),
            "--max-iter": (1, True),
            "--trust-region": (0, True),
        },
    )
    check_seed(args.seed, "--seed")
    ckpt = load_checkpoint(args.checkpoint)
    trained = ckpt.get("config", {}).get("train", {})
    if args.horizon is None:  # the horizon it was trained to act with
        args.horizon = int(trained.get("horizon", 1))
    if args.envs > 1 and args.horizon != 1:  # before any output file or directory is made
        raise InputError(f"expected horizon 1 with --envs {args.envs} (batched greedy solves), got {args.horizon}")
    if args.envs > 1 and args.video:
        raise InputError(f"expected no --video with --envs {args.envs}, got {args.video!r} (run one environment)")
    if args.termination is None:  # what it was trained (or set) to plan with
        args.termination = "auto" if trained.get("plan_termination", True) else "none"
    rho_given = args.trust_region is not None
    if not rho_given:  # the trust region it was trained (or set) to plan with
        args.trust_region = float(trained.get("trust_region", 0.0)) if args.horizon > 1 else 0.0
    # in the working directory: never next to the checkpoint (models/ of the repository, a run directory)
    default_plot = Path.cwd() / f"rollout_{Path(args.checkpoint).stem}_h{args.horizon}.png"
    what = "--plot" if args.plot else "the plot (set its path with --plot)"
    plot = ensure_output_file(args.plot or default_plot, what)
    if args.video:
        ensure_output_file(args.video, "--video")
    env_id = args.env or ckpt["spec"]["env_id"]
    if args.envs > 1:
        return _run_batched(args, env_id, plot)
    env = make_env(env_id, seed=args.seed, render_mode="rgb_array" if args.video else None)
    spec = env_spec(env)
    # real time by default: a control step must fit the task's control period
    dt = getattr(env.unwrapped, "dt", None)
    budget_ms = (1e3 * float(dt) if dt else 0.0) if args.budget_ms is None else args.budget_ms
    kw = {"horizon": args.horizon, "model": args.model, "stage_cost": args.stage_cost, "budget_ms": budget_ms,
          "max_iter": args.max_iter, "shooting": args.shooting, "termination": args.termination}  # fmt: skip
    with _notice_if_slow(BUILDING):
        try:
            ctrl = Controller.from_checkpoint(args.checkpoint, trust_region=args.trust_region, **kw)
        except InputError as e:  # the checkpoint's trust region, on a plan it does not apply to: none
            if rho_given or not args.trust_region or "for a trust region" not in str(e):
                raise
            args.trust_region = 0.0
            ctrl = Controller.from_checkpoint(args.checkpoint, **kw)
    ctrl.check_task(spec.env_id, spec.obs_dim, spec.act_dim)
    budget = f", budget {budget_ms:g} ms per step" if budget_ms else ", no time budget"
    plan = f", trust region {args.trust_region:g}" if args.trust_region else ""
    plan += ", the plan ignores termination" if args.horizon > 1 and args.termination == "none" else ""
    print(f"{env_id}: {args.episodes} episodes, horizon {args.horizon}{plan}{budget}, checkpoint {args.checkpoint}")
    eps, frames = run_episodes(ctrl, env, args.episodes, seed=args.seed, render=bool(args.video))
    print(format_episodes(eps))
    plot_rollout(eps[0], spec.low, spec.high, plot, title=f"{env_id}, horizon {args.horizon}")
    print(f"plot: {plot}")
    if args.video:
        print(f"video: {write_video(frames, args.video, fps=int(env.metadata.get('render_fps', 30)))}")
    return 0


def _run_batched(args: argparse.Namespace, env_id: str, plot: Path) -> int:
    """``qmpc run --envs N``: the greedy controller in ``N`` environments at once."""
    from qmpc.controller import BatchController
    from qmpc.env import env_spec, make_env
    from qmpc.runner import format_episodes, plot_rollout, run_batched

    envs = [make_env(env_id, seed=args.seed) for _ in range(args.envs)]
    spec = env_spec(envs[0])
    ctrl = BatchController.from_checkpoint(args.checkpoint, args.envs, max_iter=args.max_iter)
    ctrl.check_task(spec.env_id, spec.obs_dim, spec.act_dim)
    print(f"{env_id}: {args.episodes} episodes in {args.envs} environments at once, horizon 1 (batched greedy "
          f"solves), no time budget, checkpoint {args.checkpoint}")  # fmt: skip
    eps = run_batched(ctrl, envs, args.episodes, seed=args.seed)
    print(format_episodes(eps, timing="solve times: ms per batched solve of all environments"))
    plot_rollout(eps[0], spec.low, spec.high, plot, title=f"{env_id}, horizon 1")
    print(f"plot: {plot}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from qmpc.demo import run_demo

    return run_demo(
        Path(args.out),
        steps=args.steps,
        data_steps=args.data_steps,
        progress=not args.no_progress,
        overwrite=args.overwrite,
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``qmpc`` command line: one sub-command per job."""
    p = argparse.ArgumentParser(prog="qmpc", description="MPC with a learned Q-function as the cost-to-go.")
    sub = p.add_subparsers(dest="command", required=True)
    _add_demo(sub)
    _add_check(sub)
    _add_collect(sub)
    _add_datasets(sub)
    _add_train(sub)
    _add_sweep(sub)
    _add_run(sub)
    return p


def _add_demo(sub) -> None:
    d = sub.add_parser("demo", help="the built-in default: collect, train and run on the point mass")
    d.add_argument(
        "--out",
        default="runs/demo",
        help="output directory: DIR/data, DIR/run, DIR/rollout.png (an earlier demo's are replaced)",
    )
    d.add_argument(
        "--overwrite",
        action="store_true",
        help="delete DIR/data, DIR/run and DIR/rollout.png even if no qmpc demo wrote them",
    )
    d.add_argument("--steps", type=int, default=3000, help="gradient steps")
    d.add_argument("--data-steps", type=int, default=10000, help="random transitions to collect")
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(func=_cmd_demo)


def _add_check(sub) -> None:
    c = sub.add_parser("check", help="check solver sensitivities on this installation (pass/fail table)")
    c.add_argument("--full", action="store_true", help="every network x bounds x horizon x solver plugin")
    c.add_argument("-v", "--verbose", action="store_true", help="print each check as it finishes")
    c.set_defaults(func=_cmd_check)


def _add_collect(sub) -> None:
    k = sub.add_parser("collect", help="collect transitions as a Minari dataset")
    k.add_argument("--env", required=True, help="gymnasium id, e.g. InvertedPendulum-v5")
    k.add_argument("--steps", type=int, required=True)
    k.add_argument("--policy", default="random", help="'random' or a checkpoint path")
    k.add_argument("--noise", type=float, default=0.1, help="exploration noise (fraction of the action range)")
    k.add_argument("--out", required=True, help="dataset directory to create")
    k.add_argument("--seed", type=int, default=0)
    k.set_defaults(func=_cmd_collect)


def _add_datasets(sub) -> None:
    from qmpc.datasets import KINDS, RECIPES

    d = sub.add_parser("datasets", help="offline datasets made the way the field makes them (D4RL/Minari kinds)")
    act = d.add_subparsers(dest="action", required=True)
    m = act.add_parser("make", help="make a dataset qmpc/<task>/<kind>-v0 in Minari's datasets root")
    m.add_argument("task", help=f"gymnasium id; with a built-in recipe: {', '.join(RECIPES)}")
    m.add_argument("kind", choices=KINDS)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--steps", type=int, default=None, help="transitions (default: the recipe's, 100k or 1M)")
    m.add_argument("--root", default=None, help="datasets root (default: $MINARI_DATASETS_PATH or ~/.minari/datasets)")
    m.add_argument("--launch", default=None, help="launch file of the medium policy's training (default: the recipe's)")
    m.add_argument("--expert", default=None, help="the expert's checkpoint (default: the recipe's, models/<task>.pt)")
    m.add_argument("--noise", type=float, default=None, help="policy noise (default: the launch file's exploration)")
    m.add_argument(
        "--train-steps",
        type=int,
        default=None,
        help="the medium run's budget (default: the launch file's; given, seed 0's medium and medium-replay "
        "train their run too instead of using the shipped medium policy and replay buffer)",
    )
    m.add_argument("--eval-every", type=int, default=250, help="steps between the medium run's evaluations")
    m.add_argument(
        "--envs", type=int, default=None, help="environments the controllers act in at once (default: the recipe's)"
    )
    m.add_argument("--no-progress", action="store_true")
    ls = act.add_parser("list", help="the qmpc datasets in the datasets root, with their references")
    ls.add_argument("--root", default=None)
    d.set_defaults(func=_cmd_datasets)


def _add_train(sub) -> None:
    t = sub.add_parser("train", help="train a cost-to-go from a launch file")
    t.add_argument("launch", help="TOML launch file")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a field")
    t.add_argument("--resume", action="store_true", help="continue the run from its checkpoint")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=_cmd_train)


def _add_sweep(sub) -> None:
    w = sub.add_parser("sweep", help="seeds x a grid of config values, each trial a training run, on Ray Tune")
    w.add_argument("launch", help="TOML launch file")
    w.add_argument("--seeds", type=int, nargs="*", default=[0], help="one trial per seed and grid point")
    w.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a field in every trial")
    w.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2", help="one trial group per value")
    w.add_argument("--out", default=None, help="sweep directory (default runs/sweep-<launch>)")
    w.add_argument("--address", default=None, help="Ray cluster: HOST:PORT or 'auto' (default: a local Ray)")
    w.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    w.add_argument("--cpus-per-trial", type=float, default=1, help="CPUs Ray reserves for each trial")
    w.add_argument("--solved-at", type=float, default=None, help="return at which a trial counts as solved")
    w.add_argument("--resume", action="store_true", help="finish the unfinished trials of an earlier sweep")
    w.add_argument(
        "--schedule-timeout",
        type=float,
        default=300.0,
        help="seconds a trial may wait for free CPUs while none runs (held by other jobs) before the sweep stops",
    )
    w.set_defaults(func=_cmd_sweep)


def _add_run(sub) -> None:
    r = sub.add_parser("run", help="run the controller of a checkpoint in closed loop")
    r.add_argument("checkpoint")
    r.add_argument("--episodes", type=int, default=5)
    r.add_argument(
        "--envs",
        type=int,
        default=1,
        help="horizon 1: run this many environments together, one batched greedy solve per step for all "
        "of them (many episodes fast; no time budget, no video)",
    )
    r.add_argument(
        "--horizon", type=int, default=None, help="plan length (default: the checkpoint's train.horizon, else 1)"
    )
    r.add_argument(
        "--model",
        default="auto",
        choices=MODELS,
        help="dynamics model for horizon > 1: exact (qmpc tasks), learned (checkpoint trained with "
        "model.learn), mujoco (qmpc tasks: MuJoCo's linearisation along the previous plan)",
    )
    r.add_argument(
        "--stage-cost",
        default="auto",
        choices=("auto", "symbolic", "learned"),
        help="stage cost for horizon > 1: symbolic (qmpc.costs: InvertedPendulum, InvertedDoublePendulum, "
        "Reacher, HalfCheetah, qmpc tasks) or learned (checkpoint trained with model.learn, any task); "
        "auto: symbolic where there is one. The checkpoint's learned termination, if it has one, weights the plan",
    )
    r.add_argument(
        "--termination",
        default=None,
        choices=TERMINATIONS,
        help="horizon > 1: learned (the checkpoint's learned termination weights the plan by the probability of "
        "still being alive), none (the plan ignores that an episode ends), auto: learned where the checkpoint has "
        "it (default: auto, or none for a checkpoint trained with train.plan_termination = false)",
    )
    r.add_argument(
        "--budget-ms",
        type=float,
        default=None,
        help="wall-time budget per control step (default: the task's control period, e.g. 40 ms for "
        "InvertedPendulum-v5; 0: none). A step that overruns falls back to the shifted plan.",
    )
    r.add_argument("--max-iter", type=int, default=50, help="iteration budget per control step")
    r.add_argument(
        "--shooting",
        default="auto",
        choices=("auto", "single", "multiple"),
        help="horizon > 1: eliminate the predicted states (single) or keep them as variables (multiple); "
        "auto: single for a learned model or a large plan (see the README's latency table)",
    )
    r.add_argument(
        "--trust-region",
        type=float,
        default=None,
        help="horizon > 1 (single shooting): keep every action of the plan within this fraction of the action "
        "range of the greedy plan (Q's argmin followed along the model); 0: none (default: the checkpoint's "
        "train.trust_region)",
    )
    r.add_argument("--env", default=None, help="override the checkpoint's task id")
    r.add_argument("--video", default=None, help="MP4 path (MuJoCo offscreen rendering)")
    r.add_argument(
        "--plot",
        default=None,
        help="PNG path (default: rollout_<checkpoint name>_h<horizon>.png in the working directory)",
    )
    r.add_argument("--seed", type=int, default=100)
    r.set_defaults(func=_cmd_run)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except QmpcError as e:
        print(f"qmpc {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
