"""Seed and hyper-parameter sweeps on Ray Tune: ``qmpc sweep``.

Each trial is an ordinary training run (:func:`qmpc.trainer.train`, the code of ``qmpc train``)
in ``OUT/<trial>/`` with the launch file, the ``--set`` overrides, one point of the ``--grid``
and one seed; Ray Tune schedules the trials (on a local Ray started for the sweep, or on a
cluster). When a trial ends its summary is written to ``OUT/<trial>/result.json``; a trial
without one is unfinished, and ``--resume`` runs it again from its own checkpoint, leaving the
finished ones alone. After the trials: ``OUT/results.csv`` (one row per trial), a printed table
of mean ± std per grid point and ``OUT/curves.png`` (mean and band across seeds).

The machinery is not tied to qmpc's trainer: :func:`run_sweep` takes any ``trial_fn`` that maps
a :class:`Trial` to a dict like :func:`qmpc_trial`'s (``eval_steps``, ``eval_returns``, ``steps``,
``seconds``, ``fail_frac``; ``benchmarks/bench_learning.py`` runs SAC through it).
"""

from __future__ import annotations

import contextlib
import csv
import itertools
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qmpc.checkpoint import atomic_write
from qmpc.config import apply_overrides, load_config
from qmpc.data import dataset_path
from qmpc.errors import ConfigError, InputError, OutputError

__all__ = ["Trial", "TrialOutcome", "format_table", "plan_trials", "plot_curves", "qmpc_trial", "run_sweep"]

RESULT_FILE = "result.json"
_OWNED = ("seed", "run_dir")  # set by the sweep for each trial


@dataclass
class Trial:
    """One run of a sweep."""

    name: str
    """Directory name under the sweep's output: the grid values, then the seed."""
    seed: int
    grid: dict[str, Any]
    """This trial's point of the grid (``key -> value``)."""
    run_dir: Path
    params: dict[str, Any] = field(default_factory=dict)
    """What ``trial_fn`` needs (for qmpc: the launch file and the full ``--set`` list)."""


@dataclass
class TrialOutcome:
    """What a trial did: its ``result.json``, or its error."""

    trial: Trial
    eval_steps: list[int] = field(default_factory=list)
    eval_returns: list[float] = field(default_factory=list)
    steps: int = 0
    seconds: float = float("nan")
    fail_frac: float = float("nan")
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error and bool(self.eval_returns)

    def solved_at(self, threshold: float | None) -> int | None:
        """The first evaluation step with a return ≥ ``threshold`` (None: never, or no threshold)."""
        if threshold is None:
            return None
        return next((s for s, r in zip(self.eval_steps, self.eval_returns, strict=True) if r >= threshold), None)


# -- planning ---------------------------------------------------------------------------------
def parse_grid(items: Sequence[str]) -> dict[str, list[Any]]:
    """``["train.lr=1e-3,3e-4", ...]`` → ``{"train.lr": [0.001, 0.0003]}`` (values read as TOML
    literals, else strings)."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or not raw.strip():
            raise ConfigError(f"expected --grid key=v1,v2,..., got {item!r}")
        if key in _OWNED:
            raise ConfigError(f"expected --grid over config fields other than {_OWNED} (use --seeds), got {key}")
        if key in grid:
            raise ConfigError(f"expected each --grid key once, got {key} twice")
        grid[key] = [apply_overrides({}, [f"v={v.strip()}"])["v"] for v in raw.split(",")]
    return grid


def _check_seeds(seeds: Sequence[int]) -> list[int]:
    from qmpc.config import check_seed

    if not seeds:
        raise ConfigError("expected at least one seed (--seeds 0 1 2 ...), got none")
    for s in seeds:
        check_seed(s, "--seeds")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"expected distinct seeds, got {list(seeds)}")
    return list(seeds)


def _literal(v: Any) -> str:
    """``v`` as a ``--set`` value (a TOML literal)."""
    from qmpc.config import toml_value

    return toml_value(v)


def _label(v: Any) -> str:
    """``v`` in a trial's directory name."""
    return str(v).replace("/", "_").replace(" ", "")


def plan_trials(
    launch: str | Path, seeds: Sequence[int], sets: Sequence[str], grid: Sequence[str], out: str | Path
) -> list[Trial]:
    """The trials of ``qmpc sweep``: every grid point × seed. Every trial's config is loaded here
    (unknown keys, bad values: a :class:`ConfigError` before any trial starts). Its paths are made
    absolute, relative ones as from the working directory here: Ray runs each trial in a
    directory of its own."""
    seeds, points = _check_seeds(seeds), parse_grid(grid)
    for item in sets:
        if item.partition("=")[0].strip() in _OWNED:
            raise ConfigError(f"expected --set of fields other than {_OWNED} (the sweep sets them), got {item!r}")
    out = Path(out).resolve()
    launch = Path(launch).resolve()
    trials = []
    for combo in itertools.product(*points.values()):
        point = dict(zip(points, combo, strict=True))
        prefix = "".join(f"{k}={_label(v)}-" for k, v in point.items())
        for seed in seeds:
            name = f"{prefix}seed{seed}"
            run_dir = out / name
            full = [*sets, *(f"{k}={_literal(v)}" for k, v in point.items())]
            full += [f"seed={seed}", f"run_dir={_literal(str(run_dir))}"]
            cfg = load_config(launch, full)  # validates every key and value of this trial
            if cfg.train.dataset:  # where it is now, for trials that run elsewhere (a path, or an id's)
                resolved = os.path.abspath(dataset_path(cfg.train.dataset))
                if resolved != cfg.train.dataset:
                    full.append(f"train.dataset={_literal(resolved)}")
            params = {"launch": str(launch), "sets": full}
            trials.append(Trial(name, seed, point, run_dir, params))
    return trials


# -- running ----------------------------------------------------------------------------------
def qmpc_trial(trial: Trial) -> dict[str, Any]:
    """One trial of ``qmpc sweep``: ``qmpc train LAUNCH --set ...`` in ``trial.run_dir``, resumed
    from its checkpoint if it has one. Its paths are absolute (:func:`plan_trials`), so it runs
    in any working directory, and leaves the process's as it is."""
    from qmpc.trainer import train

    cfg = load_config(trial.params["launch"], trial.params["sets"])
    resume = (trial.run_dir / "checkpoint.pt").exists()
    s = train(cfg, resume=resume, progress=False, overrides=trial.params["sets"] if resume else ())
    return {
        "eval_steps": [int(x) for x in s.eval_steps],
        "eval_returns": [float(r) for r in s.eval_returns],
        "steps": int(s.steps),
        "seconds": float(s.seconds),
        "fail_frac": float(s.fail_frac),
    }


def _run_trial(config: dict, trials: dict[str, Trial], fn: Callable[[Trial], dict]) -> dict:
    """The Ray Tune trainable: run the trial, write its ``result.json`` atomically."""
    trial = trials[config["trial"]]
    t0 = time.perf_counter()
    trial.run_dir.mkdir(parents=True, exist_ok=True)
    result = fn(trial)
    result.setdefault("seconds", time.perf_counter() - t0)
    result["params"] = trial.params  # what it was run with: a trial with other params is not finished
    atomic_write(trial.run_dir / RESULT_FILE, lambda tmp: Path(tmp).write_text(json.dumps(result)))
    return {"final_return": result["eval_returns"][-1] if result["eval_returns"] else math.nan}


def read_outcome(trial: Trial) -> TrialOutcome | None:
    """The finished trial's outcome from its ``result.json`` (None if it has none)."""
    path = trial.run_dir / RESULT_FILE
    if not path.exists():
        return None
    try:
        r = json.loads(path.read_text())
        if r.get("params") != json.loads(json.dumps(trial.params)):
            return None  # run with other settings (e.g. fewer steps): to be resumed
        return TrialOutcome(trial, r["eval_steps"], r["eval_returns"], r["steps"], r["seconds"], r["fail_frac"])
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        return TrialOutcome(trial, error=f"unreadable {path}: {e}")


SCHEDULE_TIMEOUT_S = 300.0
"""How long a sweep waits with no trial running and one waiting for CPUs (held by other jobs of
the cluster) before it stops with an error."""


def run_sweep(
    trials: list[Trial],
    out: str | Path,
    trial_fn: Callable[[Trial], dict] = qmpc_trial,
    *,
    address: str | None = None,
    cpus_per_trial: float = 1,
    num_cpus: int | None = None,
    resume: bool = False,
    schedule_timeout: float = SCHEDULE_TIMEOUT_S,
) -> list[TrialOutcome]:
    """Run the unfinished ``trials`` as Ray Tune trials and return every trial's outcome.

    ``address``: a Ray cluster (``HOST:PORT`` or ``auto``: the one ``ray start`` started on this
    machine); default a local Ray with ``num_cpus`` (all cores). Without ``resume`` the trials'
    directories must not exist yet; with it, finished trials are read back and unfinished ones
    continue from their checkpoints. A trial that raises is reported with its error; the others
    go on. ``out`` is locked while the sweep runs (a second sweep into it is refused), and is
    checked (a directory, writable) before Ray starts. No trial started within
    ``schedule_timeout`` s while one waits for CPUs: an :class:`InputError`."""
    from qmpc.data import ensure_dir

    out = Path(out).resolve()
    if not (isinstance(cpus_per_trial, int | float) and cpus_per_trial > 0):
        raise InputError(f"expected --cpus-per-trial > 0, got {cpus_per_trial!r}")
    if not (isinstance(schedule_timeout, int | float) and schedule_timeout > 0):
        raise InputError(f"expected --schedule-timeout > 0, got {schedule_timeout!r}")
    for what, keys in (("names", [t.name for t in trials]), ("run directories", [str(t.run_dir) for t in trials])):
        dup = sorted({k for k in keys if keys.count(k) > 1})
        if dup:
            raise InputError(f"expected distinct trial {what}, got {dup[0]!r} more than once")
    ensure_dir(out, "--out (the sweep directory)")
    with _lock(out):
        existing = [t.run_dir for t in trials if t.run_dir.exists()]
        if existing and not resume:
            raise InputError(f"expected a new sweep directory, got existing trials in {out} (use --resume)")
        for t in trials:
            _check_resumable(t)
        return _run(trials, out, trial_fn, address, cpus_per_trial, num_cpus, schedule_timeout)


@contextlib.contextmanager
def _lock(out: Path):
    """``out/.lock`` for the sweep (:class:`qmpc.trainer.RunLock`): a second sweep into ``out``
    while one runs is an :class:`OutputError` naming it (it would run the same trials, and list
    those the first one is running as failed)."""
    from qmpc.trainer import RunLock

    lock = RunLock(out)
    try:
        lock.__enter__()
    except OutputError:
        raise
    except OSError as e:
        raise OutputError(f"expected a writable --out directory {out}, got: {e.strerror or e}") from None
    try:
        yield lock
    finally:
        lock.__exit__(None, None, None)


def _run(trials, out, trial_fn, address, cpus_per_trial, num_cpus, schedule_timeout) -> list[TrialOutcome]:
    """:func:`run_sweep` once ``out`` is checked and locked: connect, run what is unfinished, read back."""
    from qmpc.distributed import cluster_line, connect

    ray = connect(address, num_cpus)
    print(f"Ray: {cluster_line()}", flush=True)
    total = ray.cluster_resources().get("CPU", 0)
    if cpus_per_trial > total:
        raise InputError(f"expected --cpus-per-trial <= {total:g} (the Ray cluster's CPUs), got {cpus_per_trial:g}")
    todo = [t for t in trials if read_outcome(t) is None]
    errors: dict[str, str] = {}
    if todo:
        errors = _tune(todo, trial_fn, out, cpus_per_trial, schedule_timeout)
    outcomes = []
    for t in trials:
        o = read_outcome(t) if t.name not in errors else None
        outcomes.append(o or TrialOutcome(t, error=errors.get(t.name, "no result (interrupted)")))
    return outcomes


def _check_resumable(trial: Trial) -> None:
    """A qmpc trial whose run directory holds a run must be able to resume it with the trial's
    settings (only :data:`~qmpc.config.RESUMABLE_KEYS` may differ): a :class:`ConfigError`
    naming the key, before any trial starts."""
    import tomllib

    from qmpc.config import resumed_config

    saved = trial.run_dir / "config.toml"
    if "sets" not in trial.params or not saved.exists() or not (trial.run_dir / "checkpoint.pt").exists():
        return
    try:
        data = tomllib.loads(saved.read_text())
    except (tomllib.TOMLDecodeError, OSError) as e:
        raise ConfigError(f"expected a readable {saved}, got: {e}") from None
    try:
        resumed_config(data, trial.params["sets"])
    except ConfigError as e:
        raise ConfigError(f"trial {trial.name} cannot resume its run: {e}") from None


def _tune(todo: list[Trial], trial_fn: Callable, out: Path, cpus: float, schedule_timeout: float) -> dict[str, str]:
    """Run ``todo`` with Ray Tune; ``{trial name: error}`` of those that raised."""
    from ray import tune

    out.mkdir(parents=True, exist_ok=True)
    name = lambda t: t.config["trial"]  # noqa: E731
    trainable = tune.with_parameters(_run_trial, trials={t.name: t for t in todo}, fn=trial_fn)
    progress = _progress(len(todo), cpus, schedule_timeout)
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": cpus}),
        param_space={"trial": tune.grid_search([t.name for t in todo])},
        tune_config=tune.TuneConfig(trial_name_creator=name, trial_dirname_creator=name),
        run_config=tune.RunConfig(
            name="tune",
            storage_path=str(out / ".tune"),
            verbose=0,
            failure_config=tune.FailureConfig(max_failures=0),
            callbacks=[progress],
            stop=progress.stopper(),
        ),
    )
    # its dataframes are not read (result.json is): no warning for a trial that reported nothing
    quiet = logging.getLogger("ray.tune.analysis.experiment_analysis")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        results = tuner.fit()
    finally:
        quiet.setLevel(level)
    if progress.stuck:
        raise InputError(progress.stuck)
    errors = {}
    for r in results:
        if r.error is not None:  # a trial that never started has no config: its directory has its name
            cause = getattr(r.error, "cause", None) or r.error
            errors[(r.config or {}).get("trial") or Path(r.path).name] = (
                f"{type(cause).__name__}: {cause}".splitlines()[0]
            )
    return errors


def _progress(total: int, cpus: float, schedule_timeout: float):
    """A tune.Callback (defined on use: ray is optional) printing one line per trial that ends, and
    stopping the sweep (its :meth:`stopper`) when no trial has run for ``schedule_timeout`` s
    while one waits for CPUs."""
    import ray
    from ray import tune

    class Progress(tune.Callback):
        def __init__(self):
            self.done = 0
            self.waiting_since: float | None = None
            self.stuck = ""

        def on_step_begin(self, iteration, trials, **info):
            waiting = [t for t in trials if t.status == "PENDING"]
            if not waiting or any(t.status == "RUNNING" for t in trials):
                self.waiting_since = None
            elif self.waiting_since is None:
                self.waiting_since = time.monotonic()
            elif time.monotonic() - self.waiting_since > schedule_timeout and not self.stuck:
                free, total_cpus = ray.available_resources().get("CPU", 0), ray.cluster_resources().get("CPU", 0)
                self.stuck = (
                    f"expected trial {waiting[0].config['trial']} to start within {schedule_timeout:g} s, got no "
                    f"CPUs for it: it needs {cpus:g}, {free:g} of the cluster's {total_cpus:g} are free (held by other "
                    f"jobs): free them, lower --cpus-per-trial or raise --schedule-timeout"
                )

        def stopper(self):
            progress = self

            class Stuck(tune.Stopper):
                def __call__(self, trial_id, result):
                    return False

                def stop_all(self):
                    return bool(progress.stuck)

            return Stuck()

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.done += 1
            final = (trial.last_result or {}).get("final_return", math.nan)
            print(f"[{self.done}/{total}] {trial.config['trial']}: final return {final:.1f}", flush=True)

        def on_trial_error(self, iteration, trials, trial, **info):
            self.done += 1
            print(f"[{self.done}/{total}] {trial.config['trial']}: FAILED", flush=True)

    return Progress()


# -- reporting --------------------------------------------------------------------------------
def _fmt(values: list[float]) -> str:
    if not values:
        return "—"
    return f"{np.mean(values):.1f} ± {np.std(values):.1f}"


def write_results(outcomes: list[TrialOutcome], path: str | Path, solved_at: float | None = None) -> Path:
    """``results.csv``: one row per trial."""
    keys = list(dict.fromkeys(k for o in outcomes for k in o.trial.grid))
    head = ["trial", "seed", *keys, "final_return", "best_return", "solved_at_step", "fail_frac", "steps"]
    rows = [[*head, "wall_s", "run_dir", "error"]]
    for o in outcomes:
        t = o.trial
        final = o.eval_returns[-1] if o.ok else math.nan
        best = max(o.eval_returns) if o.ok else math.nan
        step = o.solved_at(solved_at)
        grid = [t.grid.get(k, "") for k in keys]
        rows.append([t.name, t.seed, *grid, final, best, "" if step is None else step, o.fail_frac, o.steps])
        rows[-1] += [o.seconds, str(t.run_dir), o.error]

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            csv.writer(f).writerows(rows)

    atomic_write(Path(path), write)
    return Path(path)


def _groups(outcomes: list[TrialOutcome]) -> dict[str, list[TrialOutcome]]:
    groups: dict[str, list[TrialOutcome]] = {}
    for o in outcomes:
        label = ", ".join(f"{k}={v}" for k, v in o.trial.grid.items()) or "(launch file)"
        groups.setdefault(label, []).append(o)
    return groups


def format_table(
    outcomes: list[TrialOutcome], solved_at: float | None = None, milestones: Sequence[int] | None = None
) -> str:
    """Per grid point: trials that finished, mean ± std of the final and best returns, seeds that
    reached ``solved_at`` (and, for each step of ``milestones``, how many had by then), the mean
    failed-solve percentage and wall time; then one line per failed trial."""
    groups = _groups(outcomes)
    width = max([len("grid point"), *(len(label) for label in groups)])
    head = f"{'grid point':<{width}} {'seeds':>5} {'final return':>18} {'best return':>18}"
    if solved_at is not None:
        head += f" {'solved':>7}" + "".join(
            f" {f'by {k // 1000}k' if k % 1000 == 0 else f'by {k}':>6}" for k in milestones or []
        )
    head += f" {'fail %':>7} {'wall s':>8}"
    lines = [head, "-" * len(head)]
    for label, group in groups.items():
        ok = [o for o in group if o.ok]
        line = f"{label:<{width}} {len(ok):>5} {_fmt([o.eval_returns[-1] for o in ok]):>18}"
        line += f" {_fmt([max(o.eval_returns) for o in ok]):>18}"
        if solved_at is not None:
            at = [o.solved_at(solved_at) for o in ok]
            line += f" {f'{sum(a is not None for a in at)}/{len(group)}':>7}"
            line += "".join(f" {sum(a is not None and a <= k for a in at):>6}" for k in milestones or [])
        fail = 100 * np.mean([o.fail_frac for o in ok]) if ok else math.nan
        line += f" {fail:>7.2f} {np.mean([o.seconds for o in ok]) if ok else math.nan:>8.0f}"
        lines.append(line)
    for o in outcomes:
        if not o.ok:
            lines.append(f"FAILED {o.trial.name}: {o.error}")
    return "\n".join(lines)


def plot_curves(outcomes: list[TrialOutcome], path: str | Path, title: str = "") -> Path:
    """Mean evaluation return per grid point against steps, with a band of ± one std across seeds
    (and the min–max range, lighter). Drawn on a :class:`matplotlib.figure.Figure` of its own:
    pyplot and its backend are left alone."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for label, group in _groups(outcomes).items():
        ok = [o for o in group if o.ok]
        if not ok:
            continue
        steps = sorted(set.intersection(*(set(o.eval_steps) for o in ok)))
        if not steps:
            continue
        ys = np.array([[dict(zip(o.eval_steps, o.eval_returns, strict=True))[s] for s in steps] for o in ok])
        m, sd = ys.mean(0), ys.std(0)
        (line,) = ax.plot(steps, m, label=f"{label} ({len(ok)} seeds)")
        ax.fill_between(steps, m - sd, m + sd, color=line.get_color(), alpha=0.25)
        ax.fill_between(steps, ys.min(0), ys.max(0), color=line.get_color(), alpha=0.08)
    ax.set_xlabel("environment steps")
    ax.set_ylabel("evaluation return (= −cost)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path
