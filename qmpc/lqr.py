"""Discrete-time LQR: the ground truth that qmpc's sensitivities and learned Q are checked against.

Costs, not rewards: ``c(x, u) = xᵀ Qc x + uᵀ R u`` and the cost-to-go is minimised.
"""

from __future__ import annotations

import numpy as np

from qmpc.errors import InputError

__all__ = ["dare", "lqr_q_matrix"]


def dare(
    A: np.ndarray, B: np.ndarray, Qc: np.ndarray, R: np.ndarray, discount: float = 1.0, iters: int = 100000
) -> tuple[np.ndarray, np.ndarray]:
    """Solve the discounted discrete algebraic Riccati equation by fixed-point iteration.

    Returns ``(P, K)`` with value ``V(x) = xᵀ P x`` and optimal action ``u = −K x`` for
    ``x⁺ = A x + B u`` and stage cost ``xᵀ Qc x + uᵀ R u``, discount ``γ``.
    """
    P = np.array(Qc, dtype=float)
    g = float(discount)
    for _ in range(iters):
        S = R + g * B.T @ P @ B
        K = g * np.linalg.solve(S, B.T @ P @ A)
        Pn = Qc + g * A.T @ P @ A - g * A.T @ P @ B @ K
        if np.abs(Pn - P).max() <= 1e-13 * max(1.0, np.abs(P).max()):
            P = Pn
            break
        P = Pn
    else:
        raise InputError("expected a stabilisable (A, B): the Riccati iteration did not converge")
    P = 0.5 * (P + P.T)
    K = g * np.linalg.solve(R + g * B.T @ P @ B, B.T @ P @ A)
    return P, K


def lqr_q_matrix(A, B, Qc, R, discount: float = 1.0) -> np.ndarray:
    """``M`` such that the optimal Q-function is ``Q*(x, u) = [x; u]ᵀ M [x; u]``."""
    P, _ = dare(A, B, Qc, R, discount)
    g = float(discount)
    return np.block([[Qc + g * A.T @ P @ A, g * A.T @ P @ B], [g * B.T @ P @ A, R + g * B.T @ P @ B]])
