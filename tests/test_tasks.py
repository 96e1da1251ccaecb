"""qmpc's own tasks against theory, and the controller in closed loop."""

import numpy as np
import pytest
import torch

import qmpc
from qmpc.env import make_env
from qmpc.lqr import dare, lqr_q_matrix


def test_point_mass_is_the_linear_double_integrator():
    env = make_env("qmpc/PointMass-v0", seed=0)
    A, B = env.unwrapped.linear_dynamics()
    obs, _ = env.reset(seed=0)
    rng = np.random.default_rng(0)
    for _ in range(50):
        u = rng.uniform(-2, 2, 2)
        nxt, r, _term, _trunc, _info = env.step(u)
        np.testing.assert_allclose(nxt, A @ obs + B @ u, atol=1e-12)
        np.testing.assert_allclose(-r, obs @ env.unwrapped.Qc @ obs + u @ env.unwrapped.R @ u)
        obs = nxt
    assert env.spec.max_episode_steps == 100


def _lqr_setup(gamma=0.9):
    env = make_env("qmpc/PointMass-v0", seed=0)
    u = env.unwrapped
    A, B = u.linear_dynamics()
    _P, K = dare(A, B, u.Qc, u.R, gamma)
    q = qmpc.QuadraticQ.from_quadratic(lqr_q_matrix(A, B, u.Qc, u.R, gamma), 4)
    return env, q, K


@pytest.mark.parametrize(
    ("horizon", "model", "shooting", "atol"),
    [
        (1, "exact", "single", 1e-8),
        (4, "exact", "single", 1e-8),
        (4, "exact", "multiple", 1e-8),
        (4, "mujoco", "single", 1e-7),
        (4, "mujoco", "multiple", 1e-7),
    ],
    ids=["h1", "h4-exact-single", "h4-exact-multiple", "h4-mujoco-single", "h4-mujoco-multiple"],
)
def test_controller_with_riccati_q_gives_the_lqr_action(horizon, model, shooting, atol):
    """``mujoco``: H = 4 through MuJoCo's linearisation along the previous plan, renewed every step.
    Both shootings: the states as variables, or eliminated with the condensed Hessian."""
    from qmpc.linearize import MujocoLinearization

    env, q, K = _lqr_setup()
    f, c = env.unwrapped.casadi_model()
    kw = {"dynamics": f} if model == "exact" else {"linearization": MujocoLinearization(env)}
    ctrl = qmpc.Controller(
        q, -np.inf, np.inf, horizon=horizon, stage_cost=c, discount=0.9, tol=1e-12, shooting=shooting, **kw
    )
    obs, _ = env.reset(seed=3)
    for _ in range(5):
        a, _info = ctrl.act(obs)
        np.testing.assert_allclose(a, -K @ obs, atol=atol)
        obs, *_ = env.step(a)
    assert ctrl.stats["fallback"] == 0
    if horizon > 1:  # the plan's states, whichever shooting (and with the linearisation's parameters)
        A, B = env.unwrapped.linear_dynamics()
        plan = ctrl.plan()
        acts, states = plan["actions"][0], plan["states"][0]
        assert states.shape == (horizon - 1, 4)
        np.testing.assert_allclose(states[1], A @ states[0] + B @ acts[1], atol=1e-8)


def test_mujoco_linearization_is_the_double_integrator():
    from qmpc.linearize import MujocoLinearization

    env = make_env("qmpc/PointMass-v0", seed=0)
    A0, B0 = env.unwrapped.linear_dynamics()
    lin = MujocoLinearization(env)
    x, u = np.array([0.3, -0.2, 0.1, 0.5]), np.array([1.0, -0.5])
    x_next, A, B = lin.step(x, u)
    np.testing.assert_allclose(A, A0, atol=1e-8)
    np.testing.assert_allclose(B, B0, atol=1e-8)
    np.testing.assert_allclose(x_next, A0 @ x + B0 @ u, atol=1e-12)
    p = lin.params(x, np.array([[1.0, -0.5], [0.2, 0.3]]))
    assert p.shape == (2 * lin.n_p,)
    np.testing.assert_allclose(np.array(lin.dynamics(x + 0.1, u, p[: lin.n_p])).ravel(), A0 @ (x + 0.1) + B0 @ u)
    with pytest.raises(qmpc.InputError, match="qmpc task"):
        MujocoLinearization(make_env("InvertedPendulum-v5"))


def test_controller_bad_observations():
    _, q, _ = _lqr_setup()
    ctrl = qmpc.Controller(q, -2 * np.ones(2), 2 * np.ones(2))
    with pytest.raises(qmpc.InputError, match=r"shape \(4,\), got \(5,\)"):
        ctrl.act(np.zeros(5))
    with pytest.raises(qmpc.InputError, match="finite"):
        ctrl.act(np.array([0.0, np.nan, 0.0, 0.0]))


def test_controller_falls_back_and_stays_in_bounds():
    q = qmpc.MLPQ(4, 2, hidden=(16, 16)).double()
    with torch.no_grad():
        for p in q.parameters():
            p.mul_(3.0)
    ctrl = qmpc.Controller(q, -np.ones(2), np.ones(2), max_iter=1)
    rng = np.random.default_rng(0)
    for _ in range(20):
        a, _info = ctrl.act(rng.normal(size=4))
        assert (np.abs(a) <= 1).all()
    assert ctrl.stats["fallback"] > 0 and ctrl.stats["steps"] == 20


def test_td_pipeline_fixed_point_is_the_riccati_q(tmp_path):
    """Ground truth for the training pipeline: with the task's own bounds and a random-policy
    dataset, the exact Riccati Q has (numerically) zero TD loss through the CasADi min, and TD
    training started there stays there. (A bounded min that bites would move it: that is why
    the point mass's action cost keeps the LQR action inside the bounds on such data.)"""
    from qmpc.data import ReplayBuffer, collect, load_minari
    from qmpc.demo import riccati_hessian_error
    from qmpc.losses import td_loss

    gamma = 0.9
    env, q, _ = _lqr_setup(gamma)
    rng = np.random.default_rng(0)
    collect(env, lambda o: rng.uniform(-2, 2, 2), 1000, tmp_path / "ds", seed=0)
    d = load_minari(tmp_path / "ds", 4, 2)
    buf = ReplayBuffer(4, 2, 1000)
    buf.add_many(d["obs"], d["act"], d["cost"], d["next_obs"], d["terminated"])
    low, high = env.action_space.low, env.action_space.high
    online = qmpc.ArgminLayer(q, low, high, tol=1e-12)
    q_t = qmpc.QuadraticQ.from_quadratic(np.eye(6), 4)
    q_t.load_state_dict(q.state_dict())
    target = qmpc.ArgminLayer(q_t, low, high, tol=1e-12)
    batch = buf.sample(1000, rng)
    assert td_loss(q, q_t, online, target, batch, gamma, "residual").loss.item() < 1e-9
    opt = torch.optim.Adam(q.parameters(), lr=1e-3)
    for _ in range(100):
        res = td_loss(q, q_t, online, target, buf.sample(128, rng), gamma, "residual")
        opt.zero_grad()
        res.loss.backward()
        opt.step()
    assert riccati_hessian_error(q, env, gamma) < 0.02


def test_offline_training_recovers_the_riccati_q(tmp_path):
    """Issue 3's ground truth: a QuadraticQ trained offline from random point-mass data (the
    demo's configuration) has the Riccati Hessian in (x, u) to within 5 %."""
    from qmpc.checkpoint import load_checkpoint, network_from_checkpoint
    from qmpc.config import config_from_dict
    from qmpc.data import collect
    from qmpc.demo import DEMO_CONFIG, riccati_hessian_error
    from qmpc.trainer import train

    env = make_env("qmpc/PointMass-v0", seed=0)
    rng = np.random.default_rng(0)
    collect(env, lambda o: rng.uniform(-2, 2, 2), 10000, tmp_path / "data", seed=0)
    train_cfg = {**DEMO_CONFIG["train"], "dataset": str(tmp_path / "data"), "eval_every": 10**6}
    cfg = config_from_dict({**DEMO_CONFIG, "run_dir": str(tmp_path / "run"), "train": train_cfg})
    train(cfg, progress=False)
    q = network_from_checkpoint(load_checkpoint(tmp_path / "run" / "checkpoint.pt"))
    err = riccati_hessian_error(q, env, cfg.train.gamma)
    print(f"relative Hessian error against the Riccati Q: {100 * err:.2f} %")
    assert err < 0.05


def test_controller_wall_time_budget(monkeypatch):
    """A budget the solver cannot meet: every step overruns, falls back along the previous plan
    or to the safe default, stays in bounds, and is counted; a generous budget changes nothing.
    (A budget below one evaluation is refused up front: the check is off to test the fallback.)"""
    monkeypatch.setattr(qmpc.Controller, "_check_budget", lambda self: None)
    f, c = make_env("qmpc/PointMass-v0").unwrapped.casadi_model()
    q = qmpc.PICNN(4, 2, hidden=(16,)).double()
    kw = dict(horizon=4, dynamics=f, stage_cost=c)
    env = make_env("qmpc/PointMass-v0", seed=0)
    obs, _ = env.reset(seed=0)
    free = qmpc.Controller(q, -np.ones(2), np.ones(2), **kw)
    a0, info = free.act(obs)
    assert not info["fallback"] and not info["overrun"]
    roomy = qmpc.Controller(q, -np.ones(2), np.ones(2), budget_ms=10_000.0, **kw)
    a1, info = roomy.act(obs)
    np.testing.assert_allclose(a1, a0, atol=1e-8)
    assert not info["overrun"]
    tight = qmpc.Controller(q, -np.ones(2), np.ones(2), budget_ms=1e-6, **kw)
    for _ in range(5):
        a, info = tight.act(obs)
        assert info["overrun"] and info["fallback"] and (np.abs(a) <= 1).all()
    assert tight.stats == {"steps": 5, "failed": 0, "overrun": 5, "fallback": 5}
    # a solve cut short keeps its iterate as the next warm start: here the cold start (zero
    # actions, the bounds' midpoint), stopped before its first iteration
    assert tight._plan is not None
    np.testing.assert_array_equal(a, tight.safe_action)


def test_solver_wall_time_limit_status():
    q = qmpc.MLPQ(4, 2, hidden=(16, 16)).double()
    x = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    layer = qmpc.ArgminLayer(q, -np.ones(2), np.ones(2), workers=1, max_wall_ms=1e-6)
    layer(x, grad_mode="none")
    assert (layer.last_result.status == qmpc.Status.TIMEOUT).all()
    with pytest.raises(qmpc.InputError, match="workers = 1"):
        qmpc.ArgminLayer(q, -np.ones(2), np.ones(2), workers=2, max_wall_ms=5.0)
    with pytest.raises(qmpc.InputError, match="max_wall_ms"):
        qmpc.ArgminLayer(q, -np.ones(2), np.ones(2), workers=1, max_wall_ms=-1.0)


def test_controller_follows_weight_changes():
    """The controller bakes the weights into its problem; it rebuilds it when they change (the
    trainer's evaluator loads new weights into the same controller)."""
    _, q, _ = _lqr_setup()
    ctrl = qmpc.Controller(q, -2 * np.ones(2), 2 * np.ones(2))
    x = np.array([0.5, -0.3, 0.2, 0.1])
    a0, _ = ctrl.act(x)
    q2 = qmpc.QuadraticQ.from_quadratic(np.diag([1.0, 2.0, 3.0, 4.0, 0.5, 0.7]), 4)
    q.load_state_dict(q2.state_dict())
    ctrl.reset()
    a1, _ = ctrl.act(x)
    fresh, _ = qmpc.Controller(q2, -2 * np.ones(2), 2 * np.ones(2)).act(x)
    np.testing.assert_allclose(a1, fresh, atol=1e-10)
    assert np.abs(a1 - a0).max() > 1e-3
    with pytest.raises(qmpc.InputError, match="bake_weights"):
        qmpc.ArgminLayer(q, -1.0, 1.0, bake_weights=True)
