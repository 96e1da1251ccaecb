"""Issue 17: the solver alarm. When more than ``solver.max_fail_frac`` of the TD-target solves of
the last ``solver.fail_window`` updates fail, training stops with a one-line SolverError naming
the fraction, the window and the statuses; the checkpoint before it is intact."""

import re
from pathlib import Path

import pytest

import qmpc.kkt
from qmpc import trainer
from qmpc.checkpoint import load_checkpoint
from qmpc.cli import main
from qmpc.config import config_from_dict, config_to_toml, load_config
from qmpc.errors import SolverError
from qmpc.trainer import train


def _cfg(run_dir, fail_window=5, **train_kw):
    return config_from_dict(
        {
            "seed": 0,
            "run_dir": str(run_dir),
            "network": {"arch": "QuadraticQ", "hidden": [8]},
            "solver": {"fail_window": fail_window},
            "train": {
                "steps": 30,
                "batch_size": 8,
                "learning_starts": 5,
                "eval_every": 1000,
                "eval_episodes": 1,
                "checkpoint_every": 5,
                "log_every": 5,
                **train_kw,
            },
        }
    )


@pytest.fixture
def failing_solves(monkeypatch):
    """Every solution fails qmpc's KKT certificate: the plugin's solves and cold retries all run
    and end as MAX_ITER or FAILED, as when the network makes the argmin ill-posed."""
    residual = qmpc.kkt.kkt_residual
    monkeypatch.setattr(qmpc.kkt, "kkt_residual", lambda *a: residual(*a) + 1.0)
    updates = []
    td_loss = trainer.td_loss
    monkeypatch.setattr(trainer, "td_loss", lambda *a, **kw: updates.append(1) or td_loss(*a, **kw))
    return updates


def test_a_run_whose_solves_all_fail_stops_within_the_window(tmp_path, failing_solves):
    run = tmp_path / "r"
    with pytest.raises(SolverError) as e:
        train(_cfg(run), progress=False)
    msg = str(e.value)
    assert len(failing_solves) == 5  # updates at steps 6..10: stopped at the 5th, when the window is full
    assert "\n" not in msg and "solver.max_fail_frac" in msg and "solver.fail_window" in msg
    assert "got 1.000 over the last 5 updates" in msg and "at step 10" in msg
    counts = dict(re.findall(r"\b(SOLVED|RETRIED|MAX_ITER|FAILED|SINGULAR|TIMEOUT) (\d+)", msg))
    assert set(counts) <= {"MAX_ITER", "FAILED", "TIMEOUT"} and counts, msg
    assert sum(map(int, counts.values())) == 40 and "of 40 samples" in msg  # 5 updates × 8
    assert "last update: 8 of 8 failed" in msg
    # nothing lost: the checkpoint of step 5 (before learning) is intact, and resumes once the solves work
    ckpt = load_checkpoint(run / "checkpoint.pt")
    assert ckpt["loop"]["step"] == 5 and ckpt["loop"]["solve_window"] == {"fail_frac": [], "status": [], "message": ""}
    assert load_checkpoint(run / "policy.pt")["trained_steps"] == 5
    assert not (run / ".lock").exists()


def test_the_cli_reports_the_alarm_on_one_line(tmp_path, failing_solves, capsys):
    launch = tmp_path / "l.toml"
    launch.write_text(config_to_toml(_cfg(tmp_path / "r", fail_window=2)))
    assert main(["train", str(launch), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("qmpc train: error: expected at most 0.5 of the TD-target solves") and "\n" not in err


def test_resume_goes_on_past_the_alarm_with_a_larger_threshold(tmp_path, failing_solves):
    run = tmp_path / "r"
    with pytest.raises(SolverError):
        train(_cfg(run), progress=False)
    s = train(_cfg(run), resume=True, progress=False, overrides=["solver.max_fail_frac=1.0", "train.steps=12"])
    assert s.steps == 12 and s.fail_frac == 1.0
    assert load_checkpoint(run / "checkpoint.pt")["config"]["solver"]["max_fail_frac"] == 1.0


def test_the_window_survives_a_resume(tmp_path, failing_solves):
    """The checkpoint at step 7 holds 2 of the window's updates: the resumed run stops at the
    same update as the uninterrupted one (step 10), not 5 updates after the resume."""
    with pytest.raises(SolverError, match="at step 10:") as straight:
        train(_cfg(tmp_path / "a", checkpoint_every=7), progress=False)
    train(_cfg(tmp_path / "b", checkpoint_every=7), progress=False, stop_at=8)
    assert len(load_checkpoint(tmp_path / "b" / "checkpoint.pt")["loop"]["solve_window"]["fail_frac"]) == 2
    with pytest.raises(SolverError, match="at step 10:") as resumed:
        train(_cfg(tmp_path / "b"), resume=True, progress=False)
    assert str(resumed.value) == str(straight.value)


def test_a_healthy_run_is_not_stopped(tmp_path):
    s = train(_cfg(tmp_path / "r", fail_window=2, steps=20), progress=False)
    assert s.steps == 20 and s.fail_frac <= 0.5
    window = load_checkpoint(tmp_path / "r" / "checkpoint.pt")["loop"]["solve_window"]
    assert len(window["fail_frac"]) == 2 and all(set(c) <= {"SOLVED", "RETRIED"} for c in window["status"])


def test_a_real_iteration_limit_sets_off_the_alarm(tmp_path):
    """No patch: IPOPT with one iteration (and no batched Newton) fails ever more TD-target solves
    as Q sharpens (about 15 % of the first updates, 60 % by the 40th)."""
    overrides = [
        f"run_dir={tmp_path / 'r'}",
        'solver.plugin="ipopt"',
        "solver.max_iter=1",
        "solver.newton=false",
        "solver.max_fail_frac=0.3",
        "solver.fail_window=10",
        "model.learn=false",
        "train.steps=60",
        "train.learning_starts=20",
        "train.batch_size=32",
        "train.eval_every=1000",
        "train.checkpoint_every=30",
    ]
    cfg = load_config(Path(__file__).resolve().parents[1] / "launch" / "inverted_pendulum.toml", overrides)
    with pytest.raises(SolverError, match=r"over the last 10 updates .*MAX_ITER \d+") as e:
        train(cfg, progress=False)
    assert "\n" not in str(e.value)
    # the plugin's own word on the last failed retry (IPOPT, then sqpmethod, one iteration each)
    assert re.search(r"last solver message: qmpc_nlp\w*: \w+", str(e.value)), str(e.value)
