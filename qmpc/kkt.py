"""The KKT math of a batch of solutions, framework-free (numpy only): which bounds are active, the
certificate that accepts a solution, the second-order check and the adjoint of the reduced KKT
system that the torch bridge turns into gradients (see :mod:`qmpc.solver` for the derivation).

Every function takes a batch of solutions of ``min_w J(w) s.t. lbw ≤ w ≤ ubw, g(w) = 0`` with
``w = (u_0..u_N, x_1..x_N)`` (multiple shooting; horizon 1 is ``w = u_0`` and no ``g``) and named
arrays, batch first: ``w, lam_x (B, n_w)``, ``grad_L (B, n_w)``, ``g (B, n_g)``, the Hessian of the
Lagrangian ``H (B, n_w, n_w)`` and the constraint Jacobian ``G (B, n_g, n_w)``, where
``g_k = f(x_k, u_k) − x_{k+1}`` are the rows ``k·nx … (k+1)·nx`` of ``g``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = ["Adjoint", "adjoint", "at_bounds", "kkt_residual", "not_minimum", "null_space", "reduced_hessian"]


class Adjoint(NamedTuple):
    """Solution of the adjoint reduced KKT system for a batch of seeds."""

    a: np.ndarray
    """``(B, n_w)``, zero on components at a bound and on unusable samples."""
    b: np.ndarray
    """``(B, n_g)``."""
    singular: np.ndarray
    """``(B,)`` bool: the reduced KKT matrix was singular, or the reduced Hessian (on the null
    space of the dynamics and of the active bounds) not positive definite: not a strict local
    minimum (a saddle, a maximum)."""
    weak: np.ndarray
    """``(B,)`` int: number of weakly active bounds in each sample."""


def kkt_residual(w: np.ndarray, grad_L: np.ndarray, g: np.ndarray, lbw: np.ndarray, ubw: np.ndarray) -> np.ndarray:
    """The certificate: ``(B,)`` max of the projected gradient ``|w − clip(w − ∇_w L)|`` and of
    ``|g|``; ``inf`` where anything is not finite."""
    pg = w - np.clip(w - grad_L, lbw, ubw)
    r = np.abs(pg).max(axis=1)
    if g.shape[1]:
        r = np.maximum(r, np.abs(g).max(axis=1))
    r[~np.isfinite(r) | ~np.isfinite(w).all(axis=1)] = np.inf
    return r


def at_bounds(
    w: np.ndarray, lam_x: np.ndarray, lbw: np.ndarray, ubw: np.ndarray, bound_tol: float, multiplier_tol: float
) -> tuple[np.ndarray, np.ndarray]:
    """``(fixed, weak)`` masks ``(B, n_w)``: the components at a bound (within
    ``bound_tol · (1 + |bound|)`` of it, or with a multiplier ``lam_x`` of the bound's sign —
    CasADi's: negative at a lower bound — larger than the distance to it: an interior-point
    solver stops inside its active bounds, at a distance × multiplier of about its barrier
    parameter), and those of them whose multiplier is at most ``multiplier_tol`` (weakly active)."""
    with np.errstate(invalid="ignore"):
        d_lb, d_ub = w - lbw, ubw - w
        at_lb = (d_lb <= bound_tol * (1 + np.abs(np.where(np.isfinite(lbw), lbw, 0)))) | (-lam_x > d_lb)
        at_ub = (d_ub <= bound_tol * (1 + np.abs(np.where(np.isfinite(ubw), ubw, 0)))) | (lam_x > d_ub)
    fixed = at_lb | at_ub
    return fixed, fixed & (np.abs(lam_x) <= multiplier_tol)


def null_space(G: np.ndarray, free_u: np.ndarray, nx: int) -> np.ndarray:
    """``Z (B, n_w, n_u)``: a basis of the null space of ``G (B, n_g, n_w)`` and of the fixed
    actions (``free_u (B, n_u)``, 1 where free), ``n_u = n_w − n_g``. Its action rows pick the free
    actions; its state rows are the states' response ``S_{k+1} = A_k S_k + B_k E`` (``x_0``
    fixed), so ``G Z = 0``."""
    B, ng, nw = G.shape
    nu = nw - ng
    Z = np.zeros((B, nw, nu))
    Z[:, np.arange(nu), np.arange(nu)] = free_u
    S = np.zeros((B, nx, nu))
    for k in range(ng // nx if ng else 0):
        rows = slice(k * nx, (k + 1) * nx)
        x_k = slice(nu + (k - 1) * nx, nu + k * nx)  # columns of x_k in w (k ≥ 1)
        S = G[:, rows, :nu] * free_u[:, None, :] + (G[:, rows, x_k] @ S if k else 0.0)
        Z[:, nu + k * nx : nu + (k + 1) * nx] = S
    return Z


def reduced_hessian(H: np.ndarray, G: np.ndarray, fixed: np.ndarray, nx: int) -> np.ndarray:
    """``(B, n_u, n_u)`` reduced Hessian ``Zᵀ H Z`` (:func:`null_space`) with ``1`` on the diagonal
    of the fixed actions."""
    nu = fixed.shape[1] - G.shape[1]
    free_u = (~fixed[:, :nu]).astype(float)
    with np.errstate(all="ignore"):
        Z = null_space(G, free_u, nx)
        R = Z.transpose(0, 2, 1) @ H @ Z
    R[:, np.arange(nu), np.arange(nu)] += 1.0 - free_u
    return R


def not_minimum(H: np.ndarray, G: np.ndarray, fixed: np.ndarray, nx: int) -> np.ndarray:
    """``(B,)`` bool: the reduced Hessian is not positive definite (a saddle, a maximum or a
    singular point), relative to its largest eigenvalue."""
    R = reduced_hessian(H, G, fixed, nx)
    with np.errstate(invalid="ignore"):
        ev = np.linalg.eigvalsh(np.where(np.isfinite(R), R, 0.0))
    scale = np.maximum(1.0, np.abs(ev).max(axis=1))
    return (ev.min(axis=1) <= 1e-12 * scale) | ~np.isfinite(R).all(axis=(1, 2))


def _kkt_matrix(H: np.ndarray, G: np.ndarray, fixed: np.ndarray) -> np.ndarray:
    """``[H_FF G_Fᵀ; G_F 0]`` with identity rows for the fixed components, ``(B, n, n)``."""
    B, nw = fixed.shape
    ng = G.shape[1]
    free = (~fixed).astype(float)
    K = np.zeros((B, nw + ng, nw + ng))
    K[:, :nw, :nw] = H * free[:, :, None] * free[:, None, :]
    if ng:
        Gf = G * free[:, None, :]
        K[:, :nw, nw:] = Gf.transpose(0, 2, 1)
        K[:, nw:, :nw] = Gf
    idx = np.arange(nw)
    K[:, idx, idx] += fixed.astype(float)
    return K


def adjoint(
    H: np.ndarray, G: np.ndarray, fixed: np.ndarray, seed: np.ndarray, usable: np.ndarray, nx: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(a (B, n_w), b (B, n_g), singular (B,))``: the reduced KKT system ``K (a, b) = (ū_F, 0)``
    solved for the seeds ``ū = seed (B, n_w)`` on the ``usable (B,)`` samples that are strict local
    minima; zero elsewhere (``singular`` marks usable samples that are not)."""
    B, nw = seed.shape
    K = _kkt_matrix(H, G, fixed)
    rhs = np.zeros((B, K.shape[1]))
    rhs[:, :nw] = seed * ~fixed
    singular = np.zeros(B, bool)
    if usable.any():  # strict local minimum <=> reduced Hessian positive definite
        singular[usable] = not_minimum(H[usable], G[usable], fixed[usable], nx)
    sol = np.zeros_like(rhs)
    good = usable & ~singular
    if good.any():
        try:
            sol[good] = np.linalg.solve(K[good], rhs[good][..., None])[..., 0]
        except np.linalg.LinAlgError:
            for i in np.flatnonzero(good):
                try:
                    sol[i] = np.linalg.solve(K[i], rhs[i])
                except np.linalg.LinAlgError:
                    singular[i] = True
        resid = np.abs(np.einsum("bij,bj->bi", K, sol) - rhs).max(axis=1)
        singular |= good & (~np.isfinite(sol).all(axis=1) | (resid > 1e-6 * (1 + np.abs(rhs).max(axis=1))))
    sol[~usable | singular] = 0.0
    return sol[:, :nw], sol[:, nw:], singular & usable
