"""Issue 9, items 3, 4 (checkpoint tensors) and 5 (one-line errors): checkpoints that cannot run
code, that are finite everywhere and whose spec is checked; config, CLI and output-path errors."""

import io
import json
import os
import zipfile
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

from qmpc.checkpoint import (
    FORMAT,
    CheckpointError,
    dynamics_from_checkpoint,
    load_checkpoint,
    network_from_checkpoint,
    save_checkpoint,
)
from qmpc.cli import main
from qmpc.config import config_from_dict, config_to_toml, load_config
from qmpc.controller import Controller
from qmpc.data import collect, load_minari
from qmpc.env import make_env
from qmpc.errors import ConfigError, InputError, QmpcError
from qmpc.networks import build_network

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "models").glob("*.pt"))


class Evil:
    """A pickle payload: unpickling it runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _policy(seed=0) -> dict:
    """A valid point-mass policy checkpoint (tiny QuadraticQ), as a dict."""
    env = make_env("qmpc/PointMass-v0")
    low, high = env.action_space.low.tolist(), env.action_space.high.tolist()
    torch.manual_seed(seed)
    net = {"arch": "QuadraticQ", "hidden": [8], "activation": "tanh"}
    q = build_network("QuadraticQ", 4, 2, hidden=[8], activation="tanh")
    spec = {"env_id": "qmpc/PointMass-v0", "obs_dim": 4, "act_dim": 2, "low": low, "high": high}
    return {"spec": spec, "network": net, "gamma": 0.9, "q": q.state_dict()}


def _write(path: Path, payload: dict) -> Path:
    save_checkpoint(path, payload)
    return path


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("qmpc ") and "\n" not in err and "Traceback" not in err, err
    return err


# ---------------------------------------------------------------------------------------
# Item 3: checkpoints never run code
# ---------------------------------------------------------------------------------------


@pytest.fixture
def evil(tmp_path):
    """(path of a checkpoint that is valid but for one extra key holding the payload, marker)."""
    marker = tmp_path / "PWNED"
    return _write(tmp_path / "evil.pt", {**_policy(), "extra": Evil(marker)}), marker


def test_load_checkpoint_refuses_code(evil, tmp_path):
    path, marker = evil
    with pytest.raises(CheckpointError, match="contains disallowed objects") as e:
        load_checkpoint(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    whole = tmp_path / "whole.pt"  # the whole pickle is the payload
    torch.save(Evil(marker), whole)
    with pytest.raises(CheckpointError, match="disallowed objects"):
        load_checkpoint(whole)
    assert not marker.exists()


def test_controller_from_checkpoint_refuses_code(evil):
    path, marker = evil
    with pytest.raises(CheckpointError, match="disallowed objects"):
        Controller.from_checkpoint(path)
    assert not marker.exists()


def test_cli_run_refuses_code(evil, capsys):
    path, marker = evil
    rc = main(["run", str(path), "--episodes", "1", "--budget-ms", "0"])
    assert not marker.exists()
    assert rc == 2 and "disallowed objects" in _one_line_error(capsys)


def test_cli_collect_policy_refuses_code(evil, tmp_path, capsys):
    path, marker = evil
    argv = [
        "collect",
        "--env",
        "qmpc/PointMass-v0",
        "--steps",
        "5",
        "--policy",
        str(path),
        "--out",
        str(tmp_path / "d"),
    ]
    rc = main(argv)
    assert not marker.exists()
    assert rc == 2 and "disallowed objects" in _one_line_error(capsys)


def test_cli_train_resume_refuses_code(evil, tmp_path, capsys):
    marker = evil[1]
    run = tmp_path / "run"
    run.mkdir()
    ckpt = _policy()
    ckpt["config"] = {"run_dir": str(run), "extra_payload": Evil(marker)}
    _write(run / "checkpoint.pt", ckpt)
    launch = tmp_path / "l.toml"
    launch.write_text(config_to_toml(config_from_dict({"run_dir": str(run), "train": {"steps": 5}})))
    rc = main(["train", str(launch), "--resume", "--no-progress"])
    assert not marker.exists()
    assert rc == 2 and "disallowed objects" in _one_line_error(capsys)


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_models_load_weights_only(path):
    """The shipped checkpoints hold nothing but tensors and plain values: no allow-list needed."""
    assert torch.serialization.get_unsafe_globals_in_checkpoint(str(path)) == []
    ckpt = load_checkpoint(path)
    network_from_checkpoint(ckpt)
    dynamics_from_checkpoint(ckpt)


def test_older_checkpoints_with_numpy_arrays_still_load(tmp_path):
    """Training checkpoints written before weights-only loading held float numpy arrays."""
    ckpt = {**_policy(), "buffer": {"obs": np.zeros((3, 4), np.float32), "cost": np.ones(3, np.float64)}}
    ckpt["loop"] = {"obs": np.arange(4.0)}
    got = load_checkpoint(_write(tmp_path / "old.pt", ckpt))
    np.testing.assert_array_equal(got["loop"]["obs"], np.arange(4.0))


# ---------------------------------------------------------------------------------------
# Item 4: every tensor finite, damaged files are CheckpointErrors
# ---------------------------------------------------------------------------------------


def test_nan_buffer_is_refused(tmp_path, capsys):
    ckpt = _policy()
    ckpt["q"]["obs_transform"] = torch.full_like(ckpt["q"]["obs_transform"], float("nan"))
    with pytest.raises(CheckpointError, match="obs_transform"):
        network_from_checkpoint(ckpt)  # in memory
    path = _write(tmp_path / "nan.pt", ckpt)
    with pytest.raises(CheckpointError, match="NaN/Inf"):
        load_checkpoint(path)
    assert main(["run", str(path), "--episodes", "1", "--budget-ms", "0"]) == 2
    assert "NaN/Inf" in _one_line_error(capsys)


def test_inf_anywhere_is_refused(tmp_path):
    ckpt = {**_policy(), "q_target": _policy()["q"]}
    ckpt["q_target"]["obs_shift"] = torch.tensor([0.0, float("inf"), 0.0, 0.0], dtype=torch.float64)
    with pytest.raises(CheckpointError, match=r"q_target\.obs_shift"):
        load_checkpoint(_write(tmp_path / "inf.pt", ckpt))


def test_nan_written_into_the_file_is_refused(tmp_path):
    """A damaged float inside the archive (torch does not check the records' CRC) is caught: by
    the checkpoint's checksum since issue 20 (by the finiteness check before)."""
    ckpt = _policy()
    ckpt["q"]["obs_shift"] = torch.full((4,), 1234.5, dtype=torch.float64)
    raw = (_write(tmp_path / "ok.pt", ckpt)).read_bytes()
    needle = np.float64(1234.5).tobytes()
    bad = raw.replace(needle, np.float64(np.nan).tobytes(), 1)
    assert bad != raw
    (tmp_path / "bad.pt").write_bytes(bad)
    with pytest.raises(CheckpointError, match="checksum"):
        network_from_checkpoint(load_checkpoint(tmp_path / "bad.pt"))


def test_flipped_bytes_are_checkpoint_errors(tmp_path):
    """Any flipped byte is a CheckpointError, never another exception (before issue 20's checksum,
    a flipped byte in a weight loaded)."""
    path = _write(tmp_path / "ok.pt", _policy())
    raw = path.read_bytes()
    names = zipfile.ZipFile(io.BytesIO(raw)).namelist()
    assert any(n.endswith("data.pkl") for n in names)
    kinds = set()
    for i in range(0, len(raw), 3):
        b = bytearray(raw)
        b[i] ^= 0x20
        path.write_bytes(bytes(b))
        try:
            network_from_checkpoint(load_checkpoint(path))
            kinds.add("loaded")
        except CheckpointError:
            kinds.add("refused")
    assert kinds == {"refused"}


def test_spec_is_validated(tmp_path, capsys):
    for spec, match in (
        ({"obs_dim": 4, "act_dim": 2, "low": [-1, -1], "high": [1, 1]}, "spec.env_id"),
        ({"env_id": "qmpc/PointMass-v0", "obs_dim": 4, "act_dim": "2", "low": [-1, -1], "high": [1, 1]}, "act_dim"),
        ({"env_id": "qmpc/PointMass-v0", "obs_dim": 4, "act_dim": 2, "low": [-1], "high": [1, 1]}, "spec.low"),
        ({"env_id": "qmpc/PointMass-v0", "obs_dim": 4, "act_dim": 2, "low": [1, 1], "high": [-1, 1]}, "low <= high"),
    ):
        with pytest.raises(CheckpointError, match=match):
            load_checkpoint(_write(tmp_path / "s.pt", {**_policy(), "spec": spec}))
    inf = float("inf")
    spec = {**_policy()["spec"], "low": [inf, -1.0], "high": [inf, 1.0]}
    path = _write(tmp_path / "inf.pt", {**_policy(), "spec": spec})
    with pytest.raises(CheckpointError, match="finite action bounds where low = high"):
        load_checkpoint(path)
    spec = {k: v for k, v in _policy()["spec"].items() if k != "env_id"}
    path = _write(tmp_path / "noid.pt", {**_policy(), "spec": spec})
    assert main(["run", str(path), "--episodes", "1"]) == 2
    assert "spec.env_id" in _one_line_error(capsys)


class _InfBoxEnv(gym.Env):
    observation_space = gym.spaces.Box(-1.0, 1.0, (2,))
    action_space = gym.spaces.Box(np.inf, np.inf, (1,))

    def __init__(self, render_mode=None):
        self.render_mode = render_mode


def test_env_with_infinite_equal_bounds_is_refused():
    if "qmpc-test/InfBounds-v0" not in gym.registry:
        gym.register("qmpc-test/InfBounds-v0", entry_point=_InfBoxEnv)
    with pytest.raises(ConfigError, match="finite action bounds where low = high"):
        make_env("qmpc-test/InfBounds-v0")


def test_training_checkpoint_is_weights_only_and_carries_cost_scale(tmp_path):
    from qmpc.trainer import train

    cfg = config_from_dict(
        {
            "seed": 1,
            "run_dir": str(tmp_path / "r"),
            "network": {"arch": "QuadraticQ", "hidden": [8]},
            "train": {"steps": 12, "batch_size": 8, "learning_starts": 5, "eval_every": 12, "eval_episodes": 1},
            "model": {"learn": True, "hidden": [8]},
        }
    )
    cfg.train.cost_scale = 0.5
    train(cfg, progress=False)
    for name in ("checkpoint.pt", "policy.pt"):
        path = tmp_path / "r" / name
        assert torch.serialization.get_unsafe_globals_in_checkpoint(str(path)) == []
        assert load_checkpoint(path)["cost_scale"] == 0.5


# ---------------------------------------------------------------------------------------
# Item 5: one-line errors for configs, CLI options, output paths and datasets
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.lr=nan", "train.lr"),
        ("train.lr=inf", "train.lr"),
        ("train.gamma=nan", "train.gamma"),
        ("solver.tol=inf", "solver.tol"),
        ("network.action_curvature=inf", "network.action_curvature"),
        ("train.exploration_noise=nan", "train.exploration_noise"),
        ("network.hidden=[0]", r"network.hidden\[0\]"),
        ("model.hidden=[8, -1]", r"model.hidden\[1\]"),
    ],
)
def test_config_values_are_finite_and_widths_positive(tmp_path, override, key):
    f = tmp_path / "l.toml"
    f.write_text(config_to_toml(config_from_dict({})))
    with pytest.raises(ConfigError, match=key):
        load_config(f, [override])


def test_cli_train_bad_value_is_one_line(tmp_path, capsys):
    f = tmp_path / "l.toml"
    f.write_text(config_to_toml(config_from_dict({"run_dir": str(tmp_path / "r")})))
    assert main(["train", str(f), "--set", "train.lr=nan", "--no-progress"]) == 2
    assert "train.lr" in _one_line_error(capsys)


@pytest.mark.parametrize(
    "args, name",
    [
        (["--episodes", "0"], "--episodes"),
        (["--episodes", "-2"], "--episodes"),
        (["--budget-ms", "-5"], "--budget-ms"),
        (["--budget-ms", "nan"], "--budget-ms"),
        (["--horizon", "0"], "--horizon"),
    ],
)
def test_cli_run_options_are_checked(tmp_path, capsys, args, name):
    path = _write(tmp_path / "p.pt", _policy())
    assert main(["run", str(path), *args]) == 2
    assert name in _one_line_error(capsys)


def test_cli_output_paths_in_the_way(tmp_path, capsys):
    path = _write(tmp_path / "p.pt", _policy())
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for extra in (["--plot", str(blocker / "x.png")], ["--video", str(tmp_path)], ["--video", str(blocker / "v.mp4")]):
        assert main(["run", str(path), "--episodes", "1", "--budget-ms", "0", *extra]) == 2, extra
        _one_line_error(capsys)
    argv = ["collect", "--env", "qmpc/PointMass-v0", "--steps", "3", "--out", str(blocker / "ds")]
    assert main(argv) == 2
    _one_line_error(capsys)


def test_run_dir_in_the_way(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for run_dir in (blocker, blocker / "run"):
        f = tmp_path / "l.toml"
        f.write_text(config_to_toml(config_from_dict({"run_dir": str(run_dir), "train": {"steps": 3}})))
        assert main(["train", str(f), "--no-progress"]) == 2
        assert str(run_dir) in _one_line_error(capsys)


def test_tensorboard_dir_in_the_way(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "tb").write_text("x")
    f = tmp_path / "l.toml"
    f.write_text(config_to_toml(config_from_dict({"run_dir": str(run), "train": {"steps": 3}})))
    assert main(["train", str(f), "--no-progress"]) == 2
    assert "TensorBoard" in _one_line_error(capsys)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_run_dir(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    f = tmp_path / "l.toml"
    f.write_text(config_to_toml(config_from_dict({"run_dir": str(ro / "run"), "train": {"steps": 3}})))
    assert main(["train", str(f), "--no-progress"]) == 2
    _one_line_error(capsys)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("ds") / "pm"
    rng = np.random.default_rng(0)
    collect(make_env("qmpc/PointMass-v0", seed=0), lambda o: rng.uniform(-1, 1, 2), 300, out, seed=0)
    return out


def test_minari_metadata_that_understates_is_refused(dataset, tmp_path):
    import shutil

    assert len(load_minari(dataset, 4, 2)["cost"]) == 300
    for change in ({"total_episodes": 1, "total_steps": 100}, {"total_steps": 200}):
        ds = tmp_path / f"ds{len(change)}"
        shutil.copytree(dataset, ds)
        meta = json.loads((ds / "data" / "metadata.json").read_text())
        (ds / "data" / "metadata.json").write_text(json.dumps({**meta, **change}))
        with pytest.raises(InputError, match="metadata"):
            load_minari(ds, 4, 2)


def test_errors_are_qmpc_errors():
    """The exception types the CLI turns into one-line messages."""
    assert issubclass(CheckpointError, QmpcError) and issubclass(ConfigError, QmpcError)
    assert FORMAT == "qmpc-checkpoint-1"
