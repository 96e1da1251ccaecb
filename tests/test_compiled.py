"""The compiled (numba) closed forms of the controller (issue 18): Q's value, gradient and Hessian
against the numpy closed forms, the plan's against CasADi's exact derivatives and finite
differences, the greedy Newton against CasADi's solver, the compiled SQP against
:func:`qmpc.boxsqp.solve_box_sqp`, and the safety nets: a compiled plan that disagrees with the
problem's CasADi functions is dropped with a warning, and without numba nothing changes."""

from __future__ import annotations

from pathlib import Path

import casadi as ca
import numpy as np
import pytest
import torch

import qmpc
from qmpc import compiled
from qmpc.boxsqp import solve_box_sqp
from qmpc.controller import Controller, _scaled_derivatives, scaled
from qmpc.costs import QuadraticStageCost, stage_cost, stage_cost_derivatives
from qmpc.dynamics import DynamicsModel, OutcomeModel
from qmpc.env import make_env
from qmpc.networks import PICNN
from qmpc.planner import Planner
from qmpc.problem import ControlProblem, MPCSpec
from qmpc.solver import SolverOptions

pytestmark = pytest.mark.skipif(not compiled.AVAILABLE, reason="numba is not installed")

NX, NU = 4, 2
LOW, HIGH = -np.ones(NU), np.ones(NU)


def _networks(layer_norm: bool = False, activation: str = "tanh", seed: int = 0):
    torch.manual_seed(seed)
    q = PICNN(NX, NU, hidden=(8, 6), activation=activation, layer_norm=layer_norm).double()
    if layer_norm:  # not the default scale and shift: the closed forms must carry them
        with torch.no_grad():
            for n in q.x_norm:
                n.weight.uniform_(0.5, 1.5), n.bias.uniform_(-0.3, 0.3)
    model = DynamicsModel(NX, NU, hidden=(8, 8), activation="silu").double()
    heads = OutcomeModel(NX, NU, hidden=(8, 6), activation="silu").double()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(50, NX, dtype=torch.float64, generator=g)
    model.fit_normalization(x, x + 0.1 * torch.randn(50, NX, dtype=torch.float64, generator=g))
    heads.fit_normalization(x, 2.0 * torch.randn(50, dtype=torch.float64, generator=g) - 1.0)
    return q, model, heads


def _plan_parts(model, heads, termination: bool = True) -> dict:
    parts = {
        "dynamics": model.casadi_function(),
        "dynamics_derivatives": model.stage_derivatives(),
        "stage_cost": heads.cost_function(),
        "stage_cost_derivatives": heads.cost_derivatives(),
    }
    if termination:
        parts.update(termination=heads.termination_function(), termination_derivatives=heads.termination_derivatives())
    return parts


def _problem(horizon: int, termination: bool = True, layer_norm: bool = False) -> ControlProblem:
    q, model, heads = _networks(layer_norm)
    spec = MPCSpec(LOW, HIGH, horizon, discount=0.9, shooting="single", **_plan_parts(model, heads, termination))
    return ControlProblem.of_network(q, spec, bake_weights=True)


@pytest.mark.parametrize(("layer_norm", "activation"), [(False, "tanh"), (True, "tanh"), (True, "silu")])
def test_picnn_kernel_is_the_numpy_closed_form(layer_norm, activation):
    q = _networks(layer_norm, activation)[0]
    numpy_form = q.numpy_batch_derivatives()
    layout = compiled.pack_of(numpy_form, "picnn")
    buf = compiled._Buffer()
    base = buf.add(layout)
    b, meta = buf.arrays()
    L, code, ln = layout["ints"]
    m, eps = layout["floats"]
    rng = np.random.default_rng(1)
    for _ in range(5):
        x, u = rng.normal(size=NX), rng.uniform(-1.5, 1.5, NU)
        qv, grad, H = numpy_form(x[None], u[None])
        eye = np.eye(NX + NU)
        out = compiled._picnn(b, meta, base, L, code, ln, m, eps, x, u, eye[:, :NX].copy(), eye[:, NX:].copy(), True)
        scale = max(1.0, np.abs(H).max())
        assert out[0] == pytest.approx(qv[0], abs=1e-12)
        np.testing.assert_allclose(np.concatenate(out[1:3]), grad[0], rtol=0, atol=1e-12)
        np.testing.assert_allclose(out[3], H[0], rtol=0, atol=1e-12 * scale)
        D = rng.normal(size=(NX + NU, 3))  # along directions: Dᵀ ∇²Q D
        along = compiled._picnn(b, meta, base, L, code, ln, m, eps, x, u, D[:NX].T.copy(), D[NX:].T.copy(), True)
        np.testing.assert_allclose(along[3], D.T @ H[0] @ D, rtol=0, atol=1e-11 * scale)
        # Q(x, ·) alone (the greedy Newton's oracle) against the batched action oracle
        V, C, S = compiled._picnn_constants(b, meta, base, L, code, ln, eps, x)
        qu, gu, Hu = compiled._picnn_u(b, meta, base, L, m, V, C, S, u, True)
        ref = q.action_oracle(x[None]).derivatives(u[None])
        assert qu == pytest.approx(ref[0][0], abs=1e-12)
        np.testing.assert_allclose(gu, ref[1][0], rtol=0, atol=1e-12)
        np.testing.assert_allclose(Hu, ref[2][0], rtol=0, atol=1e-12 * scale)


def _casadi_exact(P: ControlProblem) -> ca.Function:
    """CasADi's own AD of the problem's objective (no closed form anywhere)."""
    w, x0, th = ca.MX.sym("w", P.n_w), ca.MX.sym("x0", P.nx), ca.MX.sym("th", P.n_theta)
    J = P.objective(w, x0, th)
    H, g = ca.hessian(J, w)
    return ca.Function("exact", [w, x0, th], [J, g, ca.densify(H)])


@pytest.mark.parametrize(
    ("horizon", "termination", "layer_norm"), [(2, True, False), (3, True, True), (3, False, False)]
)
def test_compiled_plan_is_casadis_exact_plan(horizon, termination, layer_norm):
    _assert_compiled_plan_is_exact(_problem(horizon, termination, layer_norm), seed=2)


def _assert_compiled_plan_is_exact(P: ControlProblem, seed: int, states: int = 5) -> None:
    """The problem's compiled plan = CasADi's AD of its objective (value, gradient, Hessian) at
    random plans and states, and = central differences of its own value and gradient."""
    cp = P.compiled_plan
    assert cp is not None
    exact = _casadi_exact(P)
    rng = np.random.default_rng(seed)
    for _ in range(states):
        x0, w = rng.normal(size=NX), rng.uniform(-1, 1, P.n_w)
        J, g, H = (np.asarray(a, np.float64) for a in exact(w, x0, []))
        J = J.item()
        Jc, gc, Hc = cp.derivatives(w, x0)
        assert Jc == pytest.approx(J, rel=1e-12, abs=1e-12)
        assert cp.value(w, x0) == pytest.approx(J, rel=1e-12, abs=1e-12)
        np.testing.assert_allclose(gc, g.ravel(), rtol=0, atol=1e-11)
        np.testing.assert_allclose(cp.first_order(w, x0)[1], g.ravel(), rtol=0, atol=1e-11)
        np.testing.assert_allclose(Hc, H, rtol=0, atol=1e-10 * max(1.0, np.abs(H).max()))
        eps = 1e-6  # and finite differences of the compiled value and gradient
        for j in range(P.n_w):
            e = np.zeros(P.n_w)
            e[j] = eps
            fd = (cp.value(w + e, x0) - cp.value(w - e, x0)) / (2 * eps)
            assert fd == pytest.approx(gc[j], abs=1e-7)
            fd_g = (cp.first_order(w + e, x0)[1] - cp.first_order(w - e, x0)[1]) / (2 * eps)
            np.testing.assert_allclose(fd_g, Hc[j], rtol=0, atol=1e-6)


def _quadratic_cost(seed: int = 3) -> QuadraticStageCost:
    rng = np.random.default_rng(seed)
    n3 = 2 * NX + NU
    return QuadraticStageCost("quad", NX, NU, rng.normal(size=n3), rng.uniform(0.0, 1.0, n3), float(rng.normal()))


def test_quadratic_stage_cost_closed_form_is_casadis():
    """:class:`~qmpc.costs.QuadraticStageCost`'s closed form (scaled as a controller scales it) =
    CasADi's AD of its function: value, gradient, Hessian, the Hessian along directions; and
    HalfCheetah-v5's (:func:`~qmpc.costs.stage_cost_derivatives`) = its symbolic stage cost."""
    cost = _quadratic_cost()
    f = scaled(cost.function(), 0.1)
    z = ca.MX.sym("z", 2 * NX + NU)
    c = f(z[:NX], z[NX : NX + NU], z[NX + NU :])
    H, g = ca.hessian(c, z)
    exact = ca.Function("exact", [z], [c, g, H])
    rng = np.random.default_rng(4)
    Z = rng.normal(size=(6, 2 * NX + NU))
    closed = _scaled_derivatives(cost.derivatives(), 0.1)
    cv, cg, cH = closed(Z[:, :NX], Z[:, NX : NX + NU], Z[:, NX + NU :])
    D = rng.normal(size=(6, 2 * NX + NU, 3))
    along = closed(Z[:, :NX], Z[:, NX : NX + NU], Z[:, NX + NU :], directions=D)[2]
    for k in range(6):
        v, gk, Hk = (np.asarray(a, np.float64) for a in exact(Z[k]))
        assert cv[k] == pytest.approx(v.item(), abs=1e-13)
        np.testing.assert_allclose(cg[k], gk.ravel(), rtol=0, atol=1e-13)
        np.testing.assert_allclose(cH[k], Hk, rtol=0, atol=1e-13)
        np.testing.assert_allclose(along[k], D[k].T @ Hk @ D[k], rtol=0, atol=1e-12)
    env = make_env("HalfCheetah-v5")
    hc, hc_closed = stage_cost(env), stage_cost_derivatives(env)
    X, U, Xn = rng.normal(size=(5, 17)), rng.uniform(-1, 1, (5, 6)), rng.normal(size=(5, 17))
    values = [float(hc(X[k], U[k], Xn[k])) for k in range(5)]
    np.testing.assert_allclose(hc_closed(X, U, Xn)[0], values, rtol=0, atol=1e-13)
    assert stage_cost_derivatives(make_env("Reacher-v5")) is None  # not a quadratic form: CasADi's


def test_compiled_plan_with_a_quadratic_cost_is_casadis_exact_plan():
    """A plan whose stage cost is a quadratic form (HalfCheetah's kind), in Q's units (× 0.1, as a
    controller scales it), with and without the learned termination: compiled = CasADi's AD."""
    q, model, heads = _networks()
    cost = _quadratic_cost()
    for termination in (False, True):
        parts = _plan_parts(model, heads, termination)
        parts.update(
            stage_cost=scaled(cost.function(), 0.1), stage_cost_derivatives=_scaled_derivatives(cost.derivatives(), 0.1)
        )
        spec = MPCSpec(LOW, HIGH, 3, discount=0.9, shooting="single", **parts)
        _assert_compiled_plan_is_exact(ControlProblem.of_network(q, spec, bake_weights=True), seed=5, states=4)


def test_no_compiled_plan_where_a_part_has_no_compiled_form():
    q, model, heads = _networks()
    parts = _plan_parts(model, heads)
    parts["stage_cost_derivatives"] = lambda X, U, Xn: heads.cost_derivatives()(X, U, Xn)  # a plain closure
    spec = MPCSpec(LOW, HIGH, 3, discount=0.9, shooting="single", **parts)
    assert ControlProblem.of_network(q, spec, bake_weights=True).compiled_plan is None
    spec = MPCSpec(LOW, HIGH, 3, discount=0.9, shooting="single", **_plan_parts(model, heads))
    assert ControlProblem.of_network(q, spec, bake_weights=False).compiled_plan is None  # weights not constants


@pytest.mark.parametrize("bound", [1.0, 0.05])
def test_greedy_newton_is_casadis_argmin(bound):
    q = _networks(layer_norm=True)[0]
    low, high = -bound * np.ones(NU), bound * np.ones(NU)
    planner = Planner(q, MPCSpec(low, high), SolverOptions(tol=1e-10), bake_weights=True)
    fast = planner.compiled_greedy
    assert fast is not None
    rng = np.random.default_rng(3)
    for _ in range(8):
        x = 2.0 * rng.normal(size=NX)
        u, converged = fast.solve(x)
        ref = planner.solve(x[None])[0]
        assert converged
        np.testing.assert_allclose(u, ref.w[0], rtol=0, atol=1e-6)
        g = q.action_oracle(x[None]).derivatives(u[None])[1][0]
        assert np.abs(u - np.clip(u - g, low, high)).max() <= 1e-8  # the numpy oracle's certificate


def test_compiled_sqp_takes_the_python_sqps_steps():
    """On a trained checkpoint at the states of its own closed loop (Hopper-v5, H = 3, the trust
    region its launch file sets): the compiled SQP ends where :func:`solve_box_sqp` ends on the same
    derivatives, in as many iterations (±1: the eigen-decomposition and the linear solves differ
    in rounding)."""
    ctrl = qmpc.Controller.from_checkpoint("models/hopper.pt", horizon=3, model="learned", trust_region=0.1)
    P = ctrl.planner.problem
    cp = P.compiled_plan
    assert cp is not None and ctrl._greedy.compiled_greedy is not None

    class Oracle:  # the compiled derivatives for the Python SQP
        def value(self, u, rows):
            return np.array([cp.value(u[0], x)])

        def derivatives(self, u, rows):
            f, g, H = cp.derivatives(u[0], x)
            return np.array([f]), g[None], H[None]

    env = make_env("Hopper-v5")
    obs = env.reset(seed=7)[0]
    rng = np.random.default_rng(4)
    for _ in range(12):
        x = obs.astype(np.float64)
        u0 = np.clip(rng.uniform(-1, 1, P.n_w), P.lbw, P.ubw)
        u, _, _, r, its, qp_failed = cp.solve(x, u0, P.lbw, P.ubw, tol=1e-8, max_iter=50, floor=1e-8)
        ref = solve_box_sqp(Oracle(), u0[None], P.lbw, P.ubw, tol=1e-8, max_iter=50)
        assert not qp_failed and r <= 1e-8 and ref.converged[0]
        np.testing.assert_allclose(u, ref.u[0], rtol=0, atol=1e-6)
        assert abs(its - ref.iterations[0]) <= 1
        obs, *_ = env.step(ctrl.act(obs)[0])


def _controller(**kw) -> Controller:
    q, model, heads = _networks(seed=5)
    parts = _plan_parts(model, heads)
    return Controller(
        q, LOW, HIGH, horizon=3, shooting="single", stage_cost_scaled=True, trust_region=0.2, **parts, **kw
    )


def _steps(ctrl: Controller, n: int = 6) -> np.ndarray:
    rng = np.random.default_rng(6)
    return np.array([ctrl.act(rng.normal(size=NX))[0] for _ in range(n)])


def test_a_compiled_plan_that_disagrees_is_dropped_with_a_warning():
    ctrl = _controller()
    reference = _steps(ctrl)
    solver = ctrl.planner.solver
    assert solver.compiled_plan is not None
    ctrl.reset()
    wrong = solver.compiled_plan
    wrong.buf = wrong.buf * 1.05  # every weight 5 % off: no longer the problem's plan
    with pytest.warns(RuntimeWarning, match="compiled plan"):
        actions = _steps(ctrl)
    assert solver.compiled_plan is None  # solved without it from then on
    np.testing.assert_allclose(actions, reference, rtol=0, atol=1e-6)


def test_without_numba_the_controller_keeps_its_numpy_and_casadi_paths(monkeypatch):
    fast = _controller()
    actions = _steps(fast)
    monkeypatch.setattr(compiled, "AVAILABLE", False)
    slow = _controller()
    assert slow.planner.problem.compiled_plan is None and slow._greedy.compiled_greedy is None
    np.testing.assert_allclose(_steps(slow), actions, rtol=0, atol=1e-6)


def test_half_cheetah_plans_compiled_as_on_casadis_cost(monkeypatch):
    """``models/half_cheetah.pt`` at H = 3 within its trust region: its plan is compiled (the
    quadratic stage cost has a compiled form), and its actions on its own closed loop equal those of
    the plan on CasADi's stage cost (no closed form: the code before the quadratic form)."""
    ckpt = Path(__file__).resolve().parents[1] / "models" / "half_cheetah.pt"
    fast = Controller.from_checkpoint(ckpt, horizon=3, trust_region=0.1)
    assert fast.planner.problem.compiled_plan is not None
    env = make_env("HalfCheetah-v5", seed=0)
    x, states, actions = env.reset(seed=0)[0], [], []
    for _ in range(8):
        u, _ = fast.act(x)
        states.append(x), actions.append(u)
        x = env.step(u)[0]
    monkeypatch.setattr("qmpc.controller.stage_cost_derivatives", lambda env: None)
    slow = Controller.from_checkpoint(ckpt, horizon=3, trust_region=0.1)
    assert slow.planner.problem.compiled_plan is None
    np.testing.assert_allclose([slow.act(s)[0] for s in states], actions, rtol=0, atol=1e-6)


def test_cli_says_why_building_the_controller_takes_long(capsys):
    """``qmpc run`` says, on stderr, that the first run compiles kernels when building the controller
    takes more than a moment, and says nothing when it is quick."""
    import time

    from qmpc.cli import BUILDING, _notice_if_slow

    with _notice_if_slow(BUILDING, after_s=0.05):
        time.sleep(0.3)
    assert "numba" in capsys.readouterr().err
    with _notice_if_slow(BUILDING, after_s=0.5):
        pass
    time.sleep(0.7)
    assert capsys.readouterr().err == ""
