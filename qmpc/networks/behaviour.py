"""A behaviour-cloned policy and the behaviour-regularised cost-to-go of offline training.

Offline, ``min_v Q(x, v)`` picks actions the data never contains, where ``Q`` is wrong. The
behaviour-regularised network adds a trust region around the data's actions to ``Q`` itself,

    Q̃(x, u) = Q(x, u) + ½ β Σ_i ((u_i − π_β(x)_i) / s_i)²,

with ``π_β`` a deterministic policy cloned from the dataset (:class:`BehaviourPolicy`, fixed once
fitted) and ``s`` half the action range, or (``scale="residual"`` of :meth:`BehaviourPolicy.fit`)
the spread of the data's actions around ``π_β``: the penalty is then ``β`` times the negative
log-likelihood of a Gaussian behaviour policy ``N(π_β(x), diag s²)`` (up to a constant), strong
where the data is narrow (an expert with little noise) and weak where it covers the box (uniform
random actions), with one ``β``. ``Q̃`` is a :class:`~qmpc.networks.QNetwork` like any
other: its parameters are ``Q``'s alone (``π_β``'s weights are buffers, constants of the twin),
so the CasADi problem, the batched Newton, the sensitivities ``∂u*/∂θ`` and the controller all
work on it unchanged, and ``argmin_u Q̃`` is the offline controller.
"""

from __future__ import annotations

from collections.abc import Sequence

import casadi as ca
import numpy as np
import torch
from torch import nn

from qmpc.errors import ConfigError, InputError
from qmpc.networks.base import ACTIVATIONS, QNetwork, make_mlp, np_activation

__all__ = ["BehaviourPolicy", "BehaviourRegularizedQ", "PenalizedOracle"]

SCALES = ("range", "residual", "value")
"""How the penalty scales each action dimension (:meth:`BehaviourPolicy.fit`)."""
MIN_SCALE = 0.01
"""The ``residual`` scale's floor, as a fraction of half the action range (a dataset of one
deterministic policy would otherwise make the penalty a hard constraint)."""


class BehaviourPolicy(nn.Module):
    """``π_β(x) = m + s ∘ tanh(MLP((x − μ) / σ))`` ``(B, obs_dim) -> (B, act_dim)``: a
    deterministic policy inside the action box ``[m − s, m + s]``, fitted to a dataset's actions
    by least squares (:meth:`fit`)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: Sequence[int], activation: str, low, high):
        super().__init__()
        low, high = np.asarray(low, np.float64), np.asarray(high, np.float64)
        if low.shape != (act_dim,) or high.shape != (act_dim,) or not (np.isfinite(low) & np.isfinite(high)).all():
            raise ConfigError(
                f"expected finite action bounds of shape ({act_dim},) for a behaviour-cloned policy, got {low} and "
                f"{high}"
            )
        self.obs_dim, self.act_dim, self.activation = int(obs_dim), int(act_dim), activation
        self.hidden = [int(h) for h in hidden]
        self.net = make_mlp([obs_dim, *self.hidden, act_dim], activation, last_activation=False)
        self.register_buffer("obs_mean", torch.zeros(obs_dim, dtype=torch.float64))
        self.register_buffer("obs_std", torch.ones(obs_dim, dtype=torch.float64))
        self.register_buffer("act_mid", torch.as_tensor((high + low) / 2))
        self.register_buffer("act_half", torch.as_tensor((high - low) / 2))
        self.register_buffer("pen_scale", self.act_half.clone())  # the penalty's s: half the range, or see fit

    def load_state_dict(self, state, strict: bool = True, assign: bool = False):
        """As :class:`torch.nn.Module`'s; a state saved before :attr:`pen_scale` existed (whose
        penalty was scaled by half the range) gets ``act_half`` as its scale."""
        if "pen_scale" not in state and "act_half" in state:
            state = {**state, "pen_scale": state["act_half"]}
        return super().load_state_dict(state, strict, assign)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xt = ((x - self.obs_mean.to(x.dtype)) / self.obs_std.to(x.dtype)).to(self.act_mid.dtype)
        out = self.act_mid + self.act_half * torch.tanh(self.net(xt.to(next(self.net.parameters()).dtype)))
        return out.to(x.dtype)

    def fit(
        self,
        obs: np.ndarray,
        act: np.ndarray,
        steps: int,
        batch_size: int,
        lr: float,
        seed: int,
        scale: str = "range",
        value: float = 1.0,
    ) -> list[float]:
        """Least squares on the actions of ``obs (N, obs_dim)``, ``act (N, act_dim)`` (normalised
        by half the range), ``steps`` Adam steps on batches drawn with ``seed``; the input
        standardisation comes from ``obs``. ``scale``: the penalty's :attr:`pen_scale`, ``range``
        (half the action range), ``residual`` (per action dimension, the root mean square of
        ``a − π_β(x)`` over the data, at least :data:`MIN_SCALE` of half the range) or ``value``
        (the residual scale over ``√value``, ``value > 0`` the size of a cost-to-go on the data:
        :meth:`~qmpc.data.ReplayBuffer.mean_cost_to_go`). Returns the loss every 100 steps."""
        if scale not in SCALES:
            raise ConfigError(f"expected a behaviour scale in {SCALES}, got {scale!r}")
        if scale == "value" and not (np.isfinite(value) and value > 0):
            raise ConfigError(
                f"expected a finite cost-to-go size > 0 for the behaviour scale 'value', got {value} (a dataset "
                "whose costs are all 0 has none: use 'residual')"
            )
        obs, act = np.asarray(obs, np.float64), np.asarray(act, np.float64)
        if obs.ndim != 2 or obs.shape[1] != self.obs_dim or act.shape != (len(obs), self.act_dim) or len(obs) == 0:
            raise InputError(
                f"expected obs (N, {self.obs_dim}) and act (N, {self.act_dim}) with N > 0, got {obs.shape} and "
                f"{act.shape}"
            )
        with torch.no_grad():
            self.obs_mean.copy_(torch.from_numpy(obs.mean(axis=0)))
            self.obs_std.copy_(torch.from_numpy(np.maximum(obs.std(axis=0), 1e-6)))
        dtype = next(self.net.parameters()).dtype
        x, a = torch.from_numpy(obs).to(dtype), torch.from_numpy(act).to(dtype)
        half = self.act_half.to(dtype)
        opt = torch.optim.Adam(self.net.parameters(), lr=lr)
        rng = np.random.default_rng(seed)
        losses = []
        for k in range(steps):
            i = torch.from_numpy(rng.integers(0, len(x), size=batch_size))
            loss = (((self(x[i]) - a[i]) / half) ** 2).sum(dim=1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            if k % 100 == 0 or k == steps - 1:
                losses.append(float(loss.detach()))
        with torch.no_grad():
            if scale == "range":
                self.pen_scale.copy_(self.act_half)
            else:
                self.pen_scale.copy_(self._residual_scale(obs, act) / (np.sqrt(value) if scale == "value" else 1.0))
        return losses

    def _residual_scale(self, obs: np.ndarray, act: np.ndarray, chunk: int = 65536) -> torch.Tensor:
        """``(act_dim,)`` root mean square of ``act − π_β(obs)`` per dimension, floored."""
        sq = np.zeros(self.act_dim)
        for i in range(0, len(obs), chunk):
            pred = self(torch.from_numpy(obs[i : i + chunk])).double().numpy()
            sq += ((act[i : i + chunk] - pred) ** 2).sum(axis=0)
        half = self.act_half.double().numpy()
        return torch.from_numpy(np.maximum(np.sqrt(sq / len(obs)), MIN_SCALE * half))

    def arrays(self) -> dict[str, np.ndarray]:
        """Every weight and buffer as float64 numpy, by ``state_dict`` name."""
        return {k: v.detach().to("cpu", torch.float64).numpy() for k, v in self.state_dict().items()}


def _policy_numpy(w: dict[str, np.ndarray], n_layers: int, activation: str, x: np.ndarray) -> np.ndarray:
    """``π_β(x) (B, act_dim)`` from :meth:`BehaviourPolicy.arrays`-style weights (prefix stripped)."""
    z = (x - w["obs_mean"]) / w["obs_std"]
    for k in range(n_layers):
        z = z @ w[f"net.{2 * k}.weight"].T + w[f"net.{2 * k}.bias"]
        if k < n_layers - 1:
            z = np_activation(activation, z)[0]
    return w["act_mid"] + w["act_half"] * np.tanh(z)


def _policy_twin(w: dict[str, np.ndarray], n_layers: int, activation: str, x):
    """CasADi twin of ``π_β`` with its weights as constants; ``x (obs_dim × B)``, one state per column."""
    cols = x.size2()
    act = ACTIVATIONS[activation][1]
    z = (x - ca.repmat(ca.DM(w["obs_mean"]), 1, cols)) / ca.repmat(ca.DM(w["obs_std"]), 1, cols)
    for k in range(n_layers):
        z = ca.mtimes(ca.DM(w[f"net.{2 * k}.weight"]), z) + ca.repmat(ca.DM(w[f"net.{2 * k}.bias"]), 1, cols)
        if k < n_layers - 1:
            z = act(z)
    return ca.repmat(ca.DM(w["act_mid"]), 1, cols) + ca.repmat(ca.DM(w["act_half"]), 1, cols) * ca.tanh(z)


class BehaviourRegularizedQ(QNetwork):
    """``Q̃(x, u) = Q(x, u) + ½ β ‖(u − π_β(x)) / s‖²`` (module docstring); ``q`` is shared, not
    copied: ``Q̃`` follows every change of its weights and input normalisation. ``(B,)`` like ``Q``."""

    def __init__(self, q: QNetwork, policy: BehaviourPolicy, weight: float):
        super().__init__(q.obs_dim, q.act_dim)
        if (policy.obs_dim, policy.act_dim) != (q.obs_dim, q.act_dim):
            raise InputError(
                f"expected a behaviour policy for obs_dim {q.obs_dim}, act_dim {q.act_dim}, got "
                f"{policy.obs_dim}, {policy.act_dim}"
            )
        if not (np.isfinite(weight) and weight >= 0):
            raise ConfigError(f"expected a finite behaviour weight >= 0, got {weight}")
        self.q = q
        self.convex_in_u, self.vectorized_twin = q.convex_in_u, q.vectorized_twin
        self.activation, self.n_layers = policy.activation, len(policy.hidden) + 1
        self.register_buffer("bc_weight", torch.tensor(float(weight), dtype=torch.float64))
        for name, v in policy.state_dict().items():  # buffers: constants of the twin, never trained here
            self.register_buffer("pi_" + name.replace(".", "_"), v.detach().clone().to(torch.float64))
        self._names = list(policy.state_dict())

    def policy_arrays(self, weights: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """``π_β``'s weights by their :class:`BehaviourPolicy` names (from ``weights``, by this
        network's ``state_dict`` names, or the current buffers)."""
        if weights is None:
            weights = {k: v.detach().to("cpu", torch.float64).numpy() for k, v in self.named_buffers()}
        return {n: np.asarray(weights["pi_" + n.replace(".", "_")]) for n in self._names}

    def behaviour_action(self, x: np.ndarray) -> np.ndarray:
        """``π_β(x) (B, act_dim)`` for ``x (B, obs_dim)`` (numpy, float64)."""
        return _policy_numpy(self.policy_arrays(), self.n_layers, self.activation, np.asarray(x, np.float64))

    def forward(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        self._prepare(x, u)
        w = {n: getattr(self, "pi_" + n.replace(".", "_")).to(x.dtype) for n in self._names}
        z = (x - w["obs_mean"]) / w["obs_std"]
        for k in range(self.n_layers):
            z = z @ w[f"net.{2 * k}.weight"].T + w[f"net.{2 * k}.bias"]
            if k < self.n_layers - 1:
                z = ACTIVATIONS[self.activation][0](z)
        r = w["act_mid"] + w["act_half"] * torch.tanh(z)
        pen = 0.5 * self.bc_weight.to(x.dtype) * (((u - r) / w["pen_scale"]) ** 2).sum(dim=1)
        return self.q(x, u) + pen.to(u.dtype)

    def casadi_expr(self, x, u, theta):
        cols = x.size2()
        T = ca.DM(self.q.obs_transform.detach().double().numpy())
        xq = ca.mtimes(T, x - ca.repmat(ca.DM(self.q.obs_shift.detach().double().numpy()), 1, cols))
        w = self.policy_arrays()
        d = (u - _policy_twin(w, self.n_layers, self.activation, x)) / ca.repmat(ca.DM(w["pen_scale"]), 1, cols)
        return self.q.casadi_expr(xq, u, theta) + 0.5 * float(self.bc_weight) * ca.sum1(d * d)

    def action_oracle(self, x: np.ndarray, weights: dict[str, np.ndarray] | None = None) -> PenalizedOracle:
        """``Q̃``'s closed form for a batch of fixed states (the inner network's ``action_oracle``
        plus the penalty): what the batched Newton calls."""
        if weights is None:
            weights = {
                n: t.detach().to("cpu", torch.float64).numpy()
                for n, t in (*self.named_parameters(), *self.named_buffers())
            }
        inner = self.q.action_oracle(x, {k[2:]: v for k, v in weights.items() if k.startswith("q.")})
        w = self.policy_arrays(weights)
        r = _policy_numpy(w, self.n_layers, self.activation, np.asarray(x, np.float64))
        return PenalizedOracle(inner, r, float(weights["bc_weight"]), w["pen_scale"])


class PenalizedOracle:
    """An oracle of ``Q`` (:class:`~qmpc.newton.Oracle`) plus ``½ β ‖(u − r_b) / s‖²`` per sample."""

    def __init__(self, inner, reference: np.ndarray, weight: float, scale: np.ndarray):
        self.inner, self.r, self.beta = inner, reference, weight
        self.inv2 = 1.0 / np.asarray(scale, np.float64) ** 2
        if callable(getattr(inner, "first_order", None)):  # the Newton then skips Hessians it does not need
            self.first_order = self._first_order

    def _first_order(self, u: np.ndarray, rows: np.ndarray | slice = slice(None)) -> tuple[np.ndarray, np.ndarray]:
        """``(value, gradient)``: :meth:`derivatives`' first two outputs, bit for bit."""
        q, g = self.inner.first_order(u, rows)
        p, gp = self._penalty(u, rows)
        return q + p, g + gp

    def value(self, u: np.ndarray, rows: np.ndarray | slice = slice(None)) -> np.ndarray:
        return self.inner.value(u, rows) + self._penalty(u, rows)[0]

    def derivatives(
        self, u: np.ndarray, rows: np.ndarray | slice = slice(None)
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        q, g, H = self.inner.derivatives(u, rows)
        p, gp = self._penalty(u, rows)
        return q + p, g + gp, H + self.beta * np.diag(self.inv2)[None]

    def _penalty(self, u: np.ndarray, rows: np.ndarray | slice) -> tuple[np.ndarray, np.ndarray]:
        """``½ β ‖(u − r) / s‖² (R,)`` and its gradient ``(R, nu)``."""
        d = u - self.r[rows]
        return 0.5 * self.beta * (d * d * self.inv2).sum(axis=1), self.beta * d * self.inv2
