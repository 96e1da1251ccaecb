"""Issue 20: a resumed run continues bit for bit, for the PICNN launch files too (the actor's warm
start is in the checkpoint), however it was stopped (at a checkpoint, between two, by SIGKILL);
and ``--resume`` with the launch file of another run is refused instead of continuing that run."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from qmpc.bridge import ArgminLayer
from qmpc.checkpoint import load_checkpoint, save_checkpoint
from qmpc.cli import main
from qmpc.config import config_to_toml, load_config
from qmpc.errors import ConfigError, InputError
from qmpc.networks import build_network
from qmpc.trainer import read_metrics, train

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "train.steps=60",
    "train.learning_starts=10",
    "train.batch_size=16",
    "train.eval_every=30",
    "train.eval_episodes=1",
    "train.checkpoint_every=15",
    "train.log_every=10",
    "train.buffer_size=1000",
    "model.batch_size=32",
    "model.updates_per_step=1",
]
"""A tiny run of the InvertedPendulum-v5 launch file (PICNN, warm-started actor, learned model):
checkpoints at 15, 30, 45 and 60, all after learning starts."""


def _ip(run_dir, *sets):
    return load_config(ROOT / "launch" / "inverted_pendulum.toml", [f"run_dir={run_dir}", *TINY, *sets])


def differences(a, b, path="") -> list[str]:
    """Where two checkpoints differ (nested dicts, lists, tensors, arrays, numbers), bit for bit;
    wall-clock times (``wall_s``, ``…_ms``) and the run directory left out."""
    if path.endswith(("/wall_s", "_ms", "/run_dir")):
        return []
    if isinstance(a, dict) and isinstance(b, dict):
        keys = sorted(a.keys() | b.keys(), key=str)
        return [d for k in keys for d in differences(a.get(k), b.get(k), f"{path}/{k}")]
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        if len(a) != len(b):
            return [f"{path} (length {len(a)} vs {len(b)})"]
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in differences(x, y, f"{path}/{i}")]
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        same = a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
        return [] if same else [path]
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        return [] if a.shape == b.shape and np.array_equal(a, b) else [path]
    return [] if type(a) is type(b) and a == b else [path]


def assert_same_run(a: Path, b: Path) -> None:
    """Two run directories hold the same final checkpoint (weights, target, optimisers, model,
    buffer, RNGs, loop, warm starts) and the same metrics, wall times aside."""
    ca, cb = (load_checkpoint(d / "checkpoint.pt") for d in (a, b))
    differ = differences(ca, cb)
    assert not differ, f"{len(differ)} entries of the checkpoints differ: {differ[:20]}"
    ma, mb = read_metrics(a / "metrics.csv"), read_metrics(b / "metrics.csv")
    assert ma.keys() == mb.keys()
    for k in ma:
        np.testing.assert_array_equal(ma[k][0], mb[k][0], err_msg=k)
        if not k.endswith("_ms"):
            np.testing.assert_array_equal(ma[k][1], mb[k][1], err_msg=k)


# ---------------------------------------------------------------------------------------
# The layer's warm start, saved and restored
# ---------------------------------------------------------------------------------------


def test_a_layer_continues_from_a_loaded_warm_start():
    """A fresh layer given another's warm start solves its next state exactly as that one does
    (which differs from a cold start in the last bits); without it (None) it starts cold, and a
    warm start of another problem's size is refused."""
    q = build_network("PICNN", 4, 2, [8], action_curvature=1.0).double()
    x1 = torch.tensor([[0.1, -0.2, 0.3, 0.0]], dtype=torch.float64)
    x2 = torch.tensor([[0.12, -0.18, 0.31, 0.01]], dtype=torch.float64)
    kw = dict(grad_mode="none", warm_start=True)
    a, b, cold = (ArgminLayer(q, -3.0, 3.0, **kw) for _ in range(3))
    assert a.warm_start_state() is None
    a(x1)
    saved = a.warm_start_state()
    assert saved["plan"].shape == (1, 2) and saved["lam_g"].shape == (1, 0)
    b.load_warm_start_state({k: torch.from_numpy(v) for k, v in saved.items()})  # as a checkpoint holds it
    ua, ub, uc = a(x2)[0], b(x2)[0], cold(x2)[0]
    assert torch.equal(ua, ub) and not torch.equal(ua, uc)
    b.load_warm_start_state(None)
    assert torch.equal(b(x2)[0], uc)
    with pytest.raises(InputError, match="warm start of shapes"):
        b.load_warm_start_state({"plan": np.zeros((1, 3)), "lam_x": np.zeros((1, 3)), "lam_g": np.zeros((1, 0))})


# ---------------------------------------------------------------------------------------
# Bit-identical resumes of a PICNN run
# ---------------------------------------------------------------------------------------


def test_picnn_run_resumes_bit_identical(tmp_path):
    """Stopped at 37 (a kill between the checkpoints of 30 and 45: the resume goes back to 30),
    resumed and stopped at 45 (a checkpoint step), resumed to the end: the same run as the
    uninterrupted one. Before the actor's warm start was saved, its first solve after each resume
    was cold and the weights drifted apart."""
    straight = train(_ip(tmp_path / "a"), progress=False)
    b = tmp_path / "b"
    assert train(_ip(b), progress=False, stop_at=37).steps == 37
    assert load_checkpoint(b / "checkpoint.pt")["loop"]["step"] == 30
    assert train(_ip(b), resume=True, progress=False, stop_at=45).steps == 45
    assert load_checkpoint(b / "checkpoint.pt")["loop"]["step"] == 45
    resumed = train(_ip(b), resume=True, progress=False)
    assert resumed.steps == straight.steps == 60
    assert resumed.eval_returns == straight.eval_returns
    assert_same_run(tmp_path / "a", b)


def test_checkpoint_without_warm_starts_resumes_cold(tmp_path):
    """A checkpoint written before the warm starts were saved still resumes (cold, as before)."""
    run = tmp_path / "r"
    train(_ip(run), progress=False, stop_at=30)
    ckpt = load_checkpoint(run / "checkpoint.pt")
    assert ckpt["warm_starts"]["actor"] is not None
    del ckpt["warm_starts"]
    save_checkpoint(run / "checkpoint.pt", ckpt)
    assert train(_ip(run), resume=True, progress=False).steps == 60


def test_killed_and_resumed_qmpc_train_ends_bit_identical(tmp_path):
    """``qmpc train`` killed with SIGKILL at 3 random moments of its training and resumed with
    ``--resume`` each time ends with the fingerprint of an uninterrupted run
    (``tests/kill_resume.py``, which runs the full check of 10 kills and more)."""
    spec = importlib.util.spec_from_file_location("kill_resume", ROOT / "tests" / "kill_resume.py")
    kill_resume = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kill_resume)
    sets = [*TINY, "train.steps=80", "train.checkpoint_every=10", "train.eval_every=40"]
    launch = str(ROOT / "launch" / "inverted_pendulum.toml")
    report = kill_resume.kill_and_resume(launch, sets, tmp_path, kills=3, seed=0, startup_kills=0.0)
    assert len(report["kills"]) == 3, report["kills"]
    assert report["identical"], f"the killed run differs in {report['differ']}: {report['kills']}"


# ---------------------------------------------------------------------------------------
# --resume with the launch file of another run
# ---------------------------------------------------------------------------------------


def _launch_file(path: Path, launch: str, *sets: str) -> Path:
    path.write_text(config_to_toml(load_config(ROOT / "launch" / launch, list(sets))))
    return path


def _first_run(tmp_path) -> tuple[Path, Path]:
    run = tmp_path / "run"
    pm = _launch_file(tmp_path / "pm.toml", "point_mass.toml", f"run_dir={run}", *TINY[:2], "train.steps=15")
    assert main(["train", str(pm), "--no-progress"]) == 0
    return run, pm


def test_resume_with_another_tasks_launch_file_is_refused(tmp_path, capsys):
    """``qmpc train OTHER.toml --resume`` on a run of another task: before, the run went on with
    its own config and the launch file was silently ignored; now a one-line error names the keys
    that differ, with both values, and the run is left as it was."""
    run, _ = _first_run(tmp_path)
    other = _launch_file(tmp_path / "ip.toml", "inverted_pendulum.toml", f"run_dir={run}", "train.steps=30")
    capsys.readouterr()
    assert main(["train", str(other), "--resume", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err, err
    assert 'env.id = "InvertedPendulum-v5"' in err and '"qmpc/PointMass-v0"' in err, err
    assert 'network.arch = "PICNN"' in err and "train.target" in err, err
    assert "train.steps =" not in err  # a resumable key: not a difference
    assert load_checkpoint(run / "checkpoint.pt")["loop"]["step"] == 15
    with pytest.raises(ConfigError, match=r"train\.lr = 0\.5 in the launch file"):  # the Python API too
        train(load_config(tmp_path / "pm.toml", ["train.lr=0.5", "train.steps=30"]), resume=True, progress=False)


def test_resume_with_its_own_launch_file_and_resumable_changes(tmp_path):
    """What resuming a run needs keeps working: its launch file with ``--set`` of the resumable
    keys; a launch file that differs from the run in resumable keys only (e.g. the run was
    extended by ``--set train.steps`` and resumed later without it): the run's values are kept."""
    run, pm = _first_run(tmp_path)
    assert main(["train", str(pm), "--resume", "--no-progress", "--set", "train.steps=20"]) == 0
    assert load_checkpoint(run / "checkpoint.pt")["loop"]["step"] == 20
    edited = _launch_file(tmp_path / "pm2.toml", "point_mass.toml", f"run_dir={run}", *TINY[:2], "train.log_every=7")
    assert main(["train", str(edited), "--resume", "--no-progress", "--set", "train.steps=25"]) == 0
    ckpt = load_checkpoint(run / "checkpoint.pt")
    assert ckpt["loop"]["step"] == 25 and ckpt["config"]["train"]["log_every"] == 100  # the run's
