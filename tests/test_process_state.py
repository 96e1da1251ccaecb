"""Issue 17, item 2: library code leaves process-wide state alone: the environment variables
(``MUJOCO_GL``), matplotlib's backend and the working directory."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEPS = ["numpy", "torch", "casadi", "mujoco", "gymnasium", "matplotlib", "minari", "tqdm", "imageio"]
"""Third-party packages qmpc imports, imported first: some set variables of their own at import
(gymnasium sets ``PYGAME_HIDE_SUPPORT_PROMPT``), which is not qmpc's doing."""


def _python(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter on a headless machine whose user did not set ``MUJOCO_GL``."""
    env = {k: v for k, v in os.environ.items() if k not in ("MUJOCO_GL", "DISPLAY", "PYOPENGL_PLATFORM")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path, timeout=300
    )


def test_importing_qmpc_leaves_the_environment_alone(tmp_path):
    """``import qmpc`` used to set ``MUJOCO_GL=egl`` for the whole process."""
    code = f"""
import importlib, json, os, pkgutil
for m in {DEPS!r}:
    importlib.import_module(m)
before = dict(os.environ)
import qmpc
for m in pkgutil.walk_packages(qmpc.__path__, "qmpc."):
    importlib.import_module(m.name)
after = dict(os.environ)
changed = {{k: [before.get(k), after.get(k)] for k in before.keys() | after.keys() if before.get(k) != after.get(k)}}
print(json.dumps(changed))
"""
    r = _python(code, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.splitlines()[-1]) == {}, "importing qmpc changed os.environ"


def test_videos_render_headless_without_mujoco_gl(tmp_path):
    """Rendering picks an offscreen OpenGL backend itself (qmpc's own task through gymnasium's
    renderer, and a gymnasium task), and gives ``MUJOCO_GL`` back as it found it."""
    code = """
import os
import numpy as np
from qmpc.env import make_env
from qmpc.runner import run_episodes, write_video

class Zero:
    def __init__(self, low, high):
        self.low, self.high = low, high
        self.reset()
    def reset(self):
        self.stats = {"steps": 0, "failed": 0, "overrun": 0, "fallback": 0}
    def act(self, obs):
        return np.zeros_like(self.low), {"solve_ms": 0.0}

for i, env_id in enumerate(["qmpc/PointMass-v0", "InvertedPendulum-v5"]):
    env = make_env(env_id, seed=0, render_mode="rgb_array")
    ctrl = Zero(env.action_space.low.astype(float), env.action_space.high.astype(float))
    eps, frames = run_episodes(ctrl, env, 1, render=True)
    assert "MUJOCO_GL" not in os.environ, os.environ["MUJOCO_GL"]
    assert len(frames) == eps[0].length and frames[0].ndim == 3 and np.std(frames[0]) > 0, env_id
    path = write_video(frames[:20], f"v{i}.mp4", fps=20)
    print(env_id, path.stat().st_size)
"""
    r = _python(code, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    for i in range(2):
        assert (tmp_path / f"v{i}.mp4").stat().st_size > 1000


def test_plots_leave_the_matplotlib_backend_alone(tmp_path):
    """``plot_rollout`` and ``plot_curves`` used to call ``matplotlib.use("Agg")``."""
    import matplotlib

    from qmpc.runner import Episode, plot_rollout
    from qmpc.sweep import Trial, TrialOutcome, plot_curves

    old = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        T = 30
        ep = Episode(-3.0, T, np.zeros((T + 1, 4)), np.zeros((T, 2)), np.ones(T), np.ones(T), 0, 0)
        r = plot_rollout(ep, np.array([-1.0, -np.inf]), np.array([1.0, 2.0]), tmp_path / "r.png", title="t")
        assert matplotlib.get_backend() == "svg"
        outcomes = [
            TrialOutcome(Trial(f"seed{s}", s, {}, tmp_path / f"seed{s}"), [100, 200], [1.0 + s, 2.0], 200, 1.0, 0.0)
            for s in (0, 1)
        ]
        c = plot_curves(outcomes, tmp_path / "c.png", title="t")
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(old)
    for p in (r, c):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sweep_trial_keeps_the_working_directory(tmp_path, monkeypatch):
    """``qmpc_trial`` used to ``os.chdir`` to where the sweep was planned (for relative paths in
    the config); the paths are made absolute when the trials are planned instead."""
    import qmpc.trainer
    from qmpc.sweep import plan_trials, qmpc_trial

    planned, elsewhere = tmp_path / "planned", tmp_path / "ray-trial-dir"
    planned.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(planned)
    launch = ROOT / "launch" / "point_mass_offline.toml"  # train.dataset = "data/point-mass-random", relative
    (trial,) = plan_trials(launch, [0], [], [], "sweep")
    seen = {}

    def fake_train(cfg, resume=False, progress=True, overrides=(), **kw):
        seen.update(cwd=Path.cwd(), dataset=cfg.train.dataset, run_dir=cfg.run_dir, overrides=list(overrides))
        return SimpleNamespace(eval_steps=[1], eval_returns=[0.0], steps=1, seconds=0.0, fail_frac=0.0)

    monkeypatch.setattr(qmpc.trainer, "train", fake_train)
    monkeypatch.chdir(elsewhere)  # Ray runs each trial in a directory of its own
    qmpc_trial(trial)
    assert Path.cwd().resolve() == elsewhere.resolve(), "the trial changed the process's working directory"
    assert seen["cwd"].resolve() == elsewhere.resolve()
    assert Path(seen["dataset"]) == planned.resolve() / "data" / "point-mass-random"
    assert Path(seen["run_dir"]) == planned.resolve() / "sweep" / "seed0"

    # resumed from its checkpoint: the same absolute paths, so the resume check accepts them
    (trial.run_dir / "checkpoint.pt").parent.mkdir(parents=True)
    (trial.run_dir / "checkpoint.pt").write_bytes(b"")
    qmpc_trial(trial)
    assert f'train.dataset="{planned.resolve() / "data" / "point-mass-random"}"' in seen["overrides"]
    assert Path.cwd().resolve() == elsewhere.resolve()
