"""``qmpc sweep``: a tiny seed sweep of the point mass on a local Ray, resume, bad input."""

from __future__ import annotations

import csv
import time
from pathlib import Path

import pytest

from qmpc.cli import main
from qmpc.config import load_config
from qmpc.sweep import RESULT_FILE, plan_trials
from qmpc.trainer import train

ray = pytest.importorskip("ray")

LAUNCH = str(Path(__file__).resolve().parents[1] / "launch" / "point_mass.toml")
TINY = [
    "train.steps=200",
    "train.learning_starts=100",
    "train.batch_size=32",
    "train.eval_every=100",
    "train.eval_episodes=1",
    "train.checkpoint_every=100",
    "solver.workers=1",
]


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    yield
    if ray.is_initialized():
        ray.shutdown()


def _sweep(out: Path, *extra: str, seeds=("0", "1")) -> int:
    sets = [a for s in TINY for a in ("--set", s)]
    return main(["sweep", LAUNCH, "--seeds", *seeds, *sets, "--out", str(out), "--num-cpus", "2", *extra])


def _rows(out: Path) -> list[dict]:
    with open(out / "results.csv") as f:
        return list(csv.DictReader(f))


def test_tiny_sweep_resumes_only_what_is_unfinished(tmp_path, capsys):
    out = tmp_path / "sweep"
    # seed 1 was killed after its checkpoint at step 100 (no result.json)
    (t1,) = [t for t in plan_trials(LAUNCH, [0, 1], TINY, [], out) if t.seed == 1]
    train(load_config(t1.params["launch"], t1.params["sets"]), progress=False, stop_at=150)
    assert (t1.run_dir / "checkpoint.pt").exists() and not (t1.run_dir / RESULT_FILE).exists()

    assert _sweep(out) == 2  # the trial directory exists: --resume is needed
    assert "use --resume" in capsys.readouterr().err

    assert _sweep(out, "--resume", "--solved-at=-1e9") == 0
    printed = capsys.readouterr().out
    rows = _rows(out)
    assert [r["trial"] for r in rows] == ["seed0", "seed1"]
    assert all(r["steps"] == "200" and r["error"] == "" and r["solved_at_step"] == "100" for r in rows)
    assert "2/2" in printed and (out / "curves.png").stat().st_size > 0
    # seed 1 continued from its checkpoint: its evaluation at step 100 was kept, not redone
    evals = [r for r in csv.DictReader(open(t1.run_dir / "metrics.csv")) if r["tag"] == "eval/return"]
    assert [r["step"] for r in evals] == ["100", "200"]

    stamps = {p: p.stat().st_mtime_ns for p in out.glob(f"*/{RESULT_FILE}")}
    time.sleep(0.01)
    assert _sweep(out, "--resume") == 0  # nothing left to run
    assert {p: p.stat().st_mtime_ns for p in out.glob(f"*/{RESULT_FILE}")} == stamps
    assert _rows(out)[0]["final_return"] == rows[0]["final_return"]

    # a setting a run cannot resume with is refused by name before any trial starts
    assert _sweep(out, "--resume", "--set", "train.batch_size=64") == 2
    assert "train.batch_size" in capsys.readouterr().err
    # more steps: every trial continues from its checkpoint
    assert _sweep(out, "--resume", "--set", "train.steps=300") == 0
    assert all(r["steps"] == "300" for r in _rows(out))
    evals = [r for r in csv.DictReader(open(t1.run_dir / "metrics.csv")) if r["tag"] == "eval/return"]
    assert [r["step"] for r in evals] == ["100", "200", "300"]


def test_a_crashing_trial_is_reported_and_the_others_finish(tmp_path, capsys):
    out = tmp_path / "sweep"
    rc = _sweep(out, "--grid", "env.id=qmpc/PointMass-v0,NoSuchTask-v9", seeds=("0",))
    assert rc == 1
    rows = {r["trial"]: r for r in _rows(out)}
    assert rows["env.id=qmpc_PointMass-v0-seed0"]["error"] == ""
    assert "NoSuchTask-v9" in rows["env.id=NoSuchTask-v9-seed0"]["error"]
    assert "FAILED env.id=NoSuchTask-v9-seed0" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args,message",
    [
        (["--grid", "train.nosuch=1,2"], "nosuch"),
        (["--grid", "train.lr"], "expected --grid key=v1,v2"),
        (["--grid", "seed=1,2"], "use --seeds"),
        (["--set", "run_dir=x"], "the sweep sets them"),
        (["--grid", "train.lr=0.1,-1"], "train.lr"),
        (["--address", "127.0.0.1:1"], "no connection"),
        (["--address", "nonsense"], "HOST:PORT"),
        (["--cpus-per-trial", "0"], "--cpus-per-trial"),
    ],
)
def test_bad_input_is_one_line_before_any_trial(tmp_path, capsys, args, message):
    out = tmp_path / "sweep"
    assert _sweep(out, *args) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not any(out.glob("seed*"))


def test_trials_must_have_distinct_names(tmp_path):
    from qmpc.errors import InputError
    from qmpc.sweep import run_sweep

    a, b = plan_trials(LAUNCH, [0], TINY, [], tmp_path / "a") + plan_trials(LAUNCH, [0], TINY, [], tmp_path / "b")
    with pytest.raises(InputError, match="distinct trial names"):
        run_sweep([a, b], tmp_path)


def test_empty_seed_list_is_refused(tmp_path, capsys):
    assert _sweep(tmp_path / "s", seeds=()) == 2
    assert "at least one seed" in capsys.readouterr().err


def test_learning_benchmark_runs_with_a_tiny_budget(tmp_path):
    """``benchmarks/bench_learning.py`` end to end (qmpc only: SAC needs the benchmark extra) on
    qmpc's own task, whose id holds a slash."""
    import subprocess
    import sys

    bench = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_learning.py"
    sets = [a for s in TINY if not s.startswith(("train.steps", "train.eval")) for a in ("--set", s)]
    args = ["--tasks", "point_mass", "--seeds", "0", "--methods", "qmpc", "--steps", "200", "--eval-every", "100"]
    args += ["--eval-episodes", "1", "--out", str(tmp_path), "--num-cpus", "1", *sets]
    out = subprocess.run([sys.executable, str(bench), *args], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "qmpc/PointMass-v0, 200 environment steps per run" in out.stdout
    assert (tmp_path / "curves_pointmass.png").exists()
    rows = list(csv.DictReader((tmp_path / "results_pointmass.csv").open()))
    assert len(rows) == 1 and int(rows[0]["steps"]) == 200
