"""The general (non-convex) Q network :class:`MLPQ`, torch and CasADi twin together: a plain MLP
on ``[x, u]``. Not convex, so the solver may return a local minimum; the bridge differentiates the
local minimum it is given."""

from __future__ import annotations

from collections.abc import Sequence

import casadi as ca
import torch

from qmpc.errors import InputError
from qmpc.networks.base import QNetwork, ThetaView, make_mlp, mlp_twin

__all__ = ["MLPQ"]


class MLPQ(QNetwork):
    """A general (non-convex) MLP on ``[x, u]``.

    ``argmin_u Q`` may have several local minima; the solver returns one (from its initial
    guess) and the bridge differentiates that local minimum. Prefer :class:`~qmpc.networks.picnn.PICNN` or
    :class:`~qmpc.networks.quadratic.QuadraticQ` where a global minimum matters.

    Args:
        obs_dim: state dimension ``nx``.
        act_dim: action dimension ``nu``.
        hidden: hidden widths.
        activation: smooth activation (``tanh``, ``softplus``, ``sigmoid``, ``silu``).
        action_curvature: ``m ≥ 0`` of an added ``½ m ‖u‖²`` (a bounded network has no interior
            minimum without it far from the data).
    """

    convex_in_u = False

    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        hidden: Sequence[int] = (64, 64),
        activation: str = "tanh",
        action_curvature: float = 0.0,
    ):
        super().__init__(obs_dim, act_dim)
        if action_curvature < 0:
            raise InputError(f"expected action_curvature >= 0, got {action_curvature}")
        self.action_curvature = float(action_curvature)
        self.hidden = tuple(int(h) for h in hidden)
        self.net = make_mlp((obs_dim + act_dim, *self.hidden, 1), activation, last_activation=False)

    def forward(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        x = self._prepare(x, u)
        q = self.net(torch.cat([x, u], dim=-1)).squeeze(-1)
        return q + 0.5 * self.action_curvature * (u**2).sum(-1)

    def casadi_expr(self, x, u, theta):
        q = mlp_twin(self.net, ca.vertcat(x, u), ThetaView(self, theta))
        return q + 0.5 * self.action_curvature * ca.sumsqr(u)
