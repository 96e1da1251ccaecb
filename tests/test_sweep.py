"""``qmpc sweep``: a tiny seed sweep of the point mass on a local Ray, resume, bad input."""

from __future__ import annotations

import csv
import os
import time
from pathlib import Path

import pytest

from qmpc.checkpoint import load_checkpoint
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
    qmpc's own task, whose id holds a slash, greedy and trained to plan two steps ahead."""
    import subprocess
    import sys

    bench = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_learning.py"
    sets = [a for s in TINY if not s.startswith(("train.steps", "train.eval")) for a in ("--set", s)]
    args = ["--tasks", "point_mass", "--seeds", "0", "--methods", "qmpc", "--steps", "200", "--eval-every", "100"]
    args += ["--eval-episodes", "1", "--out", str(tmp_path), "--num-cpus", "1", "--horizons", "1", "2", *sets]
    out = subprocess.run([sys.executable, str(bench), *args], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "qmpc/PointMass-v0, 200 environment steps per run" in out.stdout
    assert (tmp_path / "curves_pointmass.png").exists()
    rows = list(csv.DictReader((tmp_path / "results_pointmass.csv").open()))
    assert len(rows) == 2 and all(int(r["steps"]) == 200 for r in rows)
    assert "qmpc-h2" in out.stdout
    assert load_checkpoint(tmp_path / "point_mass-qmpc-h2" / "seed0" / "checkpoint.pt")["plan_actor"]["horizon"] == 2


# -- issue 20, items 2 and 3 ------------------------------------------------------------------
@pytest.fixture
def no_ray():
    """No Ray in this process: a test that must fail before Ray starts can tell that it did."""
    if ray.is_initialized():
        ray.shutdown()
    yield
    if ray.is_initialized():
        ray.shutdown()


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("qmpc sweep: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_out_in_the_way_is_refused_before_ray_starts(tmp_path, capsys, no_ray):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for out, message in ((blocker, "got a file in the way"), (blocker / "sweep", "expected to create")):
        assert _sweep(out) == 2
        assert message in _one_line(capsys) and not ray.is_initialized()
    assert blocker.read_text() == "x"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_out_is_refused_before_ray_starts(tmp_path, capsys, no_ray):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert _sweep(ro) == 2
        assert "read-only" in _one_line(capsys) and not ray.is_initialized()
    finally:
        ro.chmod(0o755)


def test_out_that_cannot_be_written_is_refused_before_ray_starts(tmp_path, capsys, no_ray, monkeypatch):
    """A directory that ``os.access`` calls writable but refuses a file (root on a read-only place)."""
    import qmpc.trainer

    def refuse(self):
        raise PermissionError(13, "Permission denied", str(self.path))

    monkeypatch.setattr(qmpc.trainer.RunLock, "__enter__", refuse)
    assert _sweep(tmp_path / "sweep") == 2
    assert "writable --out" in _one_line(capsys) and not ray.is_initialized()


def test_a_second_sweep_into_the_same_out_is_refused(tmp_path, capsys, no_ray):
    """Two sweeps into one --out ran the same trials, and the second listed those the first was
    running as failed until ``--resume``: the sweep holds ``OUT/.lock`` while it runs."""
    import json
    import socket
    import subprocess
    import sys

    out = tmp_path / "sweep"
    out.mkdir()
    first = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        (out / ".lock").write_text(json.dumps({"pid": first.pid, "host": socket.gethostname()}))
        assert _sweep(out) == 2
        err = _one_line(capsys)
        assert f"pid {first.pid}" in err and not ray.is_initialized()
        assert not any(out.glob("seed*"))
    finally:
        first.kill()
        first.wait()
    # its owner gone, the lock is stale: the next sweep takes it over
    (out / ".lock").write_text(json.dumps({"pid": first.pid, "host": socket.gethostname()}))
    assert _sweep(out, seeds=("0",)) == 0
    assert not (out / ".lock").exists()


@pytest.mark.parametrize("seed", ["-1", str(2**32), str(2**64)])
def test_seeds_out_of_range_are_one_line(tmp_path, capsys, seed, no_ray):
    assert _sweep(tmp_path / "s", seeds=("0", seed)) == 2
    assert "[0, 2**32)" in _one_line(capsys) and not ray.is_initialized()


def test_a_trial_that_cannot_be_scheduled_is_an_error_not_a_wait(tmp_path, capsys, no_ray):
    """Every CPU of the cluster held by another job: the sweep waited without a word."""
    from qmpc.distributed import connect

    connect(num_cpus=1)
    held = ray.util.placement_group([{"CPU": 1}])  # another job's reservation
    ray.get(held.ready(), timeout=60)
    t0 = time.monotonic()
    assert _sweep(tmp_path / "sweep", "--schedule-timeout", "3", seeds=("0",)) == 2
    assert time.monotonic() - t0 < 120
    out, err = capsys.readouterr()
    assert "0 of 1 CPUs free" in out  # where it runs, and what is free, before it waits
    last = err.strip().splitlines()[-1]  # after Ray's own notices of its start
    assert last.startswith("qmpc sweep: error: expected trial seed0 to start within 3 s") and "Traceback" not in err
    assert "Failed to fetch" not in err


def test_address_auto_joins_only_a_cluster_of_ray_start(tmp_path_factory, capsys, no_ray, monkeypatch):
    """``--address auto`` joined any Ray it found on this machine (another process's private one
    too): now only the cluster ``ray start`` wrote down, and the sweep says where it runs."""
    import shutil
    import signal
    import subprocess
    import sys
    import tempfile

    ray_cli = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))
    started = Path(tempfile.mkdtemp(prefix="qa", dir="/tmp"))  # short: Ray's socket paths
    elsewhere = Path(tempfile.mkdtemp(prefix="qb", dir="/tmp"))
    # its own auth mode: this process's may be the token mode a local Ray turned on earlier
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": "", "RAY_TMPDIR": str(started)}
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    args = ["start", "--head", "--port", "6393", "--num-cpus", "1", "--include-dashboard", "false", "--block"]
    head = subprocess.Popen([ray_cli, *args, "--disable-usage-stats"], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        for _ in range(120):
            if (started / "ray" / "ray_current_cluster").exists():
                break
            time.sleep(1)
        address = (started / "ray" / "ray_current_cluster").read_text().strip()
        # no `ray start` cluster in this temporary directory: refused, the running one not joined
        monkeypatch.setenv("RAY_TMPDIR", str(elsewhere))
        assert _sweep(tmp_path_factory.mktemp("a") / "sweep", "--address", "auto", seeds=("0",)) == 2
        assert "ray start --head" in _one_line(capsys) and not ray.is_initialized()
        # the cluster `ray start` wrote down: joined, and said so (in a process of its own, in its auth mode)
        sets = [a for s in TINY for a in ("--set", s)]
        out = tmp_path_factory.mktemp("b") / "sweep"
        argv = ["sweep", LAUNCH, "--seeds", "0", *sets, "--out", str(out), "--address", "auto"]
        root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])
        r = subprocess.run([sys.executable, "-m", "qmpc.cli", *argv], env=env, capture_output=True, text=True,
                           timeout=300)  # fmt: skip
        assert r.returncode == 0, r.stderr[-3000:]
        assert f"Ray: joined the Ray cluster at {address}: 1 of 1 CPUs free" in r.stdout
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=60)
        shutil.rmtree(started, ignore_errors=True)
        shutil.rmtree(elsewhere, ignore_errors=True)


def test_a_sac_baseline_run_continues_from_its_checkpoint(tmp_path):
    """``bench_learning.py``'s SAC trials write ``sac.pkl`` after each evaluation; a run stopped
    after its second evaluation continues from there to the budget (same evaluation steps as a
    run never stopped), its replay buffer and step count restored."""
    pytest.importorskip("stable_baselines3")
    import importlib.util
    import pickle

    import numpy as np

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_learning.py"
    spec = importlib.util.spec_from_file_location("bench_learning", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    run = tmp_path / "sac"
    xs, ys, _ = bench.run_sac("InvertedPendulum-v5", 200, 0, 100, 1, run)  # "killed" at 200 of 400
    assert xs == [100, 200] and len(ys) == 2
    saved = pickle.loads((run / "sac.pkl").read_bytes())
    assert saved["eval_steps"] == [100, 200]
    xs, ys, _ = bench.run_sac("InvertedPendulum-v5", 400, 0, 100, 1, run)
    assert xs == [100, 200, 300, 400] and len(ys) == 4 and all(np.isfinite(ys))
    saved = pickle.loads((run / "sac.pkl").read_bytes())
    assert saved["eval_steps"] == [100, 200, 300, 400] and saved["seconds"] > 0
