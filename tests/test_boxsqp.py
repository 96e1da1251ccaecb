"""The box SQP's QP steps (block principal pivoting) and its floor on negative curvature."""

import numpy as np
import pytest

from qmpc import boxsqp
from qmpc.kkt import kkt_residual


def _random_qps(B: int, n: int, seed: int, coupling: float = 1.0):
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(B, n, n))
    H = coupling * np.einsum("bij,bkj->bik", A, A) + 0.1 * np.eye(n)
    g = rng.normal(size=(B, n)) * 3.0
    lo, hi = -rng.uniform(0.0, 1.0, (B, n)), rng.uniform(0.0, 1.0, (B, n))
    lo[:, 0] = 0.0  # a component that starts on its bound
    return g, H, lo, hi


def _qp_residual(d, g, H, lo, hi):
    mu = np.einsum("bij,bj->bi", H, d) + g
    return np.abs(d - np.clip(d - mu, lo, hi)).max(axis=1)


@pytest.mark.parametrize("n", [1, 3, 6, 18])
def test_box_qp_meets_the_qps_optimality_conditions(n):
    g, H, lo, hi = _random_qps(300, n, seed=n)
    d, done = boxsqp.box_qp(g, H, lo, hi, tol=1e-10)
    assert done.all()
    assert (d >= lo).all() and (d <= hi).all()
    assert _qp_residual(d[done], g[done], H[done], lo[done], hi[done]).max() <= 1e-10
    near = (np.abs(d - lo) < 1e-9) | (np.abs(d - hi) < 1e-9)  # on a bound: exactly (the SQP's steps land there)
    assert ((d == lo) | (d == hi))[near].all()
    # convex: the KKT point is the minimum; no feasible point of a dense random sample is lower
    q = lambda v: np.einsum("bi,bi->b", g + 0.5 * np.einsum("bij,bj->bi", H, v), v)  # noqa: E731
    rng = np.random.default_rng(0)
    for _ in range(50):
        v = np.clip(d + rng.normal(scale=0.05, size=d.shape), lo, hi)
        assert (q(v)[done] >= q(d)[done] - 1e-12).all()


def test_box_qp_does_not_cycle_on_the_ill_conditioned_steps_of_a_floored_hessian():
    # the SQP's Hessians have eigenvalues down to 1e-5 of the largest (the floor on negative
    # curvature): exchanging every misplaced bound at once (the primal-dual active set method)
    # cycled on 7 % of these n = 5 steps and 11 % at n = 10; the safeguarded exchange solves them
    for n in (5, 10):
        rng = np.random.default_rng(n)
        Q = np.linalg.qr(rng.normal(size=(300, n, n)))[0]
        lam = 10 ** rng.uniform(-5, 0, (300, n))
        lam[:, 0] = 1.0
        H = np.einsum("bij,bj,bkj->bik", Q, lam, Q)
        g = 0.3 * rng.normal(size=(300, n))
        lo, hi = -rng.uniform(0, 2, (300, n)), rng.uniform(0, 2, (300, n))
        d, done = boxsqp.box_qp(g, H, lo, hi, tol=1e-9)
        assert done.mean() >= 0.99, done.mean()
        assert _qp_residual(d[done], g[done], H[done], lo[done], hi[done]).max() <= 1e-9


def test_box_qp_solves_an_interior_minimum_rather_than_stopping_at_its_start():
    # no bound is active anywhere on the way: the first active-set guess (none) is the answer,
    # and it must be solved, not taken as "unchanged" at d = 0
    H = np.array([[[2.0, 0.5], [0.5, 1.0]]])
    g = np.array([[0.3, -0.2]])
    d, done = boxsqp.box_qp(g, H, -np.ones((1, 2)), np.ones((1, 2)), tol=1e-12)
    assert done.all()
    np.testing.assert_allclose(d[0], -np.linalg.solve(H[0], g[0]), atol=1e-14)


def test_box_qp_solves_a_measured_strongly_coupled_step():
    # an SQP step of models/inverted_double_pendulum.pt at H = 5 (its Hessian convexified with the
    # old floor): the primal-dual active set method with multipliers compared to unscaled distances
    # alternated between all-lower and all-upper guesses forever
    H = np.array(
        [
            [3030.7148, 1704.165, 970.0423, 518.4819, 336.1542],
            [1704.165, 1016.9779, 553.5741, 295.8821, 191.8331],
            [970.0423, 553.5741, 359.5666, 168.4216, 109.195],
            [518.4819, 295.8821, 168.4216, 134.4823, 58.3641],
            [336.1542, 191.8331, 109.195, 58.3641, 82.3019],
        ]
    )[None]
    g = np.array([[-9.1766, -4.0291, -1.2957, -0.2177, 0.0]])
    lo = np.array([[-1.3545, -0.2628, -1.8124, -0.0506, -1.8798]])
    hi = np.array([[0.6455, 1.7372, 0.1876, 1.9494, 0.1202]])
    H = 0.5 * (H + np.swapaxes(H, 1, 2)) + 1e-6 * np.eye(5)
    d, done = boxsqp.box_qp(g, H, lo, hi, tol=1e-10)
    assert done.all()
    assert _qp_residual(d, g, H, lo, hi)[0] <= 1e-10


def test_a_step_the_active_set_method_does_not_settle_is_solved_by_the_projected_newton(monkeypatch):
    g, H, lo, hi = _random_qps(20, 5, seed=7)
    reference, done = boxsqp.box_qp(g, H, lo, hi, tol=1e-12)
    assert done.all()
    monkeypatch.setattr(
        boxsqp, "box_qp", lambda g, H, lo, hi, tol, deadline: (np.zeros_like(g), np.zeros(len(g), bool))
    )
    d = boxsqp._step(g, H, lo, hi, 1e-12, np.inf)
    np.testing.assert_allclose(d, reference, atol=1e-8)


class _Saddle:
    """``f(u) = −½ Σ aᵢ uᵢ² + bᵀu`` on a box: concave, so its minima are corners."""

    def __init__(self, a, b):
        self.a, self.b = a, b

    def value(self, u, rows):
        return -0.5 * np.einsum("bi,bi->b", self.a[rows] * u, u) + np.einsum("bi,bi->b", self.b[rows], u)

    def derivatives(self, u, rows):
        a = self.a[rows]
        return self.value(u, rows), -a * u + self.b[rows], -np.einsum("bi,ij->bij", a, np.eye(u.shape[1]))


def test_the_sqp_leaves_negative_curvature_for_a_corner_in_few_iterations():
    rng = np.random.default_rng(3)
    B, n = 50, 6
    a = np.concatenate([rng.uniform(1e-3, 1e-2, (B, n // 2)), rng.uniform(1.0, 100.0, (B, n - n // 2))], axis=1)
    f = _Saddle(a, rng.normal(scale=1e-3, size=(B, n)))
    lb, ub = -np.ones(n), np.ones(n)
    res = boxsqp.solve_box_sqp(f, rng.uniform(-0.1, 0.1, (B, n)), lb, ub, tol=1e-10, max_iter=50)
    assert res.converged.all()
    assert (np.abs(res.u) == 1.0).all()  # every component at a bound: a corner
    assert kkt_residual(res.u, res.grad, np.zeros((B, 0)), lb, ub).max() <= 1e-10
    # the weakly curved half moves to its bounds in a few steps, not creeping at the floor's pace
    assert res.iterations.max() <= 6, res.iterations.max()


def test_box_qp_takes_an_empty_batch_and_any_iteration_budget():
    g, H, lo, hi = _random_qps(3, 4, seed=1)
    d, done = boxsqp.box_qp(g[:0], H[:0], lo[:0], hi[:0], tol=1e-9)
    assert d.shape == (0, 4) and done.shape == (0,)
    d, done = boxsqp.box_qp(g, H, lo, hi, tol=1e-9, max_iter=0)  # one solve at least
    assert d.shape == (3, 4) and (d >= lo).all() and (d <= hi).all()


@pytest.mark.parametrize("kind", ["random", "ill-conditioned"])
def test_a_single_qp_takes_the_batchs_exchanges(kind):
    # box_qp of one problem (a controller's plan) runs on vectors: the same guesses, solves and
    # exchanges as the batch's row bookkeeping, so the same step (Murty's rule included: the
    # ill-conditioned steps exchange one component at a time on some samples)
    if kind == "random":
        g, H, lo, hi = _random_qps(120, 8, seed=3)
    else:
        rng = np.random.default_rng(10)
        Q = np.linalg.qr(rng.normal(size=(120, 10, 10)))[0]
        lam = 10 ** rng.uniform(-5, 0, (120, 10))
        H = np.einsum("bij,bj,bkj->bik", Q, lam, Q)
        g, lo, hi = 0.3 * rng.normal(size=(120, 10)), -rng.uniform(0, 2, (120, 10)), rng.uniform(0, 2, (120, 10))
    d, done = boxsqp.box_qp(g, H, lo, hi, tol=1e-9)
    for b in range(g.shape[0]):
        d1, done1 = boxsqp.box_qp(g[b : b + 1], H[b : b + 1], lo[b : b + 1], hi[b : b + 1], tol=1e-9)
        assert done1[0] == done[b]
        np.testing.assert_allclose(d1[0], d[b], rtol=0, atol=1e-12)
    for budget in (1, 2):  # the iteration budget is the batch's too
        d2, done2 = boxsqp.box_qp(g[:1], H[:1], lo[:1], hi[:1], tol=1e-9, max_iter=budget)
        db, doneb = boxsqp.box_qp(np.repeat(g[:1], 2, 0), np.repeat(H[:1], 2, 0), np.repeat(lo[:1], 2, 0),
                                  np.repeat(hi[:1], 2, 0), tol=1e-9, max_iter=budget)  # fmt: skip
        assert done2[0] == doneb[0]
        np.testing.assert_allclose(d2[0], db[0], rtol=0, atol=1e-12)


class _Quartic:
    """``f_b(u) = Σ a (u − c)² + Σ u⁴ / 4``: a strict interior minimum, Newton converges fast."""

    def __init__(self, a: np.ndarray, c: np.ndarray):
        self.a, self.c, self.hessians = a, c, 0

    def value(self, u, rows):
        return (self.a[rows] * (u - self.c[rows]) ** 2 + u**4 / 4).sum(axis=1)

    def derivatives(self, u, rows):
        self.hessians += len(rows)
        g = 2 * self.a[rows] * (u - self.c[rows]) + u**3
        H = np.zeros((len(rows), u.shape[1], u.shape[1]))
        idx = np.arange(u.shape[1])
        H[:, idx, idx] = 2 * self.a[rows] + 3 * u**2
        return self.value(u, rows), g, H


class _QuarticFirstOrder(_Quartic):
    def first_order(self, u, rows):
        return self.value(u, rows), 2 * self.a[rows] * (u - self.c[rows]) + u**3


def test_the_sqp_asks_for_a_hessian_only_where_an_iteration_needs_it():
    """An oracle with ``first_order``: the same iterates to the bit, with fewer Hessians (the last
    one, of a sample that is done, is skipped); ``hessian_at_solution`` gives the last iterate's."""
    rng = np.random.default_rng(0)
    B, n = 40, 4
    a, c = rng.uniform(0.5, 2.0, (B, n)), rng.uniform(-2.0, 2.0, (B, n))
    lb, ub = -np.ones(n), np.ones(n)  # some minima outside the box: on a bound
    u0 = rng.uniform(-1.0, 1.0, (B, n))
    plain, lazy = _Quartic(a, c), _QuarticFirstOrder(a, c)
    ref = boxsqp.solve_box_sqp(plain, u0, lb, ub, tol=1e-12)
    res = boxsqp.solve_box_sqp(lazy, u0, lb, ub, tol=1e-12, hessian_at_solution=False)
    assert ref.converged.all() and res.converged.all()
    for name in ("u", "value", "grad", "residual", "iterations"):
        np.testing.assert_array_equal(getattr(res, name), getattr(ref, name))
    assert lazy.hessians <= plain.hessians - B // 2, (lazy.hessians, plain.hessians)
    at = boxsqp.solve_box_sqp(_QuarticFirstOrder(a, c), u0, lb, ub, tol=1e-12)  # hessian_at_solution
    np.testing.assert_array_equal(at.hessian, ref.hessian)
