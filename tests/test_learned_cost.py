"""The learned stage cost and termination (issue 18, item 3): the heads' twins and closed-form
derivatives, the survival-weighted plan objective, and planning on a task without a symbolic cost."""

from __future__ import annotations

from pathlib import Path

import casadi as ca
import numpy as np
import pytest
import torch

import qmpc
from qmpc.checkpoint import CheckpointError, load_checkpoint, outcome_from_checkpoint, save_checkpoint
from qmpc.cli import main
from qmpc.config import config_from_dict
from qmpc.controller import Controller
from qmpc.dynamics import OutcomeModel
from qmpc.env import make_env
from qmpc.problem import ControlProblem, MPCSpec
from qmpc.trainer import train

NX, NU = 3, 2


def _heads(activation: str = "silu") -> tuple[OutcomeModel, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    m = OutcomeModel(NX, NU, hidden=(8, 6), activation=activation).double()
    x, u, xn = (torch.randn(40, n, dtype=torch.float64, generator=g) for n in (NX, NU, NX))
    m.fit_normalization(2.0 * x + 0.5, 3.0 * torch.randn(40, dtype=torch.float64, generator=g) - 1.0)
    return m, x, u, xn


@pytest.mark.parametrize("activation", ["silu", "tanh"])
def test_heads_twins_and_closed_form_derivatives(activation):
    m, x, u, xn = _heads(activation)
    with torch.no_grad():
        c, p = m.cost(x, u, xn).numpy(), m.termination(x, u, xn).numpy()
    fc, fp = m.cost_function(), m.termination_function()
    assert fc.name_in() == ["x", "u", "x_next"] and fc.name_out() == ["c"] and fp.name_out() == ["p"]
    X, U, Xn = x.numpy(), u.numpy(), xn.numpy()
    twin_c = np.array([float(fc(X[i], U[i], Xn[i])) for i in range(len(X))])
    twin_p = np.array([float(fp(X[i], U[i], Xn[i])) for i in range(len(X))])
    np.testing.assert_allclose(twin_c, c, rtol=0, atol=1e-10)
    np.testing.assert_allclose(twin_p, p, rtol=0, atol=1e-10)
    assert ((p > 0) & (p < 1)).all()
    Z = np.concatenate([X, U, Xn], axis=1)[:5]
    eps = 1e-6
    for derivatives, ref in ((m.cost_derivatives(), c), (m.termination_derivatives(), p)):

        def value_grad(Zb, derivatives=derivatives):
            v, g, H = derivatives(Zb[:, :NX], Zb[:, NX : NX + NU], Zb[:, NX + NU :])
            return v, g, H

        v, g, H = value_grad(Z)
        np.testing.assert_allclose(v, ref[:5], rtol=0, atol=1e-12)
        for j in range(Z.shape[1]):
            d = np.zeros(Z.shape[1])
            d[j] = eps
            vp, gp, _ = value_grad(Z + d)
            vm, gm, _ = value_grad(Z - d)
            np.testing.assert_allclose(g[:, j], (vp - vm) / (2 * eps), rtol=1e-6, atol=1e-7)
            np.testing.assert_allclose(H[:, :, j], (gp - gm) / (2 * eps), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(H, np.swapaxes(H, 1, 2), atol=1e-12)


def test_heads_derivatives_along_directions_and_without_hessian():
    """``directions=D``: the Hessian along them, ``Dᵀ ∇² D``; ``hessian=False``: the same value and
    gradient, no Hessian (what the H-step targets' plans ask of the heads)."""
    m, x, u, xn = _heads("silu")
    X, U, Xn = x.numpy()[:6], u.numpy()[:6], xn.numpy()[:6]
    D = np.random.default_rng(3).normal(size=(6, 2 * NX + NU, 4))
    for derivatives in (m.cost_derivatives(), m.termination_derivatives()):
        v, g, H = derivatives(X, U, Xn)
        v2, g2, H2 = derivatives(X, U, Xn, directions=D)
        np.testing.assert_array_equal(v, v2)
        np.testing.assert_array_equal(g, g2)
        np.testing.assert_allclose(H2, np.swapaxes(D, 1, 2) @ H @ D, rtol=1e-12, atol=1e-12)
        v3, g3, H3 = derivatives(X, U, Xn, hessian=False)
        np.testing.assert_array_equal(v, v3)
        np.testing.assert_allclose(g3, g, rtol=0, atol=1e-15)
        assert H3 is None


def _problem_parts():
    x, u, xn = ca.SX.sym("x", NX), ca.SX.sym("u", NU), ca.SX.sym("x_next", NX)
    A = np.array([[1.0, 0.1, 0.0], [0.0, 0.9, 0.2], [0.1, 0.0, 0.95]])
    B = np.array([[0.0, 0.1], [0.3, 0.0], [0.1, 0.2]])
    f = ca.Function("f", [x, u], [ca.mtimes(A, x) + ca.mtimes(B, u) + 0.05 * ca.sin(x)], ["x", "u"], ["x_next"])
    c = ca.Function("c", [x, u, xn], [ca.sumsqr(xn) + 0.1 * ca.sumsqr(u) + 0.2 * x[0]], ["x", "u", "x_next"], ["c"])
    tau = ca.Function(
        "tau", [x, u, xn], [1.0 / (1.0 + ca.exp(-(xn[0] + 0.5 * u[1] - 0.3)))], ["x", "u", "x_next"], ["p"]
    )
    theta = ca.SX.sym("theta", 2)
    q = ca.Function("q", [x, u, theta], [theta[0] * ca.sumsqr(x) + theta[1] * ca.sumsqr(u) + x[1] * u[0]])
    return f, c, tau, q


def _numpy_objective(f, c, tau, q, us, x0, theta, gamma, with_tau=True):
    xs, J, s = [x0], 0.0, 1.0
    for k in range(len(us) - 1):
        xs.append(np.array(f(xs[k], us[k])).ravel())
        J += gamma**k * s * float(c(xs[k], us[k], xs[k + 1]))
        if with_tau:
            s *= 1.0 - float(tau(xs[k], us[k], xs[k + 1]))
    return J + gamma ** (len(us) - 1) * s * float(q(xs[-1], us[-1], theta))


def test_survival_weighted_objective_and_its_hessian():
    f, c, tau, q = _problem_parts()
    rng = np.random.default_rng(0)
    x0, theta, us = rng.normal(size=NX), np.array([0.7, 0.3]), rng.uniform(-1, 1, size=(4, NU))
    gamma = 0.9
    J_ref = _numpy_objective(f, c, tau, q, us, x0, theta, gamma)
    for shooting in ("multiple", "single"):
        spec = MPCSpec(-np.ones(NU), np.ones(NU), 4, f, c, gamma, shooting=shooting, termination=tau)
        P = ControlProblem(q, spec)
        w = us.ravel()
        if shooting == "multiple":
            xs, xk = [], x0
            for k in range(3):
                xk = np.array(f(xk, us[k])).ravel()
                xs.append(xk)
            w = np.concatenate([w, *xs])
        assert float(P.objective(w, x0, theta)) == pytest.approx(J_ref, rel=1e-13, abs=1e-13)
    # single shooting: the condensed Hessian with survival weights against differences of the gradient
    _, _, H = (np.array(a) for a in P.plan_derivatives(us.ravel(), x0, theta))
    eps = 1e-6
    for j in range(us.size):
        d = np.zeros(us.size)
        d[j] = eps
        gp = np.array(P.plan_derivatives(us.ravel() + d, x0, theta)[1]).ravel()
        gm = np.array(P.plan_derivatives(us.ravel() - d, x0, theta)[1]).ravel()
        np.testing.assert_allclose(H[:, j], (gp - gm) / (2 * eps), rtol=1e-6, atol=1e-7)
    hl = np.array(P.hess_lag(us.ravel(), np.concatenate([x0, theta]), 2.0, np.zeros(0)))
    np.testing.assert_allclose(hl, 2.0 * H, rtol=1e-14, atol=1e-14)


def _casadi_hessian(P: ControlProblem) -> ca.Function:
    w, x0, th = ca.MX.sym("w", P.n_w), ca.MX.sym("x0", P.nx), ca.MX.sym("th", P.n_theta)
    return ca.Function("ref", [w, x0, th], [ca.densify(ca.hessian(P.objective(w, x0, th), w)[0])])


@pytest.mark.parametrize("closed_forms", [False, True])
def test_survival_weighted_condensed_hessian_is_casadis_exact_hessian(closed_forms):
    """The callback's survival weights (``_SurvivalWeights``) against CasADi's Hessian of the whole
    ``J``: with the learned heads' derivatives by CasADi inside the graph, and by their closed forms
    in the callback; at plans where a stage's termination is near certain too (finite, exact)."""
    f, _, _, q = _problem_parts()
    heads = _heads("silu")[0]
    with torch.no_grad():  # confident logits: some stages all but certain to terminate, others not at all
        last = [m for m in heads.term_net if isinstance(m, torch.nn.Linear)][-1]
        last.weight.mul_(40.0)
    extra = {}
    if closed_forms:
        extra = {
            "stage_cost_derivatives": heads.cost_derivatives(),
            "termination_derivatives": heads.termination_derivatives(),
        }
    spec = MPCSpec(
        -3 * np.ones(NU), 3 * np.ones(NU), 4, f, heads.cost_function(), 0.9, shooting="single",
        termination=heads.termination_function(), **extra,
    )  # fmt: skip
    P = ControlProblem(q, spec)
    ref = _casadi_hessian(P)
    rng = np.random.default_rng(2)
    theta = np.array([0.6, 0.2])
    ps = []
    for scale in (0.5, 1.0, 3.0, 10.0):
        for _ in range(5):
            x0, w = scale * rng.normal(size=NX), rng.uniform(-3, 3, P.n_w)
            H = np.array(P.plan_derivatives(w, x0, theta)[2])
            Hr = np.array(ref(w, x0, theta))
            assert np.isfinite(H).all()
            np.testing.assert_allclose(H, Hr, rtol=1e-9, atol=1e-9 * max(1.0, np.abs(Hr).max()))
            xs = [x0]
            for k in range(3):
                xs.append(np.array(f(xs[k], w[k * NU : (k + 1) * NU])).ravel())
            ps += [float(spec.termination(xs[k], w[k * NU : (k + 1) * NU], xs[k + 1])) for k in range(3)]
    assert min(ps) < 0.05 and max(ps) > 0.95  # both regimes were exercised


def test_survival_weighted_hessian_where_a_step_is_certain_to_terminate():
    """``p = u_0² / 9`` reaches 1 at the bound ``u_0 = 3`` with a gradient that does not vanish: the
    condensed Hessian (products of ``1 − p``, no division) against CasADi's Hessian of ``J`` on the
    bound, next to it and inside (a log-survival form with ``1 − p`` clamped was off by 10 there)."""
    f, c, _, q = _problem_parts()
    x, u, xn = ca.SX.sym("x", NX), ca.SX.sym("u", NU), ca.SX.sym("x_next", NX)
    tau = ca.Function("tau", [x, u, xn], [u[0] ** 2 / 9.0 + 0 * xn[0]], ["x", "u", "x_next"], ["p"])
    spec = MPCSpec(-3 * np.ones(NU), 3 * np.ones(NU), 4, f, c, 0.9, shooting="single", termination=tau)
    P = ControlProblem(q, spec)
    ref = _casadi_hessian(P)
    rng = np.random.default_rng(4)
    theta, x0 = np.array([0.6, 0.2]), rng.normal(size=NX)
    for u0 in (3.0, 3.0 - 1e-13, 3.0 - 1e-7, 1.5):
        for stage in range(3):
            w = rng.uniform(-2, 2, P.n_w)
            w[stage * NU] = u0
            H, Hr = np.array(P.plan_derivatives(w, x0, theta)[2]), np.array(ref(w, x0, theta))
            np.testing.assert_allclose(H, Hr, rtol=1e-9, atol=1e-9 * max(1.0, np.abs(Hr).max()))


def test_without_termination_the_problem_is_unchanged():
    """``termination=None`` keeps the separable objective and its condensed Hessian; a termination
    that is identically 0 gives the same objective, gradient and Hessian through the survival weights."""
    f, c, _, q = _problem_parts()
    x, u, xn = ca.SX.sym("x", NX), ca.SX.sym("u", NU), ca.SX.sym("x_next", NX)
    zero = ca.Function("zero", [x, u, xn], [ca.SX(0.0)], ["x", "u", "x_next"], ["p"])
    rng = np.random.default_rng(1)
    x0, theta, us = rng.normal(size=NX), np.array([0.5, 0.4]), rng.uniform(-1, 1, size=(4, NU))
    spec = MPCSpec(-np.ones(NU), np.ones(NU), 4, f, c, 0.95, shooting="single")
    P0, P1 = ControlProblem(q, spec), ControlProblem(q, spec.replace(termination=zero))
    assert P1._condensed.survival and not P0._condensed.survival
    assert float(P0.objective(us.ravel(), x0, theta)) == pytest.approx(
        _numpy_objective(f, c, None, q, us, x0, theta, 0.95, with_tau=False), rel=1e-13
    )
    for a, b in zip(
        P0.plan_derivatives(us.ravel(), x0, theta), P1.plan_derivatives(us.ravel(), x0, theta), strict=True
    ):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-12, atol=1e-12)
    with pytest.raises(qmpc.InputError, match="termination"):
        bad = ca.Function("bad", [x, u], [ca.SX(0.0)])
        ControlProblem(q, spec.replace(termination=bad))


def test_layer_refuses_gradients_with_termination():
    f, c, tau, _ = _problem_parts()
    torch.manual_seed(0)
    net = qmpc.PICNN(NX, NU, hidden=(8,))
    kw = {"horizon": 3, "dynamics": f, "stage_cost": c, "termination": tau}
    with pytest.raises(qmpc.InputError, match="termination"):
        qmpc.ArgminLayer(net, -1.0, 1.0, **kw)
    layer = qmpc.ArgminLayer(net, -1.0, 1.0, grad_mode="none", **kw)
    u, v = layer(torch.zeros(2, NX))
    assert u.shape == (2, NU) and torch.isfinite(v).all()


@pytest.fixture(scope="module")
def hopper_run(tmp_path_factory):
    """A tiny Hopper-v5 run (no symbolic stage cost) with the learned model and heads."""
    root = tmp_path_factory.mktemp("hopper")
    cfg = config_from_dict(
        {
            "seed": 0,
            "run_dir": str(root / "run"),
            "env": {"id": "Hopper-v5"},
            "network": {"arch": "PICNN", "hidden": [8]},
            "model": {"learn": True, "hidden": [16]},
            "train": {
                "steps": 200,
                "batch_size": 16,
                "learning_starts": 100,
                "eval_every": 200,
                "eval_episodes": 1,
                "cost_scale": 0.5,
            },
        }
    )
    train(cfg, progress=False)
    return root / "run"


def test_training_saves_and_reloads_the_heads(hopper_run):
    full, policy = load_checkpoint(hopper_run / "checkpoint.pt"), load_checkpoint(hopper_run / "policy.pt")
    assert "outcome" in full and "outcome_optimizer" in full and full["loop"]["outcome_ready"]
    assert "outcome" in policy and "outcome_optimizer" not in policy
    heads = outcome_from_checkpoint(policy)
    # the heads learned the buffer's costs (Q's units) better than their mean
    buf = full["buffer"]
    n = int(full["loop"]["step"])
    X, U, C, Xn = (np.asarray(buf[k][:n], np.float64) for k in ("obs", "act", "cost", "next_obs"))
    with torch.no_grad():
        pred = heads.cost(*(torch.from_numpy(a) for a in (X, U, Xn))).numpy()
    assert np.mean((pred - C) ** 2) < np.var(C)


def test_controller_plans_with_the_learned_cost_on_hopper(hopper_run):
    path = hopper_run / "policy.pt"
    with pytest.raises(qmpc.InputError, match="symbolic stage cost"):
        Controller.from_checkpoint(path, horizon=3, model="learned", stage_cost="symbolic")
    ctrl = Controller.from_checkpoint(path, horizon=3, model="learned", stage_cost="learned")
    spec = ctrl.problem.spec
    assert spec.termination is not None and ctrl.problem.shooting == "single"
    heads = outcome_from_checkpoint(load_checkpoint(path))
    z = (np.full(11, 0.1), np.full(3, 0.2), np.full(11, -0.1))
    # the learned cost is in Q's units already: not multiplied by cost_scale (0.5) again
    assert float(spec.stage_cost(*z)) == float(heads.cost_function()(*z))
    env = make_env("Hopper-v5", seed=0)
    obs, _ = env.reset(seed=0)
    for _ in range(20):
        a, info = ctrl.act(obs)
        assert not info["fallback"] and np.isfinite(info["value"])
        obs, _, term, trunc, _ = env.step(a)
        if term or trunc:
            obs, _ = env.reset()
            ctrl.reset()
    assert ctrl.stats["fallback"] == 0 and ctrl.stats["steps"] == 20
    # auto: learned where there is no symbolic cost
    assert Controller.from_checkpoint(path, horizon=3, model="learned").problem.spec.stage_cost.name() == "learned_cost"


def test_the_plans_termination_is_chosen_by_its_source(hopper_run):
    """``termination``: ``auto`` and ``learned`` weigh the plan by the heads' termination, ``none``
    ignores it; ``learned`` on a checkpoint without heads is an error, ``auto`` plans without."""
    path = hopper_run / "policy.pt"
    kw = {"horizon": 3, "model": "learned"}
    for source, weighted in (("auto", True), ("learned", True), ("none", False)):
        spec = Controller.from_checkpoint(path, termination=source, **kw).problem.spec
        assert (spec.termination is not None) == weighted and spec.stage_cost.name() == "learned_cost"
    with pytest.raises(qmpc.InputError, match=r"expected termination in \('auto', 'learned', 'none'\), got 'yes'"):
        Controller.from_checkpoint(path, termination="yes", **kw)
    ip = Path(__file__).resolve().parents[1] / "models" / "inverted_pendulum.pt"  # no heads, symbolic cost
    with pytest.raises(CheckpointError, match="stage cost and termination"):
        Controller.from_checkpoint(ip, horizon=3, model="learned", termination="learned")
    assert Controller.from_checkpoint(ip, horizon=3, model="learned").problem.spec.termination is None


def test_checkpoint_without_heads_is_a_clear_error(hopper_run, tmp_path):
    ckpt = load_checkpoint(hopper_run / "policy.pt")
    del ckpt["outcome"]
    old = tmp_path / "old.pt"
    save_checkpoint(old, ckpt)
    with pytest.raises(CheckpointError, match="stage cost and termination") as e:
        Controller.from_checkpoint(old, horizon=3, model="learned", stage_cost="learned")
    assert "\n" not in str(e.value)
    Controller.from_checkpoint(old, horizon=1)  # the greedy controller needs neither


def test_run_cli_with_the_learned_stage_cost(hopper_run, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["run", str(hopper_run / "policy.pt"), "--episodes", "1", "--horizon", "3", "--model", "learned"]
    assert main([*args, "--stage-cost", "learned", "--budget-ms", "0"]) == 0
    assert "Hopper-v5" in capsys.readouterr().out
    assert main([*args, "--stage-cost", "symbolic"]) == 2
    assert "symbolic stage cost" in capsys.readouterr().err


@pytest.mark.parametrize(("model_steps", "head_steps"), [(2, 1), (1, 3)])
def test_model_and_heads_take_their_own_number_of_steps(tmp_path, model_steps, head_steps):
    """``model.updates_per_step`` Adam steps of the dynamics model and ``model.head_updates_per_step``
    of the heads per training step (on the same batches while both step), Q unchanged by either."""
    runs = {}
    for name, (m, h) in {"these": (model_steps, head_steps), "default": (4, 4)}.items():
        cfg = config_from_dict(
            {
                "seed": 0,
                "run_dir": str(tmp_path / name),
                "env": {"id": "Hopper-v5"},
                "network": {"arch": "PICNN", "hidden": [8]},
                "model": {"learn": True, "hidden": [16], "updates_per_step": m, "head_updates_per_step": h},
                "train": {"steps": 130, "batch_size": 16, "learning_starts": 100, "eval_every": 1000},
            }
        )
        train(cfg, progress=False)
        runs[name] = load_checkpoint(tmp_path / name / "checkpoint.pt")
    ck, learned = runs["these"], 130 - 100
    steps = {k: {int(s["step"]) for s in ck[k]["state"].values()} for k in ("model_optimizer", "outcome_optimizer")}
    assert steps == {"model_optimizer": {learned * model_steps}, "outcome_optimizer": {learned * head_steps}}
    for key in ("q", "q_target"):  # the model's batches have their own RNG
        for name, t in runs["default"][key].items():
            assert torch.equal(t, ck[key][name]), (key, name)
