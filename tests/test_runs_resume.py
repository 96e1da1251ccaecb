"""Issue 9, item 5: a locked run directory, resume overrides, and logs that a resume does not change
(metrics.csv rows, TensorBoard scalars), stale temp files cleaned up, older checkpoints resumable."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from qmpc.checkpoint import load_checkpoint, save_checkpoint
from qmpc.cli import main
from qmpc.config import config_from_dict, config_to_toml, load_config
from qmpc.errors import ConfigError, QmpcError
from qmpc.trainer import read_metrics, train


def _cfg(run_dir, **train_kw):
    return config_from_dict(
        {
            "seed": 2,
            "run_dir": str(run_dir),
            "network": {"arch": "QuadraticQ", "hidden": [8]},
            "train": {
                "mode": "online",
                "steps": 40,
                "batch_size": 8,
                "learning_starts": 5,
                "eval_every": 20,
                "eval_episodes": 1,
                "checkpoint_every": 15,
                "log_every": 10,
                **train_kw,
            },
        }
    )


def _launch(tmp_path, run_dir, **train_kw) -> Path:
    f = tmp_path / f"{Path(run_dir).name}.toml"
    f.write_text(config_to_toml(_cfg(run_dir, **train_kw)))
    return f


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _rows(run_dir):
    """metrics.csv as {(step, tag): value}, wall-clock timings left out."""
    return {
        (int(s), k): v
        for k, (steps, vals) in read_metrics(run_dir / "metrics.csv").items()
        if not k.endswith("_ms")
        for s, v in zip(steps, vals, strict=True)
    }


# ---------------------------------------------------------------------------------------
# The lock
# ---------------------------------------------------------------------------------------


def test_second_run_on_a_locked_dir_is_refused(tmp_path, capsys):
    run = tmp_path / "r"
    run.mkdir()
    owner = {"pid": __import__("os").getpid(), "host": socket.gethostname()}  # a live process
    (run / ".lock").write_text(json.dumps(owner))
    with pytest.raises(QmpcError, match=f"pid {owner['pid']}"):
        train(_cfg(run, steps=3), progress=False)
    assert not (run / "config.toml").exists() and not (run / "metrics.csv").exists()
    assert main(["train", str(_launch(tmp_path, run, steps=3)), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "lock" in err and "\n" not in err
    assert json.loads((run / ".lock").read_text()) == owner  # the other run's lock is left alone


def test_two_processes_on_one_run_dir(tmp_path):
    """A real second ``qmpc train`` while the first holds the directory: refused, exit 2."""
    run = tmp_path / "r"
    launch = _launch(tmp_path, run, steps=3000, eval_every=3000, checkpoint_every=3000)
    first = subprocess.Popen([sys.executable, "-m", "qmpc.cli", "train", str(launch), "--no-progress"])
    try:
        for _ in range(600):
            if (run / ".lock").exists():
                break
            first.poll()
            assert first.returncode is None
            __import__("time").sleep(0.05)
        second = subprocess.run(
            [sys.executable, "-m", "qmpc.cli", "train", str(launch), "--no-progress"], capture_output=True, text=True
        )
        assert second.returncode == 2, second.stderr
        assert f"pid {first.pid}" in second.stderr
    finally:
        first.kill()
        first.wait()


def test_stale_lock_is_taken_over_and_released(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / ".lock").write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname()}))
    assert train(_cfg(run, steps=3), progress=False).steps == 3
    assert not (run / ".lock").exists()


def test_lock_released_on_error(tmp_path):
    run = tmp_path / "r"
    for _ in range(2):  # the second attempt meets the same error, not a lock
        with pytest.raises(ConfigError, match=r"train\.dataset"):
            train(_cfg(run, mode="offline"), progress=False)
        assert not (run / ".lock").exists()


# ---------------------------------------------------------------------------------------
# Resume
# ---------------------------------------------------------------------------------------


def test_resume_honours_safe_overrides(tmp_path):
    run = tmp_path / "r"
    launch = _launch(tmp_path, run, steps=15)
    assert main(["train", str(launch), "--no-progress"]) == 0
    argv = ["train", str(launch), "--resume", "--no-progress", "--set", "train.steps=25", "--set", "train.log_every=5"]
    assert main(argv) == 0
    ckpt = load_checkpoint(run / "checkpoint.pt")
    assert ckpt["loop"]["step"] == 25 and ckpt["config"]["train"]["steps"] == 25
    saved = load_config(run / "config.toml")
    assert saved.train.steps == 25 and saved.train.log_every == 5
    assert 20 in read_metrics(run / "metrics.csv")["train/td_loss"][0]  # the new cadence


@pytest.mark.parametrize("override", ["train.lr=0.5", "network.hidden=[4]", "seed=7"])
def test_resume_refuses_other_overrides(tmp_path, capsys, override):
    run = tmp_path / "r"
    launch = _launch(tmp_path, run, steps=15)
    assert main(["train", str(launch), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["train", str(launch), "--resume", "--no-progress", "--set", override]) == 2
    err = capsys.readouterr().err.strip()
    assert override.split("=")[0] in err and "\n" not in err
    assert load_checkpoint(run / "checkpoint.pt")["loop"]["step"] == 15


def test_resume_below_the_checkpoint_step_is_refused(tmp_path):
    run = tmp_path / "r"
    train(_cfg(run, steps=15), progress=False)
    with pytest.raises(ConfigError, match=r"train\.steps"):
        train(_cfg(run), resume=True, progress=False, overrides=["train.steps=10"])


def test_metrics_across_a_resume_equal_an_uninterrupted_run(tmp_path):
    """Checkpoints at 15 and 30 fall inside logging windows (10, 20, …): the window's
    accumulator must survive the resume. The TensorBoard scalars of step 15's window too."""
    straight = train(_cfg(tmp_path / "a"), progress=False)
    train(_cfg(tmp_path / "b"), progress=False, stop_at=25)  # killed at 25; checkpoint at 15
    resumed = train(_cfg(tmp_path / "b"), resume=True, progress=False)
    assert resumed.steps == straight.steps == 40
    a, b = _rows(tmp_path / "a"), _rows(tmp_path / "b")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-6, err_msg=str(k))


def test_stale_temp_files_are_removed(tmp_path):
    """What atomic_write leaves when a run is killed mid-write goes when the next run starts or resumes."""
    run = tmp_path / "r"
    run.mkdir()
    torn = [run / ".checkpoint.pt.abc123", run / ".policy.pt.x1y2z3", run / ".metrics.csv.q9w8e7"]
    keep = run / "notes.txt"
    for f in (*torn, keep):
        f.write_bytes(b"torn")
    train(_cfg(run, steps=3), progress=False)
    assert not any(f.exists() for f in torn) and keep.exists()
    torn[0].write_bytes(b"torn")
    train(_cfg(run, steps=3), resume=True, progress=False)
    assert not torn[0].exists()


def test_tensorboard_keeps_the_checkpoint_step(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = dict(checkpoint_every=10, steps=30)  # the checkpoint at 20 shares its step with a log row
    train(_cfg(tmp_path / "a", **cfg), progress=False)
    train(_cfg(tmp_path / "b", **cfg), progress=False, stop_at=25)
    train(_cfg(tmp_path / "b", **cfg), resume=True, progress=False)
    steps = {}
    for run in ("a", "b"):
        ea = EventAccumulator(str(tmp_path / run / "tb"))
        ea.Reload()
        steps[run] = sorted(e.step for e in ea.Scalars("train/td_loss"))
    assert steps["b"] == steps["a"] == [10, 20, 30]


@pytest.mark.parametrize("where", ["q_target", "q"])
def test_resume_refuses_a_nan_buffer(tmp_path, where):
    """The resume path loads Q and the target network's state dicts directly: buffers are checked too."""
    run = tmp_path / "r"
    train(_cfg(run, steps=40), progress=False, stop_at=15)
    ckpt = load_checkpoint(run / "checkpoint.pt")
    ckpt[where]["obs_transform"] = torch.full_like(ckpt[where]["obs_transform"], float("nan"))
    save_checkpoint(run / "checkpoint.pt", ckpt)
    with pytest.raises(QmpcError, match=rf"NaN/Inf in \['{where}\.obs_transform'") as e:
        train(_cfg(run), resume=True, progress=False)
    assert str(run / "checkpoint.pt") in str(e.value)


def test_older_training_checkpoint_resumes(tmp_path):
    """A checkpoint of the format before weights-only loading (numpy arrays, no accumulator)."""
    run = tmp_path / "r"
    train(_cfg(run, steps=40), progress=False, stop_at=15)
    ckpt = load_checkpoint(run / "checkpoint.pt")
    for k in ("obs", "act", "cost", "next_obs", "terminated"):
        ckpt["buffer"][k] = ckpt["buffer"][k].numpy()
    ckpt["env_state"]["mujoco"] = {
        k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in ckpt["env_state"]["mujoco"].items()
    }
    ckpt["loop"]["obs"] = ckpt["loop"]["obs"].numpy()
    del ckpt["loop"]["acc"], ckpt["cost_scale"]
    save_checkpoint(run / "checkpoint.pt", ckpt)
    assert torch.serialization.get_unsafe_globals_in_checkpoint(str(run / "checkpoint.pt"))  # numpy inside
    assert train(_cfg(run), resume=True, progress=False).steps == 40
