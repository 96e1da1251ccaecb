"""Batched SQP for box-constrained problems: ``min_u f_b(u)  s.t.  lb ≤ u ≤ ub`` for a batch of
independent problems (a single-shooting MPC plan per state), framework-free.

Each iteration takes, for every unconverged sample, the exact Hessian of ``f`` (made positive
definite where it is not: :func:`convexified`), solves the box-constrained QP of the step

    min_d  ∇fᵀ d + ½ dᵀ H d   s.t.  lb − u ≤ d ≤ ub − u

exactly by block principal pivoting (:func:`box_qp`; the batched projected Newton of
:mod:`qmpc.newton` for a sample it leaves unsolved; numpy only: no evaluation of ``f``), and
backtracks along ``d`` (Armijo) on ``f`` itself. The QP finds the active bounds in one iteration
however many change, which the projected Newton on ``f`` alone does one small step at a time:
measured on ``models/half_cheetah.pt`` at H = 3 (18 actions, 9 at a bound at the solution) the
projected Newton took 15–50 iterations per control step, each with three evaluations of the
plan's functions.

A sample is done when its projected-gradient residual ``‖u − clip(u − ∇f)‖_∞ ≤ tol``; one that
is not done after ``max_iter`` iterations, or whose line search fails, is reported unconverged.
"""

from __future__ import annotations

import time

import numpy as np

from qmpc.kkt import kkt_residual
from qmpc.newton import BoxNewtonResult, Oracle, solve_box

__all__ = ["FLOOR", "LAZY_RESIDUAL", "convexified", "solve_box_sqp"]

FLOOR = 1e-8
"""The default eigenvalue floor of :func:`convexified` in :func:`solve_box_sqp` (see its ``floor``)."""

LAZY_RESIDUAL = 1e-3
""":func:`solve_box_sqp` asks an oracle with a ``first_order`` for the first order alone after a
full step from a residual at most this (a wrong guess costs one first-order evaluation)."""


def convexified(H: np.ndarray, floor: float, held: np.ndarray | None = None) -> np.ndarray:
    """``H (B, n, n)`` made positive definite where it is not: eigenvalues at least
    ``floor · max(1, max|λ|)``, and negative ones set to that floor. Along negative curvature the
    function falls faster than its slope says, so the step goes as far as the box lets it (which
    bounds it) and the line search takes it whole; with ``|λ|`` instead (the saddle-free Newton
    step), a concave coordinate only doubled its distance from the saddle at each iteration.
    ``held (B, n)``: components kept on their bound this iteration; only the block of the
    others matters (the held ones get their diagonal alone), so a plan whose curvature is negative
    only along bounds it sits on keeps its exact Hessian. Positive definite blocks are kept as they
    are, so the SQP converges fast near a strict minimum."""
    out = H.copy()
    if held is not None:
        free = ~held
        out *= free[:, :, None] & free[:, None, :]
        idx = np.arange(H.shape[1])
        out[:, idx, idx] += held * np.maximum(1.0, np.abs(np.diagonal(H, axis1=1, axis2=2)))
    lam, V = np.linalg.eigh(0.5 * (out + np.swapaxes(out, 1, 2)))
    scale = np.maximum(1.0, np.abs(lam).max(axis=1))
    bad = lam.min(axis=1) <= 1e-10 * scale
    if bad.any():
        fixed = np.maximum(np.where(lam[bad] < 0, 0.0, lam[bad]), floor * scale[bad, None])
        out[bad] = np.einsum("bij,bj,bkj->bik", V[bad], fixed, V[bad])
    return out


def box_qp(
    g: np.ndarray,
    H: np.ndarray,
    lo: np.ndarray,
    hi: np.ndarray,
    tol: float,
    max_iter: int | None = None,
    deadline: float = np.inf,
):
    """``min_d gᵀd + ½ dᵀHd  s.t.  lo ≤ d ≤ hi`` for a batch (``g, lo, hi (B, n)``, ``H (B, n, n)``
    positive definite, ``lo ≤ 0 ≤ hi``) by block principal pivoting (Júdice and Pires; Kim and Park
    2011 for bounds): each iteration fixes a guess of the components at their lower and upper
    bounds, solves the others' equations in one batched linear solve, and exchanges every
    component that the solution shows to be misplaced (a free one beyond its bound, a held one whose
    multiplier ``μ = Hd + g`` pulls it inside). Where three exchanges in a row do not reduce a
    sample's number of misplaced components, it exchanges only the last one of them (Murty's
    rule, which terminates), so the guesses cannot cycle. Returns ``d (B, n)`` and ``(B,)`` bool:
    the projected-gradient residual ``‖d − clip(d − μ)‖_∞ ≤ tol`` (else the caller solves the
    sample otherwise). ``deadline``: a ``time.perf_counter()`` after which no exchange starts (the
    samples still exchanging then are returned as they are, done where their residual already
    meets ``tol``). Measured on the SQP's steps of models/half_cheetah.pt's plans at H = 5 (30
    actions): a median of 5 linear solves, 1 in 4 steps solved by the first; exchanging all
    misplaced components without the safeguard (the primal-dual active set method) cycled on 1 in
    6 of IP's steps at H = 5."""
    B, n = g.shape
    max_iter = max(1, 4 * n + 10 if max_iter is None else max_iter)
    if B == 1:  # a controller's plan: the same exchanges on vectors
        d1, done = _box_qp_one(g[0], H[0], lo[0], hi[0], tol, max_iter, deadline)
        return d1[None], np.array([done])
    lower, upper = np.zeros((B, n), bool), np.zeros((B, n), bool)  # a first guess from the SQP's
    # held components or from the bounds the iterate is on took as many exchanges or more
    best, stall = np.full(B, n + 1), np.zeros(B, int)
    eye, e = np.eye(n, dtype=bool), 0.5 * tol
    d = np.zeros_like(g)
    rows = np.arange(B)  # the samples still exchanging: a hard one does not make the others pay
    for i in range(max_iter):
        if rows.size == 0 or (i and time.perf_counter() > deadline):
            break
        lo_r, hi_r, lw, up = lo[rows], hi[rows], lower[rows], upper[rows]
        M = np.where((lw | up)[:, :, None], eye, H[rows])  # a held component's row: d_i = its bound
        dr = np.linalg.solve(M, np.where(lw, lo_r, np.where(up, hi_r, -g[rows]))[:, :, None])[:, :, 0]
        dr = np.where(lw, lo_r, np.where(up, hi_r, dr))  # held ones exactly on their bound
        d[rows] = dr
        mu = np.einsum("bij,bj->bi", H[rows], dr) + g[rows]
        free = ~(lw | up)
        to_lower, to_upper = free & (dr < lo_r - e), free & (dr > hi_r + e)
        misplaced = to_lower | to_upper | (lw & (mu < -e)) | (up & (mu > e))
        count = misplaced.sum(axis=1)
        better = count < best[rows]
        best[rows], stall[rows] = np.where(better, count, best[rows]), np.where(better, 0, stall[rows] + 1)
        last = n - 1 - np.argmax(misplaced[:, ::-1], axis=1)
        murty = (stall[rows] >= 3)[:, None] & (np.arange(n)[None, :] != last[:, None])
        misplaced &= ~murty
        lower[rows], upper[rows] = np.where(misplaced, to_lower, lw), np.where(misplaced, to_upper, up)
        rows = rows[count > 0]
    d = np.clip(d, lo, hi)
    mu = np.einsum("bij,bj->bi", H, d) + g
    return d, np.abs(d - np.clip(d - mu, lo, hi)).max(axis=1) <= tol


def _box_qp_one(g, H, lo, hi, tol: float, max_iter: int, deadline: float) -> tuple[np.ndarray, bool]:
    """:func:`box_qp` of one problem (``g, lo, hi (n,)``, ``H (n, n)``): the same guesses, linear
    solves and exchanges, without the batch's row bookkeeping (measured on the SQP's steps of the
    shipped HalfCheetah and Hopper plans: 2.1-2.3x faster, the same steps to the bit)."""
    n = g.shape[0]
    lower, upper = np.zeros(n, bool), np.zeros(n, bool)
    best, stall, e = n + 1, 0, 0.5 * tol
    eye, idx = np.eye(n, dtype=bool), np.arange(n)
    d = np.zeros(n)
    for i in range(max_iter):
        if i and time.perf_counter() > deadline:
            break
        held = lower | upper
        bound = np.where(lower, lo, hi)
        d = np.linalg.solve(np.where(held[:, None], eye, H), np.where(held, bound, -g))
        d = np.where(held, bound, d)  # held ones exactly on their bound
        mu = np.einsum("ij,j->i", H, d) + g  # the batch's arithmetic: the same exchanges
        to_lower, to_upper = ~held & (d < lo - e), ~held & (d > hi + e)
        misplaced = to_lower | to_upper | (lower & (mu < -e)) | (upper & (mu > e))
        count = int(misplaced.sum())
        if count == 0:
            break
        best, stall = (count, 0) if count < best else (best, stall + 1)
        if stall >= 3:  # Murty's rule: only the last misplaced component
            misplaced = idx == n - 1 - int(np.argmax(misplaced[::-1]))
        lower, upper = np.where(misplaced, to_lower, lower), np.where(misplaced, to_upper, upper)
    d = np.clip(d, lo, hi)
    mu = np.einsum("ij,j->i", H, d) + g
    return d, bool(np.abs(d - np.clip(d - mu, lo, hi)).max() <= tol)


def _step(g, H, lo, hi, tol: float, deadline: float) -> np.ndarray:
    """The SQP step of every sample: :func:`box_qp`, and the batched projected Newton of
    :mod:`qmpc.newton` for the samples where it did not settle."""
    d, done = box_qp(g, H, lo, hi, tol, deadline=deadline)
    other = np.flatnonzero(~done | ~np.isfinite(d).all(axis=1))
    if other.size:
        qp = _StepQP(g[other], H[other])
        d[other] = solve_box(
            qp, np.zeros_like(d[other]), lo[other], hi[other], tol=tol, max_iter=50, deadline=deadline
        ).u
    return d


class _StepQP:
    """The QPs of one SQP iteration as a :class:`~qmpc.newton.Oracle` of the step ``d``."""

    def __init__(self, g: np.ndarray, H: np.ndarray):
        self.g, self.H = g, H

    def value(self, d: np.ndarray, rows: np.ndarray) -> np.ndarray:
        Hd = np.einsum("bij,bj->bi", self.H[rows], d)
        return np.einsum("bi,bi->b", self.g[rows] + 0.5 * Hd, d)

    def derivatives(self, d: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        Hd = np.einsum("bij,bj->bi", self.H[rows], d)
        return np.einsum("bi,bi->b", self.g[rows] + 0.5 * Hd, d), self.g[rows] + Hd, self.H[rows]


def solve_box_sqp(
    oracle: Oracle,
    u0: np.ndarray,
    lb: np.ndarray,
    ub: np.ndarray,
    *,
    tol: float = 1e-8,
    max_iter: int = 50,
    floor: float = FLOOR,
    armijo: float = 1e-4,
    max_backtracks: int = 20,
    deadline: float = np.inf,
    hessian_at_solution: bool = True,
) -> BoxNewtonResult:
    """Minimise every ``f_b`` over the box ``lb ≤ u ≤ ub`` (``(n,)`` each) from ``u0 (B, n)``;
    ``floor``: the eigenvalue floor of :func:`convexified`, relative to the largest. A small one
    lets a step along negative (or nearly no) curvature go far, to the box, which bounds it:
    measured on the shipped checkpoints' own closed-loop states at H = 5, 1e-2 took 16–32 SQP
    iterations per step on average (p99 50, the limit; IDP failed 64 of 150 steps), 1e-5 took
    7–13; at 1e-5, models/inverted_double_pendulum.pt still crept along a direction of curvature
    −0.002 next to one of 5000 (1 step in 10 ran out of iterations), which 1e-8 solves.
    ``deadline``: a ``time.perf_counter()`` after which nothing new starts: no iteration, no Newton
    step of the QP, no backtrack (the samples still running keep their last accepted iterate,
    unconverged; an evaluation or an eigen-decomposition already started runs to its end). Never
    raises on a sample that does not converge (``converged`` is False).

    An oracle with ``first_order(u, rows) -> (f, ∇f)`` (the same values as ``derivatives``') is
    asked for the Hessian only where an iteration needs it: after a full step from a residual of
    at most :data:`LAZY_RESIDUAL`, which Newton's quadratic convergence usually ends, the first
    order comes first and the Hessian only if the sample is not done (measured on the shipped
    Hopper and Walker2d plans at H = 3: see docs/benchmarks.md). ``hessian_at_solution``: the
    result's ``hessian`` at every last iterate (False: where it was skipped, the previous one's)."""
    u = np.clip(np.asarray(u0, np.float64), lb, ub)
    B = u.shape[0]
    f, g, H = oracle.derivatives(u, np.arange(B))
    r = _residual(u, f, g, H, lb, ub)
    its = np.zeros(B, int)
    first_order = callable(getattr(oracle, "first_order", None))
    stale = np.zeros(B, bool)  # the Hessian is not at u (skipped where the sample was done)
    live = np.flatnonzero((r > tol) & np.isfinite(r))
    for _ in range(max_iter):
        if live.size == 0 or time.perf_counter() > deadline:
            break
        ul, gl = u[live], g[live]
        e = np.minimum(1e-3, r[live])[:, None]
        held = ((ul - lb <= e) & (gl > 0)) | ((ub - ul <= e) & (gl < 0))
        qp_tol = 1e-3 * np.minimum(r[live], 1.0).min()
        d = _step(gl, convexified(H[live], floor, held), lb - ul, ub - ul, qp_tol, deadline)
        slope = np.einsum("bi,bi->b", gl, d)
        step, accepted, un = np.ones(live.size), np.zeros(live.size, bool), ul.copy()
        for _ in range(max_backtracks):
            todo = np.flatnonzero(~accepted & (slope < 0))
            if todo.size == 0 or time.perf_counter() > deadline:
                break
            trial = _on_bounds(ul[todo], step[todo], d[todo], lb, ub)
            ft = oracle.value(trial, live[todo])
            slack = 1e-13 * (1.0 + np.abs(f[live[todo]]))
            ok = ft <= f[live[todo]] + armijo * step[todo] * slope[todo] + slack
            un[todo[ok]], accepted[todo[ok]] = trial[ok], True
            step[todo[~ok]] *= 0.5
        moved = live[accepted]
        its[live] += 1
        u[moved] = un[accepted]
        lazy = (step[accepted] == 1.0) & (r[moved] <= LAZY_RESIDUAL) if first_order else np.zeros(moved.size, bool)
        _evaluate(oracle, moved[~lazy], moved[lazy], u, f, g, H, r, stale, lb, ub, tol)
        live = moved[(r[moved] > tol) & np.isfinite(r[moved])]  # stuck or non-finite samples stop here
    if hessian_at_solution and stale.any():
        rows = np.flatnonzero(stale)
        H[rows] = oracle.derivatives(u[rows], rows)[2]
    return BoxNewtonResult(u, f, g, r, r <= tol, its, H)


def _evaluate(oracle, full, lazy, u, f, g, H, r, stale, lb, ub, tol) -> None:
    """The value, gradient, Hessian and residual at the new iterates of rows ``full``, in place;
    of rows ``lazy`` the first order alone, then the Hessian of those not done after all."""
    if lazy.size:
        f[lazy], g[lazy] = oracle.first_order(u[lazy], lazy)
        r[lazy] = _residual(u[lazy], f[lazy], g[lazy], None, lb, ub)
        stale[lazy] = True
        full = np.sort(np.concatenate([full, lazy[r[lazy] > tol]]))
    if full.size:
        f[full], g[full], H[full] = oracle.derivatives(u[full], full)
        r[full] = _residual(u[full], f[full], g[full], H[full], lb, ub)
        stale[full] = False


def _on_bounds(u: np.ndarray, step: np.ndarray, d: np.ndarray, lb: np.ndarray, ub: np.ndarray) -> np.ndarray:
    """``clip(u + step·d)``, where a whole step that the QP put on a bound (``d = ub − u``) lands
    exactly on it (``u + (ub − u)`` can round to one ulp inside)."""
    trial = np.clip(u + step[:, None] * d, lb, ub)
    whole = (step == 1.0)[:, None]
    trial = np.where(whole & (d == ub - u), ub, trial)
    return np.where(whole & (d == lb - u), lb, trial)


def _residual(u, f, g, H, lb, ub) -> np.ndarray:
    """The projected-gradient residual; ``inf`` where the value or a derivative is not finite (a
    rollout that overflowed: the sample stops, unconverged); ``H`` None: not checked."""
    finite = np.isfinite(f) & np.isfinite(g).all(axis=1)
    if H is not None:
        finite &= np.isfinite(H).all(axis=(1, 2))
    r = np.full(u.shape[0], np.inf)
    r[finite] = kkt_residual(u[finite], g[finite], np.zeros((int(finite.sum()), 0)), lb, ub)
    return r
