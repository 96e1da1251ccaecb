"""Issue 20, items 1 and 2: a ``qmpc`` process that uses Ray exits when its work is done, and no
Ray process it started outlives it: after training (``solver.backend=ray``), after a sweep,
after a ``kill -9`` of one of its solver actors, after a SIGTERM, and after a ``kill -9`` of the
driver itself.

Each command runs in a session of its own (``start_new_session``): every process Ray starts for
it (GCS, raylet, agents, workers) belongs to that session, whoever its parent is by then, so the
processes it left behind are those of the session."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("ray")

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = str(ROOT / "launch" / "point_mass.toml")
TINY = [
    "train.learning_starts=100",
    "train.batch_size=32",
    "train.eval_episodes=1",
    "solver.workers=1",
]
pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")


def _sets(items) -> list[str]:
    return [a for s in items for a in ("--set", s)]


def _session(sid: int) -> dict[int, str]:
    """Live processes of session ``sid``: ``{pid: command line}`` (zombies left out)."""
    procs = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text().rsplit(")", 1)[1].split()
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except (OSError, IndexError):
            continue
        if int(stat[3]) == sid and stat[0] != "Z":
            procs[int(d.name)] = cmd
    return procs


def _start(args: list[str], tmp: Path) -> subprocess.Popen:
    """``python -m qmpc.cli ARGS`` in a new session, in ``tmp``, its output in files there."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("RAY_ADDRESS", None)
    with open(tmp / "stdout.txt", "w") as out, open(tmp / "stderr.txt", "w") as err:
        return subprocess.Popen([sys.executable, "-m", "qmpc.cli", *args], cwd=tmp, env=env, stdout=out,
                                stderr=err, start_new_session=True)  # fmt: skip


def _wait_for(sid: int, title: str, timeout: float = 120.0) -> int:
    """The pid of the first process of session ``sid`` whose command line starts with ``title``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [pid for pid, cmd in _session(sid).items() if cmd.startswith(title)]
        if found:
            return found[0]
        time.sleep(0.2)
    raise AssertionError(f"no {title} process in {timeout:g} s: {_session(sid)}")


def _assert_gone(sid: int, timeout: float = 30.0) -> None:
    """Every process of session ``sid`` ends within ``timeout`` s (those left are killed)."""
    deadline = time.monotonic() + timeout
    while _session(sid) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = _session(sid)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not left, f"Ray processes left behind: {left}"


def _finish(p: subprocess.Popen, tmp: Path, timeout: float) -> tuple[int, str, str]:
    """Wait for ``p`` (killed, session and all, after ``timeout`` s); rc, stdout, stderr."""
    try:
        rc = p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        rc = None
    return rc, (tmp / "stdout.txt").read_text(), (tmp / "stderr.txt").read_text()


def _train_args(tmp: Path, steps: int) -> list[str]:
    sets = [*TINY, f"train.steps={steps}", f"train.eval_every={steps}", f"train.checkpoint_every={steps}"]
    return ["train", LAUNCH, *_sets([*sets, "solver.backend=ray", f"run_dir={tmp / 'run'}"]), "--no-progress"]


def test_train_on_ray_exits_after_its_summary(tmp_path):
    """The summary was printed, then the process hung in 3 of 4 runs (``RayRunner.__del__`` called
    into Ray after Ray's own exit handler, and Ray's auto-init retried a dead GCS forever)."""
    p = _start(_train_args(tmp_path, 200), tmp_path)
    rc, out, err = _finish(p, tmp_path, timeout=180)
    assert rc == 0, f"rc={rc}\n{out[-2000:]}\n{err[-3000:]}"
    assert "checkpoint:" in out
    _assert_gone(p.pid)


def test_train_on_ray_goes_on_after_a_killed_actor_and_exits(tmp_path):
    p = _start(_train_args(tmp_path, 400), tmp_path)
    os.kill(_wait_for(p.pid, "ray::_SolverActor"), signal.SIGKILL)
    rc, out, err = _finish(p, tmp_path, timeout=240)
    assert rc == 0, f"rc={rc}\n{out[-2000:]}\n{err[-3000:]}"
    assert "actors lost" in err and "checkpoint:" in out
    _assert_gone(p.pid)


def test_a_terminated_train_driver_exits_and_leaves_no_ray_process(tmp_path):
    """SIGTERM: the process unwinds (exit status 15, its run's lock released) instead of hanging,
    or aborting with a C stack from Ray's crash handler."""
    p = _start(_train_args(tmp_path, 100_000), tmp_path)
    _wait_for(p.pid, "ray::_SolverActor")
    time.sleep(2)
    p.terminate()
    rc, out, err = _finish(p, tmp_path, timeout=60)
    assert rc == 15, f"rc={rc}\n{out[-2000:]}\n{err[-3000:]}"
    assert "SIGTERM received" not in err and not (tmp_path / "run" / ".lock").exists()
    _assert_gone(p.pid)


def test_a_killed_train_driver_leaves_no_ray_process(tmp_path):
    p = _start(_train_args(tmp_path, 100_000), tmp_path)
    _wait_for(p.pid, "ray::_SolverActor")
    time.sleep(2)  # the actor is at work
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    _assert_gone(p.pid)


def _sweep_args(tmp: Path, steps: int, *extra: str) -> list[str]:
    sets = [*TINY, f"train.steps={steps}", f"train.eval_every={steps}", f"train.checkpoint_every={steps}"]
    return ["sweep", LAUNCH, "--seeds", "0", *_sets(sets), "--out", str(tmp / "sweep"), "--num-cpus", "1", *extra]


def test_sweep_exits_and_says_where_it_runs(tmp_path):
    p = _start(_sweep_args(tmp_path, 200), tmp_path)
    rc, out, err = _finish(p, tmp_path, timeout=240)
    assert rc == 0, f"rc={rc}\n{out[-2000:]}\n{err[-3000:]}"
    assert "Ray: a local Ray started by this process" in out and "1 of 1 CPUs free" in out
    _assert_gone(p.pid)


def test_a_killed_sweep_driver_leaves_no_ray_process(tmp_path):
    """Two of Ray's helpers (its dashboard and runtime-env agents) outlived a ``kill -9`` of the
    driver: they saw the raylet die and then hung on their way out."""
    p = _start(_sweep_args(tmp_path, 100_000), tmp_path)
    _wait_for(p.pid, "ray::ImplicitFunc")
    time.sleep(2)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    _assert_gone(p.pid)
