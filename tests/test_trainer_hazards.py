"""Issue 17: what training must leave as it found it (the process's thread count, matplotlib's
backend) and what it must not touch (the target network's gradients)."""

import matplotlib
import pytest
import torch

from qmpc import trainer
from qmpc.config import config_from_dict
from qmpc.errors import ConfigError
from qmpc.trainer import plot_learning_curve, train


def _cfg(run_dir, **train_kw):
    return config_from_dict(
        {
            "seed": 0,
            "run_dir": str(run_dir),
            "network": {"arch": "QuadraticQ", "hidden": [8]},
            "train": {
                "steps": 12,
                "batch_size": 8,
                "learning_starts": 6,
                "eval_every": 100,
                "eval_episodes": 1,
                "checkpoint_every": 100,
                "log_every": 4,
                "torch_threads": 1,
                **train_kw,
            },
        }
    )


def test_train_restores_the_torch_thread_count(tmp_path):
    """``train.torch_threads`` holds for the run only: the caller's thread count comes back when
    ``train`` returns, and when it raises."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        train(_cfg(tmp_path / "a"), progress=False)
        assert torch.get_num_threads() == 2
        with pytest.raises(ConfigError, match=r"train\.dataset"):  # raised after the run set its threads
            train(_cfg(tmp_path / "b", mode="offline"), progress=False)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_double_mode_leaves_no_gradient_on_the_target_network(tmp_path, monkeypatch):
    """``double`` scores the online argmin with Q_target, the gradient flowing through ``u*``
    into Q only: Q_target (moved by Polyak averaging alone) must not accumulate ``.grad``."""
    targets = []

    def spy(q, q_target, *args, **kw):
        targets.append(q_target)
        return td_loss(q, q_target, *args, **kw)

    td_loss = trainer.td_loss
    monkeypatch.setattr(trainer, "td_loss", spy)
    train(_cfg(tmp_path / "r", target="double"), progress=False)
    assert len(targets) == 6 and all(t is targets[0] for t in targets)
    assert [n for n, p in targets[0].named_parameters() if p.grad is not None] == []


def test_plot_learning_curve_keeps_the_matplotlib_backend(tmp_path):
    """The learning curve is drawn without switching the user's backend (e.g. a notebook's)."""
    before = matplotlib.get_backend()
    (tmp_path / "metrics.csv").write_text(
        "step,tag,value\n10,train/td_loss,0.5\n20,train/td_loss,0.25\n20,eval/return,-3\n20,solver/fail_frac,0\n"
    )
    try:
        matplotlib.use("svg")
        out = plot_learning_curve(tmp_path)
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(before)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
