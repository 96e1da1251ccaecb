"""The framework-free KKT math (qmpc/kkt.py) on small systems with known answers."""

import numpy as np

from qmpc import kkt


def _dynamics_jacobian(rng, nx, nu, N):
    """``G`` of ``g_k = A_k x_k + B_k u_k − x_{k+1}`` with ``w = (u_0..u_N, x_1..x_N)``."""
    n_act, ng = (N + 1) * nu, N * nx
    G = np.zeros((ng, n_act + ng))
    for k in range(N):
        rows = slice(k * nx, (k + 1) * nx)
        G[rows, k * nu : (k + 1) * nu] = rng.normal(size=(nx, nu))
        if k:
            G[rows, n_act + (k - 1) * nx : n_act + k * nx] = rng.normal(size=(nx, nx))
        G[rows, n_act + k * nx : n_act + (k + 1) * nx] = -np.eye(nx)
    return G


def test_null_space_spans_the_dynamics_and_free_actions():
    rng = np.random.default_rng(0)
    nx, nu, N = 3, 2, 3
    G = _dynamics_jacobian(rng, nx, nu, N)[None]
    free_u = np.array([[1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0]])
    Z = kkt.null_space(G, free_u, nx)
    np.testing.assert_allclose(G @ Z, 0.0, atol=1e-12)
    np.testing.assert_array_equal(Z[0, :8, :8], np.diag(free_u[0]))


def test_adjoint_is_the_inverse_reduced_hessian_on_the_free_components():
    """Bounds only: ``a_F = H_FF⁻¹ ū_F``, ``a_A = 0``; a negative definite H is singular."""
    rng = np.random.default_rng(1)
    M = rng.normal(size=(4, 4))
    H = (M @ M.T + 4 * np.eye(4))[None].repeat(2, 0)
    H[1] *= -1.0
    fixed = np.array([[False, True, False, False]] * 2)
    seed = rng.normal(size=(2, 4))
    a, b, singular = kkt.adjoint(H, np.zeros((2, 0, 4)), fixed, seed, np.array([True, True]), nx=1)
    F = [0, 2, 3]
    np.testing.assert_allclose(a[0, F], np.linalg.solve(H[0][np.ix_(F, F)], seed[0, F]), rtol=1e-12)
    assert a[0, 1] == 0.0 and b.shape == (2, 0)
    np.testing.assert_array_equal(singular, [False, True])
    np.testing.assert_array_equal(a[1], 0.0)


def test_adjoint_with_dynamics_solves_the_kkt_system():
    rng = np.random.default_rng(2)
    nx, nu, N = 2, 1, 2
    G = _dynamics_jacobian(rng, nx, nu, N)
    nw = G.shape[1]
    M = rng.normal(size=(nw, nw))
    H = M @ M.T + np.eye(nw)
    fixed = np.zeros((1, nw), bool)
    fixed[0, 1] = True
    seed = rng.normal(size=(1, nw))
    a, b, singular = kkt.adjoint(H[None], G[None], fixed, seed, np.array([True]), nx)
    assert not singular[0]
    F = np.flatnonzero(~fixed[0])
    np.testing.assert_allclose(H[np.ix_(F, F)] @ a[0, F] + G[:, F].T @ b[0], seed[0, F], atol=1e-10)
    np.testing.assert_allclose(G[:, F] @ a[0, F], 0.0, atol=1e-10)
    assert a[0, 1] == 0.0


def test_active_set_reads_multipliers_and_the_certificate_projects():
    w = np.array([[-1.0, -1.0 + 1e-7, 0.3, 1.0 - 1e-7]])
    lam = np.array([[-2.0, -3.0, 0.0, 0.0]])  # CasADi's sign: negative at a lower bound
    lb, ub = -np.ones(4), np.ones(4)
    fixed, weak = kkt.at_bounds(w, lam, lb, ub, bound_tol=1e-8, multiplier_tol=1e-8)
    np.testing.assert_array_equal(fixed, [[True, True, False, False]])  # 1e-7 inside, λ = −3: active
    assert not weak.any()
    grad = np.array([[2.0, 3.0, 1e-3, 0.0]])
    np.testing.assert_allclose(kkt.kkt_residual(w, grad, np.zeros((1, 0)), lb, ub), [1e-3])
    assert kkt.kkt_residual(w, grad * np.nan, np.zeros((1, 0)), lb, ub)[0] == np.inf
