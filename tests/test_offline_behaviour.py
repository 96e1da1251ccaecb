"""Issue 22's offline method: the behaviour-regularised argmin (``Q + ½ β ‖(u − π_β(x)) / s‖²``,
:mod:`qmpc.networks.behaviour`) and the conservative term; their twins, sensitivities, targets
and a run that trains, checkpoints, resumes and controls with them."""

from pathlib import Path

import numpy as np
import pytest
import torch
from test_resume_exact import assert_same_run

from qmpc.bridge import ArgminLayer
from qmpc.check import fd_errors
from qmpc.checkpoint import load_checkpoint
from qmpc.config import load_config
from qmpc.controller import Controller
from qmpc.data import Batch, collect
from qmpc.env import make_env
from qmpc.errors import ConfigError
from qmpc.losses import conservative_gap, td_loss
from qmpc.networks import build_network
from qmpc.networks.behaviour import BehaviourPolicy, BehaviourRegularizedQ
from qmpc.trainer import train

ROOT = Path(__file__).resolve().parents[1]
LOW, HIGH = np.array([-1.0, -3.0]), np.array([1.0, 2.0])


def _wrapped(arch: str = "PICNN", weight: float = 2.0, seed: int = 0, scale: str = "range") -> BehaviourRegularizedQ:
    torch.manual_seed(seed)
    q = build_network(arch, 4, 2, [16, 16], "tanh", 0.01, True).double()
    q.set_input_normalization(np.full(4, 0.1), 2.0 * np.eye(4))
    pi = BehaviourPolicy(4, 2, [8, 8], "silu", LOW, HIGH).double()
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(400, 4))
    pi.fit(x, np.clip(np.tanh(x[:, :2]) + 0.3 + 0.2 * rng.normal(size=(400, 2)), LOW, HIGH), 200, 64, 1e-2, seed, scale)
    return BehaviourRegularizedQ(q, pi, weight).double()


SCALES = ["range", "residual"]


@pytest.mark.parametrize("scale", SCALES)
def test_regularized_q_twin_and_closed_form_agree_with_torch(scale):
    """Layer 1 for the wrapper: value, gradient and Hessian in ``u`` of the CasADi twin (per sample
    and vectorised) and of the batched oracle, against torch's autograd, to 1e-10."""
    w = _wrapped(scale=scale)
    s, half = w.policy_arrays()["pen_scale"], w.policy_arrays()["act_half"]
    assert (s == half).all() if scale == "range" else (s < 0.5 * half).all()
    rng = np.random.default_rng(1)
    x = torch.tensor(rng.normal(size=(6, 4)))
    u = torch.tensor(rng.uniform(-1, 1, size=(6, 2)), requires_grad=True)
    v = w(x, u)
    (g,) = torch.autograd.grad(v.sum(), u, create_graph=True)
    H = torch.stack([torch.autograd.grad(g[:, i].sum(), u, retain_graph=True)[0] for i in range(2)], dim=1)
    theta = w.flat_parameters()
    assert w.num_parameters == w.q.num_parameters  # π_β is not trained with Q: buffers only
    f = w.casadi_function()
    twin = np.array([float(f(x[i].numpy(), u[i].detach().numpy(), theta)) for i in range(6)])
    batch = np.asarray(w.casadi_batch_function(6)(x.numpy().T, u.detach().numpy().T, theta)).ravel()
    oracle = w.action_oracle(x.numpy())
    qo, go, Ho = oracle.derivatives(u.detach().numpy())
    for got, want in ((twin, v), (batch, v), (qo, v), (go, g), (Ho, H)):
        np.testing.assert_allclose(got, want.detach().numpy(), rtol=0, atol=1e-10)
    q1, g1 = oracle.first_order(u.detach().numpy())  # the Newton's Hessian-free step: the same bits
    np.testing.assert_array_equal(q1, qo)
    np.testing.assert_array_equal(g1, go)


@pytest.mark.parametrize("scale", SCALES)
def test_regularized_argmin_of_a_quadratic_q_is_its_closed_form(scale):
    """``Q = V + ½ (u − μ)ᵀ P (u − μ)``: ``argmin Q̃ = (P + β S⁻²)⁻¹ (P μ + β S⁻² r)`` inside the box."""
    w = _wrapped("QuadraticQ", weight=3.0, scale=scale)
    x = torch.tensor(np.random.default_rng(2).normal(size=(3, 4)))
    layer = ArgminLayer(w, -100 * np.ones(2), 100 * np.ones(2), solver="sqpmethod", tol=1e-12, newton=False)
    u_star, _ = layer(x)
    want_s = (HIGH - LOW) / 2 if scale == "range" else w.policy_arrays()["pen_scale"]
    r, S2 = w.behaviour_action(x.numpy()), np.diag(1.0 / want_s**2)
    for b in range(3):
        u0 = torch.zeros(1, 2, dtype=torch.float64, requires_grad=True)
        (g,) = torch.autograd.grad(w.q(x[b : b + 1], u0).sum(), u0, create_graph=True)
        P = torch.stack([torch.autograd.grad(g[0, i], u0, retain_graph=True)[0][0] for i in range(2)]).numpy()
        mu = -np.linalg.solve(P, g[0].detach().numpy())
        want = np.linalg.solve(P + 3.0 * S2, P @ mu + 3.0 * S2 @ r[b])
        np.testing.assert_allclose(u_star[b].detach().numpy(), want, atol=1e-8)


@pytest.mark.parametrize("newton", [False, True])
@pytest.mark.parametrize("scale", SCALES)
def test_sensitivities_of_the_regularized_argmin_match_finite_differences(newton, scale):
    """``∂u*/∂θ``, ``∂u*/∂x``, ``∂V/∂θ``, ``∂V/∂x`` of ``argmin Q̃`` in a box that binds one
    component, by the plugin and by the batched Newton, against central differences of an
    sqpmethod solve at 1e-13."""
    w = _wrapped(scale=scale)
    x = torch.tensor(np.random.default_rng(3).normal(size=(5, 4)))
    wide = ArgminLayer(w, -50 * np.ones(2), 50 * np.ones(2), solver="sqpmethod", tol=1e-13, newton=False)
    u_free = wide(x)[0].detach().numpy()
    low = np.array([np.max(u_free[:, 0]) + 0.05, -50.0])  # the first component on its lower bound
    layer = ArgminLayer(w, low, [50.0, 50.0], solver="sqpmethod", tol=1e-13, newton=newton)
    reference = ArgminLayer(w, low, [50.0, 50.0], solver="sqpmethod", tol=1e-13, newton=False)
    assert layer.problem.batched == newton
    errs = fd_errors(layer, x, n_dirs=2, reference=reference)
    assert max(errs.values()) <= 1e-6, errs


def test_the_residual_scale_is_the_spread_of_the_data_around_the_clone_and_old_states_load():
    pi = BehaviourPolicy(2, 2, [8], "silu", LOW, HIGH).double()
    rng = np.random.default_rng(5)
    x = rng.normal(size=(3000, 2))
    spread = np.array([0.05, 0.5])  # one narrow dimension, one wide
    a = np.clip(0.2 * np.tanh(x) + spread * rng.normal(size=(3000, 2)), LOW, HIGH)
    pi.fit(x, a, 300, 128, 1e-2, 0, "residual")
    with torch.no_grad():
        rms = np.sqrt(((a - pi(torch.from_numpy(x)).numpy()) ** 2).mean(axis=0))
    np.testing.assert_allclose(pi.pen_scale.numpy(), rms, rtol=1e-12)
    np.testing.assert_allclose(rms, spread, rtol=0.3)  # the clone fits the mean, up to its 300 steps
    pi.fit(x, a, 300, 128, 1e-2, 0, "value", value=4.0)  # relative to a cost-to-go of size 4: half
    with torch.no_grad():  # (the fit goes on from the clone it has)
        rms = np.sqrt(((a - pi(torch.from_numpy(x)).numpy()) ** 2).mean(axis=0))
    np.testing.assert_allclose(pi.pen_scale.numpy(), rms / 2.0, rtol=1e-12)
    with pytest.raises(ConfigError, match="cost-to-go size > 0"):
        pi.fit(x, a, 1, 8, 1e-2, 0, "value", value=0.0)
    pi.fit(x, np.full((3000, 2), 0.3), 300, 128, 1e-2, 0, "residual")  # one action: the floor
    np.testing.assert_allclose(pi.pen_scale.numpy(), 0.01 * (HIGH - LOW) / 2, rtol=1e-12)
    old = {k: v for k, v in pi.state_dict().items() if k != "pen_scale"}  # saved before the scale existed
    pi.load_state_dict(old)
    np.testing.assert_array_equal(pi.pen_scale.numpy(), pi.act_half.numpy())
    with pytest.raises(ConfigError, match="behaviour scale"):
        pi.fit(x, a, 1, 8, 1e-2, 0, "wide")


def _batch(n: int = 12, seed: int = 4) -> Batch:
    rng = np.random.default_rng(seed)
    t = torch.from_numpy
    x, xn = rng.normal(size=(n, 4)), rng.normal(size=(n, 4))
    u = np.clip(rng.normal(size=(n, 2)), LOW, HIGH)
    return Batch(t(x), t(u), t(rng.normal(size=n)), t(xn), t((rng.uniform(size=n) < 0.2).astype(float)))


def test_semi_target_of_the_regularized_argmin_is_q_target_there():
    w, wt = _wrapped(seed=0), _wrapped(seed=5)
    batch = _batch()
    layer, target = (ArgminLayer(m, LOW, HIGH, tol=1e-12) for m in (w, wt))
    res = td_loss(w.q, wt.q, layer, target, batch, 0.9, "semi", score_argmin=True)
    u_star, v_reg = target(batch.next_obs)
    with torch.no_grad():
        y = batch.cost + 0.9 * (1 - batch.terminated) * wt.q(batch.next_obs, u_star)
        want = ((w.q(batch.obs, batch.act) - y) ** 2).mean()
    assert float(res.loss.detach()) == pytest.approx(float(want), rel=1e-10)
    assert not torch.allclose(v_reg, wt.q(batch.next_obs, u_star))  # the penalty is not in the target
    with pytest.raises(ConfigError, match="residual"):
        td_loss(w.q, wt.q, layer, target, batch, 0.9, "residual", score_argmin=True)


def test_conservative_gap_and_its_gradient():
    """``mean(Q(x, u) − Q(x, ũ))``: non-negative for the plain argmin, and its gradient is
    ``∂Q/∂θ`` at the data's actions minus at the argmin's (detached)."""
    torch.manual_seed(0)
    q = build_network("PICNN", 4, 2, [16, 16], "tanh", 0.01, True).double()
    batch = _batch()
    layer = ArgminLayer(q, LOW, HIGH, tol=1e-12)
    gap, fail = conservative_gap(q, layer, batch)
    assert fail == 0.0 and float(gap.detach()) >= 0.0
    (grad,) = torch.autograd.grad(gap, [next(q.parameters())])
    u_star = layer(batch.obs, grad_mode="none", w0=batch.act.numpy())[0]  # the same solve
    ref = (q(batch.obs, batch.act) - q(batch.obs, u_star)).mean()
    (want,) = torch.autograd.grad(ref, [next(q.parameters())])
    torch.testing.assert_close(grad, want, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------
# A run
# ---------------------------------------------------------------------------------------

TINY_OFFLINE = [
    "train.steps=40",
    "train.batch_size=16",
    "train.eval_every=20",
    "train.eval_episodes=1",
    "train.checkpoint_every=10",
    "train.log_every=10",
    "train.behaviour_steps=50",
    "model.learn=false",
]


@pytest.fixture(scope="module")
def ip_dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "ip"
    rng = np.random.default_rng(0)
    collect(make_env("InvertedPendulum-v5", seed=0), lambda o: rng.uniform(-3, 3, 1), 400, out, seed=0)
    return out


def _offline(run_dir: Path, dataset: Path, *sets: str):
    sets = [f"run_dir={run_dir}", f'train.dataset="{dataset}"', *TINY_OFFLINE, *sets]
    return load_config(ROOT / "launch" / "inverted_pendulum_offline.toml", sets)


def test_an_offline_run_with_both_trains_resumes_bit_identical_and_controls_with_the_penalty(tmp_path, ip_dataset):
    both = ["train.behaviour_weight=1.0", "train.conservative_weight=0.5"]
    straight = train(_offline(tmp_path / "a", ip_dataset, *both), progress=False)
    ckpt = load_checkpoint(tmp_path / "a" / "policy.pt")
    assert ckpt["behaviour"]["weight"] == 1.0
    ctrl = Controller.from_checkpoint(tmp_path / "a" / "policy.pt")
    assert isinstance(ctrl.q, BehaviourRegularizedQ)
    obs = make_env("InvertedPendulum-v5", seed=0).reset(seed=0)[0]
    u, _ = ctrl.act(obs)
    with torch.no_grad():  # the controller's action minimises Q̃, not Q
        grid = torch.linspace(-3, 3, 601, dtype=torch.float64)[:, None]
        qt = ctrl.q(torch.tensor(obs).repeat(601, 1), grid)
    assert abs(float(u[0]) - float(grid[qt.argmin(), 0])) <= 0.011
    b = tmp_path / "b"
    train(_offline(b, ip_dataset, *both), progress=False, stop_at=25)
    resumed = train(_offline(b, ip_dataset, *both), resume=True, progress=False)
    assert resumed.eval_returns == straight.eval_returns
    assert_same_run(tmp_path / "a", b)


@pytest.mark.parametrize(
    "sets", [["train.target=residual"], ["train.target_horizon=3", "model.learn=true", "train.n_step=1"]]
)
def test_behaviour_weight_with_residual_or_plan_targets_is_refused(tmp_path, ip_dataset, sets):
    with pytest.raises(ConfigError, match=r"train\.behaviour_weight"):
        train(_offline(tmp_path / "r", ip_dataset, "train.behaviour_weight=1.0", *sets), progress=False)


@pytest.mark.parametrize("name", ["behaviour_weight", "conservative_weight"])
def test_offline_terms_online_are_refused(tmp_path, name):
    cfg = load_config(ROOT / "launch" / "inverted_pendulum.toml", [f"run_dir={tmp_path}", f"train.{name}=1.0"])
    with pytest.raises(ConfigError, match=f"train.mode = 'offline' with train.{name}"):
        train(cfg, progress=False)


def test_the_value_scale_is_the_residual_scale_over_the_root_of_the_datas_cost_to_go(tmp_path, ip_dataset):
    """``train.behaviour_scale = "value"``: the same clone as ``residual`` (the same seed), its scale
    divided by √V, V the dataset's mean |cost-to-go| in Q's units (cost_scale, gamma of the run)."""
    from qmpc.data import ReplayBuffer, load_minari

    scales = {}
    for name in ("residual", "value"):
        sets = ["train.behaviour_weight=1.0", f"train.behaviour_scale={name}", "train.steps=8"]
        train(_offline(tmp_path / name, ip_dataset, *sets), progress=False)
        scales[name] = load_checkpoint(tmp_path / name / "policy.pt")["behaviour"]["state"]["pen_scale"].numpy()
    cfg = _offline(tmp_path / "x", ip_dataset)
    data = load_minari(ip_dataset, 4, 1, "InvertedPendulum-v5")
    buf = ReplayBuffer(4, 1, len(data["cost"]))
    buf.add_many(data["obs"], data["act"], data["cost"] * cfg.train.cost_scale, data["next_obs"], data["terminated"])
    v = buf.mean_cost_to_go(cfg.train.gamma)
    assert 0 < v < 10 * cfg.train.cost_scale  # random IP episodes last a few steps
    np.testing.assert_allclose(scales["value"] * np.sqrt(v), scales["residual"], rtol=1e-12)
