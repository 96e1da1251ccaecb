"""Offline-RL peers from d3rlpy, run in their own virtual environment.

d3rlpy 2.8 pins ``gymnasium==1.0.0``, which qmpc's environment cannot share, so the peers live in a
separate venv (:func:`ensure_venv`) and run as a subprocess (``benchmarks/d3rlpy_worker.py``,
:func:`run_peer`). Data go across as an ``.npz`` file in the D4RL layout (:func:`write_npz`), the
results come back as JSON. This module imports only numpy and the standard library (no qmpc, no
d3rlpy), so qmpc's environment can import it.

    from benchmarks.offline_peers import ensure_venv, write_npz, run_peer

    python = ensure_venv()  # once: minutes (network and disk)
    write_npz("data.npz", obs, act, cost, next_obs, terminated)
    res = run_peer(python, "data.npz", "InvertedPendulum-v5", "iql", steps=100_000, eval_every=5_000,
                   seed=0, out="iql-seed0.json")
    res["steps"], res["returns"]  # mean return over the evaluation episodes at each evaluation
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from qmpc.data import atomic_write

WORKER = Path(__file__).resolve().with_name("d3rlpy_worker.py")
DEFAULT_VENV = Path.home() / ".cache" / "qmpc" / "d3rlpy-venv"
REQUIREMENTS: tuple[str, ...] = ("d3rlpy==2.8.1", "gymnasium[mujoco]==1.0.0", "torch==2.13.0")
"""d3rlpy 2.8.1 is the latest 2.8.x; it needs ``torch>=2.5`` and pins ``gymnasium==1.0.0``."""
MARKER = "qmpc-d3rlpy-venv.json"
"""Written into the venv only once the install finished and imports; without it the venv is redone."""
VERSIONED = ("d3rlpy", "torch", "gymnasium", "mujoco", "numpy")
ALGOS = ("bc", "td3plusbc", "iql", "cql", "rebrac")


# --------------------------------------------------------------------------------------
# The venv
# --------------------------------------------------------------------------------------


def ensure_venv(
    path: Path = DEFAULT_VENV, requirements: Sequence[str] = REQUIREMENTS, pip_args: Sequence[str] = ()
) -> Path:
    """The python of a venv at ``path`` with d3rlpy installed (``requirements``); created if missing.

    Idempotent: a marker file (:data:`MARKER`, with the requirements and the installed versions) is
    written last, so a venv without it, or with other requirements, is an interrupted or stale
    install: it is deleted and redone. The venv is built from this interpreter's base Python
    (``sys.executable -m venv``). ``pip_args``: more ``pip install`` arguments, e.g.
    ``("--extra-index-url", "https://download.pytorch.org/whl/cpu")`` where no CPU torch wheel is
    at hand (``torch==2.13.0`` from PyPI alone brings the CUDA libraries). Concurrent callers are
    serialized by a lock file next to the venv. Raises :class:`RuntimeError` when a step fails.
    """
    path = Path(path).expanduser().absolute()
    python = path / "bin" / "python"
    with _locked(path.with_name(path.name + ".lock")):
        if _marker_matches(path, requirements, pip_args) and python.exists():
            return python
        _remove_venv(path)
        _run([sys.executable, "-m", "venv", str(path)], "create the venv")
        pip = [str(python), "-m", "pip", "install", "--no-input", *pip_args, *requirements]
        _run(pip, "pip install " + " ".join(requirements), log=path / "install.log")
        versions = venv_versions(python)
        marker = {"requirements": list(requirements), "pip_args": list(pip_args), "versions": versions}
        marker["installed"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        _atomic_write_text(path / MARKER, json.dumps(marker, indent=1))
    return python


def venv_versions(python: Path) -> dict[str, str]:
    """The installed versions of :data:`VERSIONED` in the venv of ``python``, after checking that
    d3rlpy and the MuJoCo environments import there."""
    code = (
        "import json, importlib.metadata as m, d3rlpy, gymnasium\n"
        "gymnasium.make('InvertedPendulum-v5').close()\n"
        f"print(json.dumps({{k: m.version(k) for k in {VERSIONED!r}}}))"
    )
    out = _run([str(python), "-c", code], "import d3rlpy and gymnasium's MuJoCo environments in the venv")
    return json.loads(out.strip().splitlines()[-1])


def _marker_matches(path: Path, requirements: Sequence[str], pip_args: Sequence[str]) -> bool:
    """Whether the venv at ``path`` holds a finished install of ``requirements`` with ``pip_args``."""
    try:
        marker = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("requirements") == list(requirements) and marker.get("pip_args") == list(pip_args)


def _remove_venv(path: Path) -> None:
    """Delete an unfinished or stale venv at ``path``; refuse a directory that is not a venv."""
    if not path.exists():
        return
    if not path.is_dir() or not ((path / "pyvenv.cfg").exists() or not any(path.iterdir())):
        raise RuntimeError(f"expected a virtual environment (or nothing) at {path}, got something else")
    shutil.rmtree(path)


@contextmanager
def _locked(lock: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock`` (created if missing)."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _run(cmd: list[str], what: str, log: Path | None = None, timeout: float | None = None) -> str:
    """Run ``cmd``; its stdout, or :class:`RuntimeError` with the output's tail when it fails.
    ``log``: also write stdout and stderr there."""
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_clean_env())
    if log is not None:
        log.write_text(p.stdout + p.stderr)
    if p.returncode != 0:
        raise RuntimeError(f"failed to {what} (exit {p.returncode}):\n{_tail(p.stdout + p.stderr)}")
    return p.stdout


def _clean_env(threads: int | None = None) -> dict[str, str]:
    """This process's environment minus what would leak qmpc's Python into the venv's; with
    ``threads``, the BLAS/OpenMP thread counts set to it."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PYTHONNOUSERSITE"] = "1"
    if threads is not None:
        for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[k] = str(threads)
    return env


def _tail(text: str, chars: int = 4000) -> str:
    """The last ``chars`` characters of ``text``."""
    return text if len(text) <= chars else "…" + text[-chars:]


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------


def write_npz(
    path: str | Path,
    obs: np.ndarray,
    act: np.ndarray,
    cost: np.ndarray,
    next_obs: np.ndarray,
    terminated: np.ndarray,
    episode_ends: np.ndarray | None = None,
) -> Path:
    """Write qmpc's transitions as the worker's ``.npz`` (D4RL layout, rewards not costs).

    Inputs, ``N`` transitions in episode order: ``obs``, ``next_obs`` ``(N, obs_dim)``; ``act``
    ``(N, act_dim)``; ``cost`` ``(N,)`` (= −reward); ``terminated`` ``(N,)``, true where the episode
    terminated at that transition; ``episode_ends`` ``(N,)``, true at the last transition of each
    episode (terminated or cut). Without ``episode_ends``, an episode ends where it terminated or
    where ``next_obs[i]`` is not ``obs[i + 1]``. The dataset's last transition always ends one.

    Written (float32): ``observations`` ``(N, obs_dim)``, ``actions`` ``(N, act_dim)``,
    ``rewards = −cost`` ``(N,)``, ``terminals`` ``(N,)`` (1.0 where terminated) and ``timeouts``
    ``(N,)`` (1.0 at episode ends that are not terminations). ``next_obs`` is not written (the D4RL
    layout takes it from the next row), only checked: inside an episode it must be the next ``obs``.
    So d3rlpy skips the last transition of each cut episode (its next observation is unknown).
    Written atomically; raises :class:`ValueError` for inconsistent arrays.
    """
    obs, act, next_obs = (np.asarray(a, np.float64) for a in (obs, act, next_obs))
    cost, term = np.asarray(cost, np.float64), np.asarray(terminated).astype(bool)
    _check_shapes(obs, act, cost, next_obs, term)
    ends = _episode_ends(obs, next_obs, term, episode_ends)
    arrays = {
        "observations": obs,
        "actions": act,
        "rewards": -cost,
        "terminals": term,
        "timeouts": ends & ~term,
    }
    out = Path(path)
    _atomic_write(out, lambda f: np.savez(f, **{k: np.asarray(v, np.float32) for k, v in arrays.items()}))
    return out


def _episode_ends(
    obs: np.ndarray, next_obs: np.ndarray, term: np.ndarray, episode_ends: np.ndarray | None
) -> np.ndarray:
    """``(N,)`` bool, true at each episode's last transition (see :func:`write_npz`);
    :class:`ValueError` where an episode's ``next_obs`` is not its next ``obs``."""
    n = len(term)
    linked = np.isclose(next_obs[:-1], obs[1:], rtol=1e-5, atol=1e-6).all(axis=1)
    if episode_ends is None:
        ends = term | np.append(~linked, True)
    else:
        ends = np.asarray(episode_ends).astype(bool)
        if ends.shape != (n,):
            raise ValueError(f"expected episode_ends of shape ({n},), got {ends.shape}")
        ends = ends | term
    ends[-1] = True
    broken = ~linked & ~ends[:-1]
    if broken.any():
        i = int(np.flatnonzero(broken)[0])
        raise ValueError(f"expected next_obs[i] == obs[i + 1] inside episodes, got {int(broken.sum())} breaks (i={i})")
    return ends


def _check_shapes(obs: np.ndarray, act: np.ndarray, cost: np.ndarray, next_obs: np.ndarray, term: np.ndarray) -> int:
    """The number of transitions; :class:`ValueError` unless the shapes agree and values are finite."""
    n = len(cost)
    if obs.ndim != 2 or act.ndim != 2 or next_obs.shape != obs.shape or cost.shape != (n,) or term.shape != (n,):
        raise ValueError(
            "expected obs, next_obs (N, obs_dim), act (N, act_dim), cost and terminated (N,), got "
            f"{obs.shape}, {next_obs.shape}, {act.shape}, {cost.shape}, {term.shape}"
        )
    if n == 0 or len(obs) != n or len(act) != n:
        raise ValueError(f"expected the same number (>0) of rows everywhere, got {len(obs)}, {len(act)}, {n}")
    if not all(np.isfinite(a).all() for a in (obs, act, cost, next_obs)):
        raise ValueError("expected finite obs, act, cost and next_obs, got NaN/Inf")
    return n


def _atomic_write(path: Path, write) -> None:
    """Call ``write(binary_file)`` on a temporary file next to ``path``, then rename it into place
    (:func:`qmpc.data.atomic_write`)."""

    def to_file(tmp: str) -> None:
        with open(tmp, "wb") as f:
            write(f)

    atomic_write(path, to_file)


def _atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    _atomic_write(path, lambda f: f.write(text.encode()))


# --------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------


def run_peer(
    python: str | Path,
    npz: str | Path,
    env_id: str,
    algo: str,
    steps: int,
    eval_every: int,
    seed: int,
    out: str | Path,
    eval_episodes: int = 10,
    eval_seed: int = 10000,
    timeout: float | None = None,
    threads: int = 1,
    device: str = "cpu",
) -> dict:
    """Train d3rlpy's ``algo`` (one of :data:`ALGOS`) on ``npz`` for ``steps`` gradient steps in the
    venv of ``python`` on the torch ``device`` (``cpu``, ``cuda``, ``cuda:1`` …), evaluating every
    ``eval_every`` steps and at the end; its result JSON (written to ``out``), parsed. Raises
    :class:`RuntimeError` with the worker's stderr tail when it fails or runs past ``timeout``
    seconds."""
    if algo not in ALGOS:
        raise ValueError(f"expected algo in {ALGOS}, got {algo!r}")
    out = Path(out)
    cmd = [str(python), str(WORKER), "--data", str(npz), "--env", env_id, "--algo", algo]
    cmd += ["--steps", str(steps), "--eval-every", str(eval_every), "--eval-episodes", str(eval_episodes)]
    cmd += ["--eval-seed", str(eval_seed), "--seed", str(seed), "--out", str(out), "--threads", str(threads)]
    cmd += ["--device", device]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_clean_env(threads))
    except subprocess.TimeoutExpired as e:
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr or ""
        raise RuntimeError(f"d3rlpy worker ({algo}, seed {seed}) ran past {timeout} s:\n{_tail(err)}") from None
    if p.returncode != 0:
        raise RuntimeError(f"d3rlpy worker ({algo}, seed {seed}) failed (exit {p.returncode}):\n{_tail(p.stderr)}")
    try:
        return json.loads(out.read_text())
    except (OSError, ValueError) as e:
        raise RuntimeError(f"d3rlpy worker ({algo}, seed {seed}) wrote no readable {out}: {e}") from None
