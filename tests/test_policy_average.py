"""``train.policy_average`` (issue 22): controllers use an average of Q's weights, the running mean
of the first ``1/r`` iterates and an exponential average after. The network trained is unchanged,
the checkpoint's ``q`` is the average (``q_train`` the trained one), evaluations use it, and a run
with it resumes bit-identical."""

from pathlib import Path

import pytest
import torch
from test_resume_exact import TINY, assert_same_run

from qmpc.checkpoint import CheckpointError, load_checkpoint
from qmpc.config import load_config
from qmpc.errors import ConfigError
from qmpc.trainer import train

ROOT = Path(__file__).resolve().parents[1]


def _ip(run_dir, *sets):
    return load_config(ROOT / "launch" / "inverted_pendulum.toml", [f"run_dir={run_dir}", *TINY, *sets])


def _weights(state: dict) -> dict:
    return {k: v for k, v in state.items() if k != "obs_transform" and k != "obs_shift"}


def test_the_average_is_the_running_mean_then_an_exponential_one(tmp_path):
    from qmpc.trainer import _new_state

    cfg = _ip(tmp_path / "u", "train.policy_average=0.25")
    st, _ = _new_state(cfg, 0.0)
    iterates = []
    for t in range(8):  # the iterates q takes: any numbers will do
        with torch.no_grad():
            for p in st.q.parameters():
                p.copy_(torch.full_like(p, float((t * 7) % 5) - 1.5 * t))
        iterates.append([p.detach().clone() for p in st.q.parameters()])
        st.update_average()
    for i, p in enumerate(st.q_average.parameters()):
        want = sum(it[i] for it in iterates[:4]) / 4  # t < 1/r: the mean, rate 1/(t+1)
        for it in iterates[4:]:
            want = want + 0.25 * (it[i] - want)  # then r
        torch.testing.assert_close(p, want, rtol=1e-6, atol=1e-6)
    assert st.averaged == 8


def test_a_run_with_an_average_trains_the_same_q_evaluates_the_average_and_resumes_bit_identical(tmp_path, monkeypatch):
    import qmpc.trainer as trainer

    evaluated = []

    def recording(controller, *args, **kw):  # the weights each evaluation's controller holds
        evaluated.append({k: v.clone() for k, v in getattr(controller.q, "q", controller.q).state_dict().items()})
        return evaluate(controller, *args, **kw)

    evaluate = trainer.evaluate
    monkeypatch.setattr(trainer, "evaluate", recording)
    avg = "train.policy_average=0.05"
    straight = train(_ip(tmp_path / "a", avg), progress=False)
    monkeypatch.setattr(trainer, "evaluate", evaluate)
    plain = train(_ip(tmp_path / "p"), progress=False)
    ck, ckp = load_checkpoint(tmp_path / "a" / "checkpoint.pt"), load_checkpoint(tmp_path / "p" / "checkpoint.pt")
    for k in ckp["q"]:  # the network trained is the run without an average, bit for bit
        torch.testing.assert_close(ck["q_train"][k], ckp["q"][k], rtol=0, atol=0)
    assert "q_train" not in ckp
    assert any(not torch.equal(ck["q"][k], ck["q_train"][k]) for k in _weights(ck["q"]))  # "q": the average
    policy = load_checkpoint(tmp_path / "a" / "policy.pt")
    assert "q_train" not in policy
    for k in ck["q"]:
        torch.testing.assert_close(policy["q"][k], ck["q"][k], rtol=0, atol=0)
    assert len(evaluated) == len(straight.eval_returns) == 2
    for k in ck["q"]:  # the last evaluation's controller held the average
        torch.testing.assert_close(evaluated[-1][k], ck["q"][k].double(), rtol=0, atol=0)
    assert len(plain.eval_returns) == 2
    b = tmp_path / "b"
    train(_ip(b, avg), progress=False, stop_at=37)
    resumed = train(_ip(b, avg), resume=True, progress=False)
    assert resumed.eval_returns == straight.eval_returns
    assert_same_run(tmp_path / "a", b)


def test_a_checkpoint_without_its_trained_q_is_refused_and_the_average_cannot_be_switched_on_at_resume(tmp_path):
    train(_ip(tmp_path / "c", "train.policy_average=0.05"), progress=False, stop_at=20)
    path = tmp_path / "c" / "checkpoint.pt"
    ck = load_checkpoint(path)
    del ck["q_train"]
    torch.save(ck, path)
    with pytest.raises(CheckpointError, match=r"q_train.*policy_average = 0\.05"):
        train(_ip(tmp_path / "c", "train.policy_average=0.05"), resume=True, progress=False)
    train(_ip(tmp_path / "d"), progress=False, stop_at=20)
    with pytest.raises(ConfigError, match=r"train\.policy_average = 0\.05 in the launch file, 0\.0 in the run"):
        train(_ip(tmp_path / "d", "train.policy_average=0.05"), resume=True, progress=False)


@pytest.mark.parametrize("value", ["-0.1", "1.5"])
def test_a_rate_outside_0_1_is_refused(tmp_path, value):
    with pytest.raises(ConfigError, match="policy_average"):
        _ip(tmp_path / "x", f"train.policy_average={value}")
