"""Single shooting: the closed-form model derivatives and the condensed exact Hessian against
CasADi's automatic differentiation and central finite differences, and the same solutions as
multiple shooting."""

import casadi as ca
import numpy as np
import pytest
import torch

import qmpc
from qmpc.dynamics import DynamicsModel
from qmpc.networks import ACTIVATIONS
from qmpc.problem import CasadiStageDerivatives, ControlProblem, MPCSpec

NX, NU = 4, 2


def _model(activation: str = "silu", seed: int = 0) -> DynamicsModel:
    torch.manual_seed(seed)
    m = DynamicsModel(NX, NU, [16, 12], activation).double()
    x = torch.randn(200, NX, dtype=torch.float64)
    m.fit_normalization(x, 1.3 * x + 0.2 + 0.1 * torch.randn(200, NX, dtype=torch.float64))
    return m


def _stage_cost() -> ca.Function:
    """A 3-argument cost (reads the state after the step, like most gymnasium rewards)."""
    x, u, xn = ca.SX.sym("x", NX), ca.SX.sym("u", NU), ca.SX.sym("xn", NX)
    c = ca.sumsqr(xn) + 0.1 * ca.sumsqr(u) + ca.sin(x[0]) * xn[1] + x[2] * u[0] ** 2
    return ca.Function("c", [x, u, xn], [c])


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_mlp_stage_derivatives_match_autodiff(activation):
    m = _model(activation)
    K = 5
    rng = np.random.default_rng(1)
    X, U, M = rng.normal(size=(K, NX)), rng.normal(size=(K, NU)), rng.normal(size=(K, NX))
    A, B, hess = m.stage_derivatives()(X, U, None)
    A2, B2, hess2 = CasadiStageDerivatives(m.casadi_function(), K)(X, U, None)
    H, H2 = hess(M), hess2(M)
    assert A.shape == (K, NX, NX) and B.shape == (K, NX, NU) and H.shape == (K, NX + NU, NX + NU)
    for a, b in ((A, A2), (B, B2), (H, H2)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12 * max(1.0, np.abs(b).max()))
    # and the model's own Jacobian against central differences of the twin
    f, e = m.casadi_function(), 1e-6
    for j in range(NX):
        d = np.zeros(NX)
        d[j] = e
        fd = (np.array(f(X[0] + d, U[0])) - np.array(f(X[0] - d, U[0]))).ravel() / (2 * e)
        np.testing.assert_allclose(A[0, :, j], fd, atol=1e-7)


def _problem(derivs: str, n_p: int = 0, discount: float = 0.9, horizon: int = 4) -> ControlProblem:
    torch.manual_seed(0)
    q = qmpc.PICNN(NX, NU, hidden=(8, 8))
    m = _model()
    if n_p:  # a time-varying model: x⁺ = f(x, u) + p
        x, u, p = ca.MX.sym("x", NX), ca.MX.sym("u", NU), ca.MX.sym("p", n_p)
        dyn = ca.Function("f", [x, u, p], [m.casadi_function()(x, u) + p])
    else:
        dyn = m.casadi_function()
    return ControlProblem(
        q.double().casadi_function(),
        MPCSpec(
            -np.ones(NU),
            np.ones(NU),
            horizon=horizon,
            dynamics=dyn,
            stage_cost=_stage_cost(),
            discount=discount,
            dynamics_params=n_p,
            shooting="single",
            dynamics_derivatives=m.stage_derivatives() if derivs == "closed form" else None,
        ),
    ), q


@pytest.mark.parametrize(("derivs", "n_p"), [("closed form", 0), ("autodiff", 0), ("autodiff", NX)])
def test_condensed_hessian_matches_autodiff_and_finite_differences(derivs, n_p):
    P, q = _problem(derivs, n_p)
    assert P.n_w == P.horizon * NU and P.n_g == 0
    rng = np.random.default_rng(2)
    theta = np.concatenate(
        [torch.cat([t.detach().reshape(-1) for t in q.parameters()]).numpy(), 0.1 * rng.normal(size=P.N * n_p)]
    )
    x0, w = rng.normal(size=NX), rng.uniform(-1, 1, P.n_w)
    p = np.concatenate([x0, theta])
    H = np.array(P.hess_lag(w, p, 2.0, ca.DM(0, 1)))
    ref = ca.Function("ref", [P.nlp["x"], P.nlp["p"]], [ca.hessian(P.nlp["f"], P.nlp["x"])[0]])
    H_ad = 2.0 * np.array(ref(w, p))
    np.testing.assert_allclose(H, H_ad, atol=1e-11 * max(1.0, np.abs(H_ad).max()))
    np.testing.assert_allclose(H, H.T, atol=1e-14)
    # central differences of the gradient
    e = 1e-6
    fd = np.empty_like(H)
    for j in range(P.n_w):
        d = np.zeros(P.n_w)
        d[j] = e
        gp = np.array(P.first_order(w + d, x0, theta, ca.DM(0, 1))[0]).ravel()
        gm = np.array(P.first_order(w - d, x0, theta, ca.DM(0, 1))[0]).ravel()
        fd[:, j] = (gp - gm) / (2 * e)
    np.testing.assert_allclose(H / 2.0, fd, atol=1e-6 * max(1.0, np.abs(fd).max()))
    # the second-order function the solver's adjoint uses is the same Hessian
    np.testing.assert_allclose(np.array(P.second_order(w, x0, theta, ca.DM(0, 1))[0]), H / 2.0, atol=1e-14)
    # the rolled-out states
    xs = np.array(P.states(w, x0, theta)).reshape(P.N, NX)
    assert np.isfinite(xs).all() and xs.shape == (P.N, NX)


def test_condensed_hessian_with_the_closed_form_q():
    """The controller's problem (weights baked in, Q's derivatives in closed form) has the same
    Hessian as the symbolic one."""
    torch.manual_seed(0)
    q = qmpc.PICNN(NX, NU, hidden=(8, 8)).double()
    m = _model()
    kw = {"horizon": 4, "dynamics": m.casadi_function(), "stage_cost": _stage_cost(), "discount": 0.9}
    kw.update(shooting="single", dynamics_derivatives=m.stage_derivatives())
    spec = MPCSpec(-np.ones(NU), np.ones(NU), **kw)
    P = ControlProblem(q.casadi_function(), spec)
    Pb = ControlProblem(q.casadi_function(baked=True), spec, q_derivatives=q.numpy_derivatives())
    rng = np.random.default_rng(4)
    x0, w = rng.normal(size=NX), rng.uniform(-1, 1, P.n_w)
    H = np.array(P.hess_lag(w, np.concatenate([x0, q.flat_parameters()]), 1.0, ca.DM(0, 1)))
    Hb = np.array(Pb.hess_lag(w, x0, 1.0, ca.DM(0, 1)))
    np.testing.assert_allclose(Hb, H, atol=1e-12 * max(1.0, np.abs(H).max()))


def test_single_and_multiple_shooting_find_the_same_plan():
    m = _model()
    torch.manual_seed(0)
    q = qmpc.PICNN(NX, NU, hidden=(8, 8))
    x, u, xn = ca.SX.sym("x", NX), ca.SX.sym("u", NU), ca.SX.sym("xn", NX)
    cost = ca.Function("c", [x, u, xn], [ca.sumsqr(xn) + 0.1 * ca.sumsqr(u)])
    kw = {"dynamics": m.casadi_function(), "stage_cost": cost, "horizon": 4, "discount": 0.9, "tol": 1e-10}
    single = qmpc.Controller(q, -np.ones(NU), np.ones(NU), dynamics_derivatives=m.stage_derivatives(), **kw)
    multiple = qmpc.Controller(q, -np.ones(NU), np.ones(NU), shooting="multiple", **kw)
    assert single.problem.shooting == "single"
    rng = np.random.default_rng(3)
    for _ in range(5):
        x = rng.normal(size=NX)
        single.reset(), multiple.reset()  # the same (cold) start: the model makes the problem nonconvex
        a1, i1 = single.act(x)
        a2, i2 = multiple.act(x)
        assert not i1["fallback"] and not i2["fallback"]
        np.testing.assert_allclose(a1, a2, atol=1e-7)
        np.testing.assert_allclose(i1["value"], i2["value"], rtol=1e-10)
    plan = single.plan()
    assert plan["actions"].shape == (1, 4, NU) and plan["states"].shape == (1, 3, NX)


def test_single_shooting_has_no_sensitivities():
    torch.manual_seed(0)
    q = qmpc.PICNN(NX, NU, hidden=(8, 8))
    m = _model()
    kw = {"horizon": 3, "dynamics": m.casadi_function(), "stage_cost": _stage_cost(), "shooting": "single"}
    with pytest.raises(qmpc.InputError, match="grad_mode='none' with shooting='single'"):
        qmpc.ArgminLayer(q, -1.0, 1.0, **kw)
    layer = qmpc.ArgminLayer(q, -1.0, 1.0, grad_mode="none", **kw)
    u, v = layer(torch.zeros(2, NX))
    assert u.shape == (2, NU) and torch.isfinite(v).all()
    with pytest.raises(qmpc.InputError, match="grad_mode='none' with shooting='single'"):
        layer(torch.zeros(2, NX), grad_mode="implicit")
    with pytest.raises(qmpc.InputError, match="shooting in"):
        qmpc.ArgminLayer(q, -1.0, 1.0, grad_mode="none", **{**kw, "shooting": "double"})
    with pytest.raises(qmpc.InputError, match=r"problem\.states"):
        layer.problem.x_slice(1)


def test_diverging_rollout_is_a_counted_failure(capfd):
    """A model whose rollout overflows (x⁺ = 1e30·x): the step fails or falls back, is counted,
    stays in bounds, and nothing is printed (CasADi's NaN warnings are off)."""
    torch.manual_seed(0)
    q = qmpc.PICNN(NX, NU, hidden=(8, 8))
    x, u = ca.MX.sym("x", NX), ca.MX.sym("u", NU)
    f = ca.Function("f", [x, u], [1e30 * x + ca.vertcat(u, u)])
    c = ca.Function("c", [x, u], [ca.sumsqr(x) + ca.sumsqr(u)])
    ctrl = qmpc.Controller(q, -np.ones(NU), np.ones(NU), horizon=10, dynamics=f, stage_cost=c, shooting="single")
    for _ in range(2):
        a, _info = ctrl.act(np.ones(NX))
        assert np.isfinite(a).all() and (np.abs(a) <= 1).all()
    assert ctrl.stats["steps"] == 2 and ctrl.stats["fallback"] == ctrl.stats["failed"] >= 1
    out, err = capfd.readouterr()
    assert "NaN" not in err and "NaN" not in out
