"""Issue 20, item 3: inputs at the boundaries of the CLI and the API are one-line errors, not
tracebacks: seeds out of range, an observation that is not numeric, a damaged golden file,
action bounds that no action fits (``low = +inf`` or ``high = -inf``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import qmpc
from qmpc.check import make_network
from qmpc.cli import main
from qmpc.config import config_from_dict, config_to_toml
from qmpc.errors import ConfigError, InputError

ROOT = Path(__file__).resolve().parents[1]
BAD_SEEDS = ["-1", str(2**32), str(2**64)]


def _one_line_error(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"qmpc {command}: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("seed", BAD_SEEDS)
def test_train_seed_out_of_range(tmp_path, capsys, seed):
    f = tmp_path / "l.toml"
    f.write_text(config_to_toml(config_from_dict({"run_dir": str(tmp_path / "r"), "train": {"steps": 3}})))
    assert main(["train", str(f), "--set", f"seed={seed}", "--no-progress"]) == 2
    assert "seed to be an integer in [0, 2**32)" in _one_line_error(capsys, "train")
    assert not (tmp_path / "r").exists()


def test_seed_in_a_config_is_checked():
    with pytest.raises(ConfigError, match=r"\[0, 2\*\*32\)"):
        config_from_dict({"seed": -1})
    assert config_from_dict({"seed": 2**32 - 1}).seed == 2**32 - 1


@pytest.mark.parametrize("seed", BAD_SEEDS)
def test_run_seed_out_of_range(capsys, seed):
    assert main(["run", str(ROOT / "models" / "inverted_pendulum.pt"), "--episodes", "1", "--seed", seed]) == 2
    assert "--seed to be an integer in [0, 2**32)" in _one_line_error(capsys, "run")


@pytest.mark.parametrize("seed", BAD_SEEDS)
def test_collect_seed_out_of_range(tmp_path, capsys, seed):
    argv = ["collect", "--env", "qmpc/PointMass-v0", "--steps", "3", "--out", str(tmp_path / "ds"), "--seed", seed]
    assert main(argv) == 2
    assert "--seed to be an integer in [0, 2**32)" in _one_line_error(capsys, "collect")
    assert not (tmp_path / "ds").exists()


@pytest.mark.parametrize("obs", [["a", "b", "c", "d"], ["1", "2", "3", "4"], [[1.0, 2.0], [3.0]], {"x": 1}, "1234"])
def test_controller_act_on_a_non_numeric_observation(obs):
    ctrl = qmpc.Controller(make_network("QuadraticQ", 4, 2, 0), -1.0, 1.0)
    with pytest.raises(InputError, match="expected a numeric observation") as e:
        ctrl.act(obs)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("cut", [0, 1, 0.5])
def test_check_with_a_damaged_golden_file(tmp_path, capsys, monkeypatch, cut):
    import qmpc.check

    text = (ROOT / "qmpc" / "data" / "golden.json").read_text()
    bad = tmp_path / "golden.json"
    bad.write_text(text[: int(cut * len(text))] if cut != 1 else '{"cases": [{"name": "x"}]}')
    monkeypatch.setattr(qmpc.check, "GOLDEN_FILE", bad)
    assert main(["check"]) == 2
    assert str(bad) in _one_line_error(capsys, "check")


def test_golden_file_as_shipped_is_read():
    assert len(qmpc.check.golden_cases()) > 0


@pytest.mark.parametrize(
    "low, high, message",
    [
        (np.inf, np.inf, r"low\[0\]"),
        (-np.inf, -np.inf, r"high\[0\]"),
        ([-1.0, np.inf], [1.0, np.inf], r"low\[1\]"),
        ([-1.0, -np.inf], [1.0, -np.inf], r"high\[1\]"),
    ],
)
def test_bounds_no_action_fits_are_one_line(low, high, message):
    """``low = high = +inf``: CasADi failed with some 200 lines of output."""
    q = make_network("PICNN", 3, 2, 0)
    for build in (qmpc.ArgminLayer, qmpc.Controller):
        with pytest.raises(InputError, match=message) as e:
            build(q, low, high)
        assert "\n" not in str(e.value)
    # infinite bounds on the side they bound are fine: no bound
    qmpc.ArgminLayer(q, -np.inf, np.inf)
