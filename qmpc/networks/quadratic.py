"""The NAF-style quadratic Q network :class:`QuadraticQ`, torch and CasADi twin together:
``V(x) + ½ (u-μ(x))ᵀ P(x) (u-μ(x))``, ``P ≻ 0``: convex in u."""

from __future__ import annotations

from collections.abc import Sequence

import casadi as ca
import numpy as np
import torch
from torch import nn

from qmpc.errors import InputError
from qmpc.networks.base import QNetwork, ThetaView, linear_twin, make_mlp, mlp_twin, softplus_c, softplus_t

__all__ = ["QuadraticQ"]


class QuadraticQ(QNetwork):
    """NAF-style quadratic cost-to-go, convex in u.

    ``Q(x, u) = v(h) + ½‖C h‖² + ½ (u − μ(h))ᵀ P(h) (u − μ(h))`` with features
    ``h = MLP(x)`` (``h = x`` when ``hidden=()``), ``P = L Lᵀ + m I`` where ``L`` is lower
    triangular with a softplus diagonal (diagonal only when ``diagonal=True``) and
    ``m = min_curvature``. With ``hidden=()`` the whole Q is a quadratic in ``(x, u)`` with
    constant curvature, which is enough to represent an LQR Q-function exactly when
    ``state_dependent_curvature=False``.

    Args:
        obs_dim: state dimension ``nx``.
        act_dim: action dimension ``nu``.
        hidden: widths of the state feature MLP.
        activation: smooth activation of that MLP (``tanh``, ``softplus``, ``sigmoid``, ``silu``).
        diagonal: restrict ``P`` to be diagonal.
        min_curvature: ``m > 0`` added to ``P``'s diagonal (keeps the minimiser unique).
        state_dependent_curvature: ``P`` depends on ``x``; if False it is a free constant.
    """

    convex_in_u = True

    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        hidden: Sequence[int] = (64, 64),
        activation: str = "tanh",
        diagonal: bool = False,
        min_curvature: float = 1e-3,
        state_dependent_curvature: bool = True,
    ):
        super().__init__(obs_dim, act_dim)
        if min_curvature <= 0:
            raise InputError(f"expected min_curvature > 0, got {min_curvature}")
        self.hidden = tuple(int(h) for h in hidden)
        self.trunk = make_mlp((obs_dim, *self.hidden), activation, last_activation=True)
        d = self.hidden[-1] if self.hidden else obs_dim
        self.diagonal = bool(diagonal)
        self.min_curvature = float(min_curvature)
        self.state_dependent_curvature = bool(state_dependent_curvature)
        n_l = act_dim if diagonal else act_dim * (act_dim + 1) // 2
        self.mu = nn.Linear(d, act_dim)
        self.value = nn.Linear(d, 1)
        self.value_quad = nn.Linear(d, d, bias=False)
        if self.state_dependent_curvature:
            self.l_head = nn.Linear(d, n_l)
        else:
            self.l_const = nn.Parameter(torch.zeros(n_l))
        if diagonal:
            self._rows, self._cols = np.arange(act_dim), np.arange(act_dim)
        else:
            r, c = np.tril_indices(act_dim)
            self._rows, self._cols = r, c

    @classmethod
    def from_quadratic(cls, M: np.ndarray, nx: int, min_curvature: float = 1e-6) -> QuadraticQ:
        """The QuadraticQ equal to ``[x; u]ᵀ M [x; u]`` (``M`` symmetric, ``M_uu ≻ 0``, and the
        Schur complement ``M_xx − M_xu M_uu⁻¹ M_ux ⪰ 0``), e.g. an LQR Q-function."""
        M = 0.5 * (np.asarray(M, float) + np.asarray(M, float).T)
        nu = M.shape[0] - nx
        Mxx, Mxu, Muu = M[:nx, :nx], M[:nx, nx:], M[nx:, nx:]
        q = cls(nx, nu, hidden=(), min_curvature=min_curvature, state_dependent_curvature=False).double()
        K = np.linalg.solve(Muu, Mxu.T)  # u* = -K x
        S = Mxx - Mxu @ K
        ev, V = np.linalg.eigh(0.5 * (S + S.T))
        if ev.min() < -1e-9 * max(1.0, abs(ev).max()):
            raise InputError(f"expected a PSD Schur complement M_xx - M_xu M_uu^-1 M_ux, got eigenvalue {ev.min()}")
        C = (V * np.sqrt(2 * np.clip(ev, 0, None))).T  # CᵀC = 2S
        Lc = np.linalg.cholesky(2 * Muu - min_curvature * np.eye(nu))
        pairs = zip(q._rows, q._cols, strict=True)
        raw = np.array([Lc[i, j] if i != j else np.log(np.expm1(Lc[i, i])) for i, j in pairs])
        with torch.no_grad():
            q.mu.weight.copy_(torch.as_tensor(-K))
            q.mu.bias.zero_()
            q.value.weight.zero_()
            q.value.bias.zero_()
            q.value_quad.weight.copy_(torch.as_tensor(C))
            q.l_const.copy_(torch.as_tensor(raw))
        return q

    def _l_entries_t(self, h: torch.Tensor) -> torch.Tensor:
        if self.state_dependent_curvature:
            return self.l_head(h)
        return self.l_const.expand(h.shape[0], -1)

    def forward(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        x = self._prepare(x, u)
        h = self.trunk(x)
        mu = self.mu(h)
        raw = self._l_entries_t(h)
        diag = torch.as_tensor(self._rows == self._cols)
        ent = torch.where(diag, softplus_t(raw), raw)
        nu = self.act_dim
        L = raw.new_zeros(raw.shape[0], nu, nu)
        L[:, torch.as_tensor(self._rows), torch.as_tensor(self._cols)] = ent
        d = u - mu
        Ltd = torch.einsum("bij,bi->bj", L, d)  # Lᵀ d
        quad = 0.5 * (Ltd**2).sum(-1) + 0.5 * self.min_curvature * (d**2).sum(-1)
        vq = self.value_quad(h)
        return self.value(h).squeeze(-1) + 0.5 * (vq**2).sum(-1) + quad

    def casadi_expr(self, x, u, theta):
        view = ThetaView(self, theta)
        h = mlp_twin(self.trunk, x, view)
        mu = linear_twin(view, self.mu, h)
        raw = linear_twin(view, self.l_head, h) if self.state_dependent_curvature else view(self.l_const)
        nu = self.act_dim
        L = ca.MX(nu, nu) if isinstance(x, ca.MX) else ca.SX(nu, nu)
        for k, (i, j) in enumerate(zip(self._rows, self._cols, strict=True)):
            L[int(i), int(j)] = softplus_c(raw[k]) if i == j else raw[k]
        d = u - mu
        Ltd = ca.mtimes(L.T, d)
        quad = 0.5 * ca.sumsqr(Ltd) + 0.5 * self.min_curvature * ca.sumsqr(d)
        return linear_twin(view, self.value, h) + 0.5 * ca.sumsqr(view.matvec(self.value_quad.weight, h)) + quad
