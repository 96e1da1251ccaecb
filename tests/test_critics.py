"""``train.critics`` (issue 21, "seeds that hold"): clipped double Q for costs. The bootstrap is the
largest of the target networks' values at the first network's argmin, every critic regresses onto
it, a run with two critics resumes bit-identical, and one critic is the run it always was."""

from pathlib import Path

import numpy as np
import pytest
import torch
from test_resume_exact import TINY, assert_same_run

from qmpc.bridge import ArgminLayer
from qmpc.checkpoint import CheckpointError, load_checkpoint
from qmpc.config import load_config
from qmpc.data import Batch
from qmpc.errors import ConfigError
from qmpc.losses import critic_losses, td_loss
from qmpc.networks import build_network
from qmpc.trainer import train

ROOT = Path(__file__).resolve().parents[1]
LOW, HIGH = np.array([-1.0, -1.0]), np.array([1.0, 1.0])


def _net(seed: int):
    torch.manual_seed(seed)
    return build_network("PICNN", 3, 2, (8, 8), "softplus", 1.0, True).double()


def _batch(seed: int = 0, n: int = 6) -> Batch:
    g = torch.Generator().manual_seed(seed)
    x, xn = torch.randn(n, 3, generator=g), torch.randn(n, 3, generator=g)
    u = torch.rand(n, 2, generator=g) * 2 - 1
    c, term = torch.rand(n, generator=g), torch.tensor([0.0, 1.0] + [0.0] * (n - 2))
    return Batch(x, u, c, xn, term, torch.arange(n))


@pytest.mark.parametrize("mode", ["semi", "double", "double_detached"])
def test_the_bootstrap_is_the_largest_target_value_at_the_argmin(mode):
    q, qt, q2t, q3t = _net(0), _net(1), _net(2), _net(3)
    layers = ArgminLayer(q, LOW, HIGH, workers=1), ArgminLayer(qt, LOW, HIGH, workers=1)
    b = _batch()
    res = td_loss(q, qt, *layers, b, 0.9, mode, critic_targets=[q2t, q3t])
    solver = layers[1] if mode == "semi" else layers[0]  # semi: Q_target's argmin, else Q's
    with torch.no_grad():
        u_star = solver(b.next_obs.double(), grad_mode="none")[0]
        xn = b.next_obs.double()
        values = torch.stack([net(xn, u_star) for net in (qt, q2t, q3t)])
        want = b.cost.double() + 0.9 * (1 - b.terminated.double()) * values.max(dim=0).values
    assert res.ok.all()
    np.testing.assert_allclose(res.target.detach().numpy(), want.numpy(), rtol=1e-9, atol=1e-9)
    wins = values.argmax(dim=0)
    assert (wins != 0).any(), "the other critics never decided a target: the test would not see them"
    alone = td_loss(q, qt, *layers, b, 0.9, mode)
    assert (res.target.detach() >= alone.target.detach() - 1e-12).all()


def test_critic_losses_fit_each_critic_to_the_detached_targets_of_the_samples_that_count():
    q, qt, q2 = _net(0), _net(1), _net(2)
    layers = ArgminLayer(q, LOW, HIGH, workers=1), ArgminLayer(qt, LOW, HIGH, workers=1)
    b = _batch()
    res = td_loss(q, qt, *layers, b, 0.9, "double")  # y carries a gradient into q through u*
    ok = res.ok.clone()
    ok[2] = False
    res = res._replace(ok=ok)
    loss = critic_losses([q2], b, res)
    with torch.no_grad():
        err = q2(b.obs.double(), b.act.double()) - res.target
    assert float(loss.detach()) == pytest.approx(float((err[ok] ** 2).sum() / ok.sum()), rel=1e-12)
    loss.backward()
    assert all(p.grad is None for p in q.parameters())  # the targets are detached
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in q2.parameters())
    assert float(critic_losses([], b, res)) == 0.0


def _ip(run_dir, *sets):
    return load_config(ROOT / "launch" / "inverted_pendulum.toml", [f"run_dir={run_dir}", *TINY, *sets])


def test_a_run_with_two_critics_trains_and_resumes_bit_identical(tmp_path):
    norm = "network.obs_normalization=standardize"  # fixed at learning_starts, for every network
    straight = train(_ip(tmp_path / "a", "train.critics=2", norm), progress=False)
    one = train(_ip(tmp_path / "one", norm), progress=False)
    ck, ck1 = load_checkpoint(tmp_path / "a" / "checkpoint.pt"), load_checkpoint(tmp_path / "one" / "checkpoint.pt")
    assert set(ck["critics"]) == {f"0.{k}" for k in ck1["q"]} and "critics" not in ck1
    assert not torch.equal(ck["critics"]["0.obs_transform"], torch.eye(4))  # Q's normalisation, copied
    for name in ("critics", "critic_targets"):
        torch.testing.assert_close(ck[name]["0.obs_transform"], ck["q"]["obs_transform"], rtol=0, atol=0)
    assert any(not torch.equal(ck["q"][k], ck1["q"][k]) for k in ck1["q"])  # the targets changed Q's training
    assert "critics" not in load_checkpoint(tmp_path / "a" / "policy.pt")  # the first network acts alone
    b = tmp_path / "b"
    train(_ip(b, "train.critics=2", norm), progress=False, stop_at=37)
    resumed = train(_ip(b, "train.critics=2", norm), resume=True, progress=False)
    assert resumed.eval_returns == straight.eval_returns
    assert_same_run(tmp_path / "a", b)
    assert one.steps == straight.steps


def test_a_checkpoint_without_its_other_critics_is_refused(tmp_path):
    train(_ip(tmp_path / "c", "train.critics=2"), progress=False, stop_at=20)
    path = tmp_path / "c" / "checkpoint.pt"
    ck = load_checkpoint(path)
    del ck["critics"]
    torch.save(ck, path)
    with pytest.raises(CheckpointError, match=r"other critics .* train\.critics = 2"):
        train(_ip(tmp_path / "c", "train.critics=2"), resume=True, progress=False)


@pytest.mark.parametrize("sets", [["train.target=residual"], ["train.target_horizon=3", "model.learn=true"]])
def test_more_critics_with_residual_or_plan_targets_is_refused(tmp_path, sets):
    with pytest.raises(ConfigError, match=r"train\.critics = 2"):
        train(_ip(tmp_path / "r", "train.critics=2", *sets), progress=False)
