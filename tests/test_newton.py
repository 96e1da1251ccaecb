"""The batched projected Newton of the TD target and what it stands on: the PICNN's closed-form
derivatives in u over a batch, and the vectorised CasADi twin (issue 10)."""

import casadi as ca
import numpy as np
import pytest
import torch
from torch.func import grad, hessian, vmap

import qmpc
from qmpc.check import spread_layer_norms
from qmpc.kkt import kkt_residual
from qmpc.newton import solve_box


def _picnn(nx=5, nu=3, hidden=(8, 6), activation="tanh", normalized=True, seed=0, layer_norm=False):
    torch.manual_seed(seed)
    q = qmpc.PICNN(nx, nu, hidden=hidden, activation=activation, layer_norm=layer_norm).double()
    if normalized:
        rng = np.random.default_rng(seed)
        q.set_input_normalization(rng.normal(size=nx), rng.normal(size=(nx, nx)))
    return spread_layer_norms(q)  # layer norms' scales and shifts away from their initial 1 and 0


@pytest.mark.parametrize("layer_norm", [False, True], ids=["", "layer_norm"])
@pytest.mark.parametrize("activation", ["tanh", "softplus", "sigmoid", "silu"])
@pytest.mark.parametrize("hidden", [(8,), (8, 6, 4)])
def test_oracle_matches_autograd(activation, hidden, layer_norm):
    q = _picnn(hidden=hidden, activation=activation, layer_norm=layer_norm)
    g = torch.Generator().manual_seed(1)
    x, u = torch.randn(9, 5, generator=g, dtype=torch.float64), torch.randn(9, 3, generator=g, dtype=torch.float64)
    oracle = q.action_oracle(x.numpy())
    v, gu, H = oracle.derivatives(u.numpy(), np.arange(9))

    def f(xx, uu):
        return q(xx[None], uu[None])[0]

    with torch.no_grad():
        np.testing.assert_allclose(v, q(x, u).numpy(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(gu, vmap(grad(f, argnums=1))(x, u).detach().numpy(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(H, vmap(hessian(f, argnums=1))(x, u).detach().numpy(), rtol=0, atol=1e-12)
    rows = np.array([7, 2])
    np.testing.assert_allclose(oracle.value(u.numpy()[rows], rows), v[rows], rtol=0, atol=1e-12)


@pytest.mark.parametrize("layer_norm", [False, True])
def test_vectorised_twin_matches_the_network(layer_norm):
    q = _picnn(activation="silu", layer_norm=layer_norm)
    g = torch.Generator().manual_seed(2)
    x, u = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(6, 3, generator=g, dtype=torch.float64)
    f = q.casadi_batch_function(6)
    out = np.asarray(f(x.numpy().T, u.numpy().T, q.flat_parameters())).ravel()
    with torch.no_grad():
        np.testing.assert_allclose(out, q(x, u).numpy(), rtol=0, atol=1e-12)
    with pytest.raises(qmpc.UnsupportedLayerError, match="vectorized twin"):
        qmpc.MLPQ(5, 3).casadi_batch_function(2)


@pytest.mark.parametrize("half_width", [0.05, 0.5, 100.0], ids=["active", "mixed", "inactive"])
def test_newton_finds_the_casadi_argmin(half_width):
    """Same minimisers as CasADi's sqpmethod (tight tolerance) for every sample, with bounds active,
    mixed and inactive; components at a bound lie exactly on it."""
    q = _picnn()
    x = np.random.default_rng(3).normal(size=(32, 5))
    lb, ub = -half_width * np.ones(3), half_width * np.ones(3)
    res = solve_box(q.action_oracle(x), np.zeros((32, 3)), lb, ub, tol=1e-11)
    assert res.converged.all() and res.iterations.max() <= 10
    layer = qmpc.ArgminLayer(q, lb, ub, tol=1e-13, grad_mode="none", newton=False)
    u_ref, v_ref = layer(torch.as_tensor(x))
    np.testing.assert_allclose(res.u, u_ref.numpy(), rtol=0, atol=1e-8)
    np.testing.assert_allclose(res.value, v_ref.numpy(), rtol=0, atol=1e-10)
    at_bound = (res.u == lb) | (res.u == ub)
    near = (np.abs(res.u - lb) < 1e-9) | (np.abs(res.u - ub) < 1e-9)
    np.testing.assert_array_equal(at_bound, near)
    if half_width == 100.0:
        assert not at_bound.any()
    else:
        assert at_bound.any()


class _Concave:
    """``f(u) = −½ ‖u‖² + aᵀu``: the minimum over a box is at a corner; Newton must still descend."""

    def __init__(self, a):
        self.a = a

    def value(self, u, rows):
        return -0.5 * (u * u).sum(1) + (self.a[rows] * u).sum(1)

    def derivatives(self, u, rows):
        B, n = u.shape
        return self.value(u, rows), -u + self.a[rows], np.broadcast_to(-np.eye(n), (B, n, n)).copy()


def test_newton_descends_on_a_nonconvex_function_and_reports_the_residual():
    a = np.array([[0.3, -0.2], [-0.1, 0.4]])
    res = solve_box(_Concave(a), np.zeros((2, 2)) + 0.01, -np.ones(2), np.ones(2))
    assert res.converged.all()
    np.testing.assert_array_equal(res.u, -np.sign(a))  # the corner away from a
    np.testing.assert_allclose(res.residual, kkt_residual(res.u, -res.u + a, np.zeros((2, 0)), -np.ones(2), np.ones(2)))


def test_newton_reports_unconverged_samples_instead_of_raising():
    q = _picnn()
    x = np.random.default_rng(4).normal(size=(8, 5))
    res = solve_box(q.action_oracle(x), np.zeros((8, 3)), -np.ones(3), np.ones(3), max_iter=1, tol=1e-14)
    assert (~res.converged).any() and (res.iterations <= 1).all()
    assert np.isfinite(res.u).all() and (np.abs(res.u) <= 1).all()


def test_vectorised_gradient_certificate_agrees_with_the_oracle():
    q = _picnn(hidden=(8, 8))
    x = np.random.default_rng(5).normal(size=(4, 5))
    u = np.random.default_rng(6).uniform(-1, 1, size=(4, 3))
    f = q.casadi_batch_function(4)
    X, U, th = ca.MX.sym("X", 5, 4), ca.MX.sym("U", 3, 4), ca.MX.sym("th", q.num_parameters)
    gfun = ca.Function("g", [X, U, th], [ca.jacobian(ca.sum2(f(X, U, th)), ca.vec(U))])
    g_casadi = np.asarray(gfun(x.T, u.T, q.flat_parameters())).reshape(4, 3)
    _, g_oracle, _ = q.action_oracle(x).derivatives(u, np.arange(4))
    np.testing.assert_allclose(g_casadi, g_oracle, rtol=0, atol=1e-12)


def test_layer_uses_the_newton_path_and_its_warm_starts():
    """Batches of 8 and more go to the Newton (every sample SOLVED by it, none by the plugin); with
    one iteration allowed, a cold start is not enough (the plugin rescues: RETRIED) and a warm
    start at the solution is (SOLVED). A layer that ignored warm starts fails this."""
    q = _picnn(hidden=(8, 8))
    x = torch.as_tensor(np.random.default_rng(7).normal(size=(16, 5)))
    layer = qmpc.ArgminLayer(q, -0.5, 0.5, grad_mode="none")
    u, v = layer(x)
    assert layer.problem.batched and (layer.last_result.status == qmpc.Status.SOLVED).all()
    one = qmpc.ArgminLayer(q, -0.5, 0.5, grad_mode="none", max_iter=1)
    one(x)
    assert (one.last_result.status == qmpc.Status.RETRIED).any()
    u_w, v_w = one(x, w0=u)
    assert (one.last_result.status == qmpc.Status.SOLVED).all()
    torch.testing.assert_close(u_w, u, rtol=0, atol=1e-8)
    torch.testing.assert_close(v_w, v, rtol=0, atol=1e-10)


def test_replay_buffer_keeps_argmins_as_warm_starts():
    from qmpc.data import ReplayBuffer

    buf = ReplayBuffer(2, 1, capacity=3)
    for i in range(3):
        buf.add([i, 0.0], [0.0], 1.0, [i + 1, 0.0], False)
    idx = torch.tensor([0, 2])
    low, high = np.array([0.5]), np.array([1.0])
    np.testing.assert_array_equal(buf.warm_starts(idx, low, high), [[0.5], [0.5]])  # cold: 0 clipped
    buf.store_argmins(idx, np.array([[0.7], [0.9]]), np.array([True, False]))
    np.testing.assert_array_equal(buf.warm_starts(idx, low, high), [[0.7], [0.5]])
    other = ReplayBuffer(2, 1, capacity=3)
    other.load_state_dict(buf.state_dict())  # checkpointed with the buffer: resume stays exact
    np.testing.assert_array_equal(other.warm_starts(idx, low, high), [[0.7], [0.5]])
    buf.add([9.0, 0.0], [0.0], 1.0, [9.0, 1.0], False)  # overwrites slot 0: its argmin is gone
    np.testing.assert_array_equal(buf.warm_starts(idx, low, high), [[0.5], [0.5]])
    assert buf.sample(4, np.random.default_rng(0)).index.dtype == torch.int64


class _Quartic:
    """``f_b(u) = Σ (u − c_b)⁴ + 0.1 ‖u‖²``: Newton needs more iterations the farther ``c_b`` is."""

    def __init__(self, c: np.ndarray):
        self.c = c

    def value(self, u, rows):
        return ((u - self.c[rows]) ** 4).sum(axis=1) + 0.1 * (u**2).sum(axis=1)

    def derivatives(self, u, rows):
        d = u - self.c[rows]
        H = np.stack([np.diag(12 * di**2 + 0.2) for di in d])
        return self.value(u, rows), 4 * d**3 + 0.2 * u, H


def test_one_box_per_sample_when_samples_converge_at_different_iterations():
    """The box SQP's QPs give the projected Newton one box per sample (``(B, n)`` bounds). When
    its samples converged at different iterations, the line search clipped a subset of rows to
    every row's box: a ``ValueError`` (shapes (20,3) and (256,3)) on a batch of 256 H = 3 plans
    of ``models/inverted_pendulum.pt``. Each sample now gets its own box, and the batch's answer
    is each sample's alone."""
    rng = np.random.default_rng(0)
    B, n = 16, 3
    c = rng.normal(scale=rng.uniform(0.1, 5.0, size=(B, 1)), size=(B, n))
    lb, ub = -rng.uniform(0.5, 2.0, size=(B, n)), rng.uniform(0.5, 2.0, size=(B, n))
    oracle = _Quartic(c)
    res = solve_box(oracle, np.zeros((B, n)), lb, ub, tol=1e-10, max_iter=60)
    assert res.converged.all() and len(set(res.iterations)) > 1
    assert np.all(res.u >= lb) and np.all(res.u <= ub)
    for b in range(B):
        one = solve_box(_Quartic(c[b : b + 1]), np.zeros((1, n)), lb[b], ub[b], tol=1e-10, max_iter=60)
        np.testing.assert_allclose(res.u[b], one.u[0], atol=1e-9)


class _Counting:
    """An oracle seen through a counter of the rows whose Hessian it computed; ``first_order``
    is offered only if the inner oracle has it and ``lazy``."""

    def __init__(self, inner, lazy: bool):
        self.inner, self.hessian_rows = inner, 0
        self.value = inner.value
        if lazy:
            self.first_order = inner.first_order

    def derivatives(self, u, rows):
        self.hessian_rows += len(u)
        return self.inner.derivatives(u, rows)


@pytest.mark.parametrize("hidden", [(8,), (8, 6, 4)])
def test_the_first_order_is_the_derivatives_first_two_outputs_bit_for_bit(hidden):
    q = _picnn(hidden=hidden)
    rng = np.random.default_rng(8)
    oracle = q.action_oracle(rng.normal(size=(7, 5)))
    u, rows = rng.uniform(-1, 1, size=(4, 3)), np.array([6, 0, 3, 3])
    f, g = oracle.first_order(u, rows)
    f2, g2, _ = oracle.derivatives(u, rows)
    np.testing.assert_array_equal(f, f2)
    np.testing.assert_array_equal(g, g2)
    np.testing.assert_array_equal(f, oracle.value(u, rows))


def test_the_newton_asks_for_a_hessian_only_where_an_iteration_needs_it():
    """With the oracle's ``first_order``, the Newton takes the same iterates as with ``derivatives``
    alone (to rounding: BLAS may round a row differently in a batch of another size) and computes
    fewer Hessians (those of the steps that did not end a sample). Warm starts near the solution,
    as in training, where most samples end in 1–2 steps."""
    q = _picnn(hidden=(8, 8))
    rng = np.random.default_rng(9)
    x = rng.normal(size=(64, 5))
    lb, ub = -0.5 * np.ones(3), 0.5 * np.ones(3)
    exact = solve_box(q.action_oracle(x), np.zeros((64, 3)), lb, ub, tol=1e-12)
    u0 = np.clip(exact.u + rng.normal(scale=1e-3, size=exact.u.shape), lb, ub)
    eager, lazy = _Counting(q.action_oracle(x), False), _Counting(q.action_oracle(x), True)
    a = solve_box(eager, u0, lb, ub, tol=1e-10)
    b = solve_box(lazy, u0, lb, ub, tol=1e-10)
    for name in ("u", "value", "grad"):
        np.testing.assert_allclose(getattr(a, name), getattr(b, name), rtol=0, atol=1e-14, err_msg=name)
    for name in ("converged", "iterations"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    assert a.converged.all()
    assert lazy.hessian_rows < eager.hessian_rows


class _Misreported:
    """A closed form whose gradient is off by ``0.1`` in its first component (and, to the Newton,
    consistent: it converges to the wrong point)."""

    def __init__(self, inner):
        self.inner = inner

    def value(self, u, rows):
        return self.inner.value(u, rows) + 0.1 * u[:, 0]

    def derivatives(self, u, rows):
        f, g, H = self.inner.derivatives(u, rows)
        return f + 0.1 * u[:, 0], g + np.array([0.1, 0.0, 0.0]), H


def test_a_closed_form_that_is_not_the_network_is_caught_by_the_check_and_not_used():
    """The batched Newton's closed form is checked against the network on the first solve and every
    CHECK_EVERY-th: one that disagrees (here a wrong gradient) warns once, and every solve from then
    on is certified by the network itself: its wrong minimisers fail and the plugin finds the right
    ones. A closed form that agrees is checked on schedule and changes no result."""
    from qmpc.planner import Planner
    from qmpc.problem import MPCSpec
    from qmpc.solver import CHECK_EVERY, SolverOptions

    q = _picnn(hidden=(8, 8))
    x = np.random.default_rng(10).normal(size=(16, 5))
    planner = Planner(q, MPCSpec(-50 * np.ones(3), 50 * np.ones(3)), SolverOptions(tol=1e-10))  # interior minima
    planner.sync()
    lb, ub, theta = planner.problem.lbw, planner.problem.ubw, planner.problem_theta(16)
    solver, cert = planner.solver, planner._certificate(x)
    right = solver.solve(x, theta, lb, ub, oracle=q.action_oracle(x), certificate=cert)
    assert (right.status == qmpc.Status.SOLVED).all() and solver.oracle_agrees
    for _ in range(CHECK_EVERY):  # checked (the first and the CHECK_EVERY-th) or not: the same answers
        again = solver.solve(x, theta, lb, ub, oracle=q.action_oracle(x), certificate=cert)
        np.testing.assert_array_equal(again.w, right.w)
        np.testing.assert_array_equal(again.value, right.value)
    solver._newton_solves = 0  # the next solve is checked
    with pytest.warns(RuntimeWarning, match="disagree with the network"):
        wrong = solver.solve(x, theta, lb, ub, oracle=_Misreported(q.action_oracle(x)), certificate=cert)
    assert not solver.oracle_agrees
    assert (wrong.status == qmpc.Status.RETRIED).all()  # the network rejected them; the plugin solved
    np.testing.assert_allclose(wrong.w, right.w, atol=1e-6)
    again = solver.solve(x, theta, lb, ub, oracle=_Misreported(q.action_oracle(x)), certificate=cert)
    assert (again.status == qmpc.Status.RETRIED).all()  # unchecked by schedule, certified by the network
