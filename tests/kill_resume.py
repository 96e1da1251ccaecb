"""The kill -9 check of ``qmpc train --resume``: a run killed with SIGKILL at random moments and
resumed each time ends bit-identical to an uninterrupted one (``tests/fingerprint.py``'s digests:
Q, target, Adam's state, the dynamics model, evaluation returns, logged TD losses).

Both runs are ``qmpc train`` subprocesses of the same launch file and ``--set`` overrides (each in
its own ``run_dir`` under ``--out``). The uninterrupted run is timed first; each launch of the
other is then killed at a random moment (of its startup, or of its training: see
:func:`kill_and_resume`; some land mid-checkpoint) and relaunched with ``--resume`` once a
checkpoint exists (else as a new run), until ``--kills`` kills have been made; the last launch
runs to the end. Exit status 0 if all the kills were made and the fingerprints are identical.

    python tests/kill_resume.py launch/inverted_pendulum.toml --kills 10 --out /tmp/kill_ip \\
        --set train.steps=400 --set train.learning_starts=100 --set train.checkpoint_every=25
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _fingerprint_module():
    spec = importlib.util.spec_from_file_location("fingerprint", HERE / "fingerprint.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _checkpoint_step(run_dir: Path) -> int | None:
    from qmpc.checkpoint import load_checkpoint

    path = run_dir / "checkpoint.pt"
    return int(load_checkpoint(path)["loop"]["step"]) if path.exists() else None


def _launch(launch: str, run_dir: Path, sets: list[str], resume: bool) -> subprocess.Popen:
    argv = [sys.executable, "-m", "qmpc.cli", "train", str(launch), "--no-progress", "--set", f"run_dir={run_dir}"]
    for s in sets:
        argv += ["--set", s]
    if resume:
        argv.append("--resume")
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _finish(p: subprocess.Popen, what: str) -> None:
    _, err = p.communicate()
    if p.returncode != 0:
        raise RuntimeError(f"{what} exited with {p.returncode}: {err.strip()[-2000:]}")


def _started(p: subprocess.Popen, run_dir: Path, since_ns: int) -> bool:
    """Whether process ``p`` (launched at ``since_ns``) has started its loop: it holds ``run_dir``'s
    lock and has (re)written ``metrics.csv``, the last thing before the first step."""
    try:
        mine = json.loads((run_dir / ".lock").read_text())["pid"] == p.pid
        return mine and (run_dir / "metrics.csv").stat().st_mtime_ns >= since_ns
    except (OSError, ValueError, KeyError):
        return False


def _wait_until_started(p: subprocess.Popen, run_dir: Path, since_ns: int) -> bool:
    """Wait until ``p`` has started its loop; False if it exited first."""
    while p.poll() is None:
        if _started(p, run_dir, since_ns):
            return True
        time.sleep(0.005)
    return False


def kill_and_resume(
    launch: str, sets: list[str], out: Path, kills: int = 10, seed: int = 0, startup_kills: float = 0.2
) -> dict:
    """Run ``launch`` uninterrupted in ``out/straight`` and killed ``kills`` times in ``out/killed``;
    returns both fingerprints, whether they are identical and what each kill interrupted.

    Each kill falls, with probability ``startup_kills``, at a random moment of the process's
    startup (imports, the checkpoint, the solvers: before its first step), else at a random moment
    of its training (up to 60 % of the uninterrupted run's time for the steps left)."""
    from qmpc.config import load_config

    out = Path(out).resolve()
    straight, killed = out / "straight", out / "killed"
    steps = load_config(launch, sets).train.steps
    rng = random.Random(seed)

    t0, since = time.perf_counter(), time.time_ns()
    p = _launch(launch, straight, sets, resume=False)
    _wait_until_started(p, straight, since)
    startup = time.perf_counter() - t0
    _finish(p, "the uninterrupted run")
    wall = time.perf_counter() - t0
    per_step = max(wall - startup, 1e-3) / steps

    log: list[dict] = []
    finished = False
    while len(log) < kills:
        before, since = _checkpoint_step(killed), time.time_ns()
        p = _launch(launch, killed, sets, resume=before is not None)
        if rng.random() < startup_kills:
            phase, delay = "startup", rng.uniform(0.0, startup)
            time.sleep(delay)
        else:
            phase, delay = "training", rng.uniform(0.0, 0.6 * (steps - (before or 0)) * per_step)
            if _wait_until_started(p, killed, since):
                time.sleep(delay)
        if p.poll() is None:
            phase = "training" if _started(p, killed, since) else "startup"  # where it really was
            os.kill(p.pid, signal.SIGKILL)
        _, err = p.communicate()
        if p.returncode == 0:  # finished before its kill: nothing left to interrupt
            finished = True
            break
        if p.returncode != -signal.SIGKILL:
            raise RuntimeError(f"launch {len(log) + 1} exited with {p.returncode}: {err.strip()[-2000:]}")
        log.append({"phase": phase, "after_s": round(delay, 3), "from": before, "checkpoint": _checkpoint_step(killed)})
    if not finished:
        p = _launch(launch, killed, sets, resume=_checkpoint_step(killed) is not None)
        _finish(p, "the last resume")

    fp = _fingerprint_module()
    a, b = fp.run_fingerprint(straight), fp.run_fingerprint(killed)
    return {
        "launch": str(launch),
        "sets": sets,
        "steps": steps,
        "uninterrupted_s": round(wall, 2),
        "startup_s": round(startup, 2),
        "kills": log,
        "identical": a == b,
        "differ": sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k)),
        "fingerprint": a,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("launch")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    ap.add_argument("--out", required=True, help="a new directory for the two runs")
    a = ap.parse_args(argv)
    report = kill_and_resume(a.launch, a.set, Path(a.out), a.kills, a.seed)
    print(json.dumps({k: v for k, v in report.items() if k != "fingerprint"}, indent=1))
    if len(report["kills"]) < a.kills:
        print(f"only {len(report['kills'])} of {a.kills} kills: the run finished first (use a longer run)")
    return 0 if report["identical"] and len(report["kills"]) == a.kills else 1


if __name__ == "__main__":
    sys.exit(main())
