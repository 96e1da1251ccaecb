"""Models for horizons > 1: the symbolic stage costs against the simulators' rewards, the learned
dynamics model (twin, fit, checkpoint) and the controller planning through it."""

from __future__ import annotations

import casadi as ca
import numpy as np
import pytest
import torch

import qmpc
from qmpc.check import fd_errors, make_network
from qmpc.checkpoint import CheckpointError
from qmpc.config import config_from_dict
from qmpc.controller import Controller, model_functions
from qmpc.costs import stage_cost
from qmpc.dynamics import DynamicsModel, rollout_error
from qmpc.env import make_env
from qmpc.trainer import train


def _cost_errors(env_id: str, steps: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """|c(x, u, x⁺) + reward| on random-action steps that did not terminate, and the rewards."""
    env = make_env(env_id, seed=0)
    f = stage_cost(env)
    rng = np.random.default_rng(0)
    obs, _ = env.reset(seed=0)
    errs, rewards = [], []
    for _ in range(steps):
        a = rng.uniform(env.action_space.low, env.action_space.high)
        nxt, r, term, trunc, _ = env.step(a)
        if not term:
            errs.append(abs(float(f(obs, a, nxt)) + r))
            rewards.append(r)
        obs = nxt
        if term or trunc:
            obs, _ = env.reset()
    return np.array(errs), np.array(rewards)


@pytest.mark.parametrize("env_id", ["InvertedPendulum-v5", "InvertedDoublePendulum-v5", "Reacher-v5"])
def test_stage_cost_is_minus_reward(env_id):
    errs, rewards = _cost_errors(env_id)
    assert len(errs) > 50
    assert errs.max() < 1e-3, f"{env_id}: max |c + r| = {errs.max():.2e} (reward std {rewards.std():.2e})"


def test_half_cheetah_cost_is_a_documented_approximation():
    # the forward speed is the trapezoid of the observed velocities (the position is not observed):
    # measured mean |c + r| = 0.15 on random actions, against a reward spread of 0.6
    errs, rewards = _cost_errors("HalfCheetah-v5")
    assert errs.mean() < 0.25 and errs.mean() < 0.5 * rewards.std()


def test_stage_cost_errors():
    with pytest.raises(qmpc.InputError, match="symbolic stage cost"):
        stage_cost(make_env("Pendulum-v1"))


def test_three_argument_stage_cost_sensitivities():
    """A stage cost that reads x⁺ (as gymnasium's rewards do) keeps the bridge's gradients exact."""
    nx, nu = 4, 2
    rng = np.random.default_rng(3)
    A, B = np.eye(nx) + 0.1 * rng.normal(size=(nx, nx)), 0.3 * rng.normal(size=(nx, nu))
    x, u, xn = ca.SX.sym("x", nx), ca.SX.sym("u", nu), ca.SX.sym("xn", nx)
    f = ca.Function("f", [x, u], [A @ x + B @ u])
    c = ca.Function("c", [x, u, xn], [ca.sumsqr(xn) + 0.5 * ca.sumsqr(x - xn) + 0.1 * ca.sumsqr(u)])
    layer = qmpc.ArgminLayer(
        make_network("PICNN", nx, nu, 0), -5.0, 5.0, horizon=3, dynamics=f, stage_cost=c, discount=0.9, tol=1e-13
    )
    xs = torch.randn(3, nx, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    errs = fd_errors(layer, xs)
    assert max(errs.values()) < 1e-5, errs
    bad = ca.Function("bad", [x], [ca.sumsqr(x)])
    with pytest.raises(qmpc.InputError, match="stage_cost"):
        qmpc.ArgminLayer(make_network("PICNN", nx, nu, 0), -5.0, 5.0, horizon=3, dynamics=f, stage_cost=bad)


def test_dynamics_twin_and_fit():
    """The twin agrees with torch; the model learns the point mass's linear dynamics."""
    env = make_env("qmpc/PointMass-v0", seed=0)
    rng = np.random.default_rng(0)
    obs, act, nxt = [], [], []
    o, _ = env.reset(seed=0)
    for _ in range(2000):
        a = rng.uniform(env.action_space.low, env.action_space.high)
        n, _, term, trunc, _ = env.step(a)
        obs.append(o), act.append(a), nxt.append(n)
        o = n if not (term or trunc) else env.reset()[0]
    X, U, Xn = (torch.as_tensor(np.array(v)) for v in (obs, act, nxt))
    torch.manual_seed(0)
    m = DynamicsModel(4, 2, hidden=[32, 32]).double()
    m.fit_normalization(X, Xn)
    before = rollout_error(m, X.numpy(), U.numpy(), Xn.numpy())
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    for i in range(600):
        idx = torch.randint(0, len(X), (128,), generator=torch.Generator().manual_seed(i))
        loss = m.loss(X[idx], U[idx], Xn[idx])
        opt.zero_grad(), loss.backward(), opt.step()
    after = rollout_error(m, X.numpy(), U.numpy(), Xn.numpy())
    assert after < 0.05 < before, (before, after)
    f = m.casadi_function()
    pred = m(X[:20], U[:20]).detach().numpy()
    twin = np.array([np.array(f(X[i].numpy(), U[i].numpy())).ravel() for i in range(20)])
    np.testing.assert_allclose(twin, pred, rtol=0, atol=1e-12)


def _tiny_run(tmp_path, learn_model: bool):
    cfg = config_from_dict(
        {
            "seed": 0,
            "run_dir": str(tmp_path / "run"),
            "env": {"id": "InvertedPendulum-v5"},
            "network": {"arch": "PICNN", "hidden": [8]},
            "model": {"learn": learn_model, "hidden": [16]},
            "train": {"steps": 60, "batch_size": 16, "learning_starts": 30, "eval_every": 60, "eval_episodes": 1},
        }
    )
    train(cfg, progress=False)
    return tmp_path / "run" / "policy.pt"


def test_controller_plans_through_the_learned_model(tmp_path):
    path = _tiny_run(tmp_path, learn_model=True)
    ckpt = qmpc.checkpoint.load_checkpoint(path)
    assert "model" in ckpt  # the slim policy carries the model
    ctrl = Controller.from_checkpoint(path, horizon=4, model="learned")
    env = make_env("InvertedPendulum-v5", seed=0)
    obs, _ = env.reset(seed=0)
    for _ in range(5):
        obs_before = obs
        a, info = ctrl.act(obs)
        assert ctrl.low[0] <= a[0] <= ctrl.high[0] and np.isfinite(info["value"])
        obs, *_ = env.step(a)
    # the plan's predicted states are the model's rollout of its actions
    plan = ctrl.plan()
    acts, states = plan["actions"][0], plan["states"][0]
    assert states.shape == (3, 4)
    f = model_functions(ckpt, "learned")["dynamics"]
    np.testing.assert_allclose(np.array(f(obs_before, acts[0])).ravel(), states[0], atol=1e-12)
    np.testing.assert_allclose(np.array(f(states[0], acts[1])).ravel(), states[1], atol=1e-12)
    with pytest.raises(qmpc.InputError, match="--model learned"):
        Controller.from_checkpoint(path, horizon=4, model="exact")


def test_learned_model_missing_is_a_clear_error(tmp_path):
    path = _tiny_run(tmp_path, learn_model=False)
    with pytest.raises(CheckpointError, match=r"model\.learn = true"):
        Controller.from_checkpoint(path, horizon=3, model="learned")
    Controller.from_checkpoint(path, horizon=1)  # the greedy controller needs no model


def test_dynamics_normalization_keeps_constant_dimensions_unscaled():
    """A dimension that does not move in the first data (a contact force, a fixed target) keeps
    scale 1, so later non-zero values stay ordinary inputs and targets."""
    x = torch.randn(100, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x[:, 2] = 0.0
    m = DynamicsModel(3, 1, hidden=[8]).double()
    m.fit_normalization(x, x + 0.1)
    assert m.x_scale[2] == 1.0 and m.delta_scale.eq(1.0).all()  # every delta is the constant 0.1
    assert m.x_scale[0] != 1.0
    xn = x[:4].clone()
    xn[:, 2] = 5.0
    u0 = torch.zeros(4, 1, dtype=torch.float64)
    z = torch.cat([(xn - m.x_shift) / m.x_scale, u0], dim=-1)
    assert z[:, 2].eq(5.0).all()  # the constant dimension is an ordinary input, not 5 / 1e-9
    target = torch.full((4, 3), 2.9, dtype=torch.float64)  # (Δ − delta_shift) / delta_scale = (3 − 0.1) / 1
    torch.testing.assert_close(m.loss(xn, u0, xn + 3.0), ((m.net(z) - target) ** 2).mean())
