"""TD losses for the cost-to-go, with the ``min`` differentiated as each mode asks.

``y = c + γ (1 − terminated) · min_v Q(x⁺, v)`` and ``loss = mean over usable samples of
(Q(x, u) − y)²``. Three target modes:

* ``semi``: ``min_v Q_target(x⁺, v)`` with the Polyak-averaged target network, detached (the
  usual semi-gradient).
* ``residual``: ``min_v Q(x⁺, v)`` of the *online* network, with the gradient flowing through
  the min. By the envelope theorem that gradient is ``∂Q/∂θ(x⁺, u*)``, which the layer computes
  in ``envelope`` mode without a KKT solve.
* ``double``: ``u* = argmin_v Q(x⁺, v)`` of the online network, evaluated by the target network,
  ``Q_target(x⁺, u*)``; the gradient flows into the online network through ``u*``
  (``implicit`` mode), because here ``∂Q_target/∂u · ∂u*/∂θ`` does not vanish.
* ``double_detached``: the same target ``Q_target(x⁺, u*)`` with ``u*`` detached (Double DQN's
  target for a continuous action): the ablation that tells what the gradient through ``u*`` adds.

With more critics (``train.critics``: clipped double Q for costs), the bootstrap is the *largest*
of the target networks' values at the argmin, ``max_i Q'_i(x⁺, u*)``, and every critic regresses
onto that one target (:func:`critic_losses`).

Samples whose solve failed are masked out of the mean and counted; they never reach the loss.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal, NamedTuple

import numpy as np
import torch

from qmpc.bridge import ArgminLayer
from qmpc.data import Batch, ReplayBuffer
from qmpc.errors import ConfigError, InputError
from qmpc.networks import QNetwork
from qmpc.solver import Status

__all__ = ["TD_MODES", "TDMode", "TDResult", "conservative_gap", "critic_losses", "model_rolled_batch", "td_loss"]

TDMode = Literal["semi", "residual", "double", "double_detached"]
_PLANNERS = {"semi": "target", "double": "online", "double_detached": "online"}
"""Which network plans the H-step target of each mode (the target network scores the plan)."""
TD_MODES = ("semi", "residual", "double", "double_detached")


class TDResult(NamedTuple):
    loss: torch.Tensor
    """Scalar mean squared TD error over the usable samples."""
    q_mean: float
    """Mean ``Q(x, u)`` of the batch."""
    target_mean: float
    """Mean target ``y`` over the usable samples."""
    fail_frac: float
    """Fraction of samples masked because their solve failed."""
    solve_ms: float
    """Wall time of the batched solve."""
    next_argmin: np.ndarray | None = None
    """``(B, act_dim)`` float64: the argmins found at ``x⁺`` (warm starts for the next solves there);
    with ``next_values``, the whole plans ``(B, H · act_dim)``."""
    next_ok: np.ndarray | None = None
    """``(B,)`` bool: which of them are usable (their solve passed the certificate)."""
    status: np.ndarray | None = None
    """``(B,)`` int8 :class:`~qmpc.solver.Status` of those solves."""
    kkt_residual: np.ndarray | None = None
    """``(B,)`` KKT residual of each of those solutions (what the certificate checked)."""
    message: str = ""
    """The NLP plugin's return status of the last failed retry of those solves (``""``: none)."""
    target: torch.Tensor | None = None
    """``(B,)`` the targets ``y``: what :func:`critic_losses` fits the other critics to."""
    ok: torch.Tensor | None = None
    """``(B,)`` bool: the samples that count (solved, and in the mask)."""
    clamped_frac: float = 0.0
    """Fraction of the samples that count whose bootstrap value ``value_bounds`` moved."""


def td_loss(
    q: QNetwork,
    q_target: QNetwork,
    online_layer: ArgminLayer,
    target_layer: ArgminLayer,
    batch: Batch,
    gamma: float | torch.Tensor,
    mode: TDMode = "semi",
    w0: np.ndarray | None = None,
    mask: torch.Tensor | None = None,
    next_values: Callable | None = None,
    score_argmin: bool = False,
    critic_targets: Sequence[QNetwork] = (),
    value_bounds: tuple[float, float] | None = None,
) -> TDResult:
    """TD loss of a batch. ``online_layer`` minimises ``q``; ``target_layer`` minimises ``q_target``;
    ``w0 (B, act_dim)`` is an optional start of the solves at ``x⁺`` (e.g.
    :meth:`~qmpc.data.ReplayBuffer.warm_starts`); ``mask (B,)`` bool: the samples that count (e.g.
    :func:`model_rolled_batch`'s), default all; ``next_values``: the H-step plan values
    (:class:`~qmpc.plan_targets.PlanTargets`; ``semi``, ``double`` through the plan,
    ``double_detached``) in place of the layers' ``min_v``; ``gamma``: the bootstrap's discount, or
    ``(B,)`` one per sample (:meth:`~qmpc.data.ReplayBuffer.n_step`); ``score_argmin``: ``semi``'s
    target is ``q_target`` at the target layer's argmin, not the layer's minimum (the layers
    minimise a regularised network, :class:`~qmpc.networks.behaviour.BehaviourRegularizedQ`);
    ``critic_targets``: the other critics' target networks (``train.critics > 1``), the bootstrap
    the largest of all target values at the argmin (not with ``residual`` nor ``next_values``);
    ``value_bounds (lo, hi)``: the bootstrap value clamped to it, in Q's units
    (:meth:`~qmpc.data.ReplayBuffer.value_bounds`; its gradient is zero where it binds)."""
    _check_mode(mode, next_values is not None, len(critic_targets))
    dtype = next(q.parameters()).dtype
    x, u, c, xn, term = (t.to(dtype) for t in (batch.obs, batch.act, batch.cost, batch.next_obs, batch.terminated))
    if next_values is not None:
        if mode not in _PLANNERS:
            raise ConfigError(f"expected train.target in {tuple(_PLANNERS)} with a plan's value, got {mode!r}")
        start = w0 if w0 is not None else np.zeros((len(xn), q.act_dim))
        res = next_values(xn, start, _PLANNERS[mode], through_plan=mode == "double")
        v = res.value.to(dtype)
    elif mode == "semi":
        with torch.no_grad():
            u_star, v, res = target_layer(xn, grad_mode="none", w0=w0, return_result=True)
            if score_argmin:
                v = q_target(xn, u_star.to(dtype))
            v = _pessimistic(v, critic_targets, xn, u_star)
    elif mode == "residual":
        if score_argmin:
            raise ConfigError(
                "expected train.target semi, double or double_detached with a scored argmin, got 'residual'"
            )
        _, v, res = online_layer(xn, grad_mode="envelope", w0=w0, return_result=True)
    else:
        detached = mode == "double_detached"
        with torch.set_grad_enabled(not detached):
            mode_u = "none" if detached else "implicit"
            u_star, _, res = online_layer(xn, grad_mode=mode_u, w0=w0, return_result=True, uses_argmin=True)
            v = _pessimistic(q_target(xn, u_star), critic_targets, xn, u_star)
    solved = torch.as_tensor(Status.ok(res.status), device=x.device)
    ok = solved if mask is None else solved & mask.to(device=x.device, dtype=torch.bool)
    if isinstance(gamma, torch.Tensor):
        gamma = gamma.to(device=x.device, dtype=dtype)
    v, clamped = _bounded(v, ok, value_bounds)
    y = c + gamma * (1.0 - term) * v
    qx = q(x, u)
    n_ok = ok.sum().clamp_min(1)
    err = torch.where(ok, qx - y, torch.zeros_like(qx))
    loss = (err**2).sum() / n_ok
    return TDResult(
        loss,
        float(qx.detach().mean()),
        float((y.detach() * ok).sum() / n_ok),
        float(1.0 - solved.float().mean()),
        float(res.solve_ms),
        res.plan if next_values is not None else res.plan[:, : q.act_dim],
        Status.ok(res.status),
        res.status,
        res.kkt_residual,
        res.message,
        y,
        ok,
        clamped,
    )


def _bounded(v: torch.Tensor, ok: torch.Tensor, bounds: tuple[float, float] | None) -> tuple[torch.Tensor, float]:
    """``v (B,)`` clamped to ``bounds (lo, hi)`` (None: unchanged), and the fraction of the samples
    that count (``ok (B,)``) it moved."""
    if bounds is None:
        return v, 0.0
    lo, hi = bounds
    if not lo <= hi:
        raise InputError(f"expected value_bounds lo <= hi, got {bounds}")
    moved = ((v < lo) | (v > hi)) & ok
    return v.clamp(lo, hi), float(moved.sum() / ok.sum().clamp_min(1))


def _check_mode(mode: str, planned: bool, critics: int) -> None:
    """``mode`` is a TD mode, and one that the other critics (``critics`` of them) can score."""
    if mode not in TD_MODES:
        raise ConfigError(f"expected train.target in {TD_MODES}, got {mode!r}")
    if critics and (mode == "residual" or planned):
        raise ConfigError(
            f"expected train.target semi, double or double_detached and a one-step target with more critics, got "
            f"{mode!r}{' and a plan' if planned else ''}"
        )


def _pessimistic(
    v: torch.Tensor, critic_targets: Sequence[QNetwork], xn: torch.Tensor, u: torch.Tensor
) -> torch.Tensor:
    """``max(v, max_i Q'_i(x⁺, u))``: the largest cost-to-go of the critics' target networks at the
    argmin ``u`` (clipped double Q for costs; ``v`` itself without other critics)."""
    for qt in critic_targets:
        v = torch.maximum(v, qt(xn, u.to(next(qt.parameters()).dtype)).to(v.dtype))
    return v


def critic_losses(critics: Sequence[QNetwork], batch: Batch, res: TDResult) -> torch.Tensor:
    """The other critics' squared TD errors against ``res``'s targets (:func:`td_loss` with their
    target networks), each a mean over the samples that count, summed (``()``: zero). The targets
    are detached here: in ``double`` mode their gradient through ``u*`` is the first critic's."""
    if not critics:
        return torch.zeros(())
    n_ok = res.ok.sum().clamp_min(1)
    y = res.target.detach()
    total = torch.zeros((), dtype=y.dtype)
    for qi in critics:
        dtype = next(qi.parameters()).dtype
        qx = qi(batch.obs.to(dtype), batch.act.to(dtype)).to(y.dtype)
        err = torch.where(res.ok, qx - y, torch.zeros_like(qx))
        total = total + (err**2).sum() / n_ok
    return total


def conservative_gap(q: QNetwork, layer: ArgminLayer, batch: Batch) -> tuple[torch.Tensor, float]:
    """``mean(Q(x, u) − Q(x, ũ))`` over the batch's states ``x`` and data actions ``u``, with ``ũ``
    the argmin of ``layer`` (Q's, or its regularised twin's) at ``x``, detached and started at
    ``u``: the conservative term (``train.conservative_weight``), whose gradient pushes Q up where
    the controller would act and down where the data acted. Samples whose solve failed are left
    out of the mean; returns the term and their fraction."""
    dtype = next(q.parameters()).dtype
    x, u = batch.obs.to(dtype), batch.act.to(dtype)
    with torch.no_grad():
        u_star, _, res = layer(x, grad_mode="none", w0=u.double().numpy(), return_result=True)
    ok = torch.as_tensor(Status.ok(res.status), device=x.device)
    gap = torch.where(ok, q(x, u) - q(x, u_star.to(dtype)), torch.zeros(len(x), dtype=dtype))
    return gap.sum() / ok.sum().clamp_min(1), float(1.0 - ok.float().mean())


def model_rolled_batch(
    buffer: ReplayBuffer, model: torch.nn.Module, index: np.ndarray, steps: int
) -> tuple[Batch, torch.Tensor]:
    """The model-rolled TD samples of a batch (``train.rollout_td``): for each of ``index (B,)`` and
    ``k = 1 … steps``, the transition ``k`` slots later in its episode (:meth:`ReplayBuffer.chains`)
    with its state replaced by the model's prediction ``x̂_k = f(… f(x_0, u_0) …, u_{k−1})`` from
    the batch's state under the buffer's own actions: Q is fitted where a plan queries it, against
    the target of the real transition (its cost and real next state). Returns the batch
    (``(steps · B, …)``, ``k``-major) and its mask ``(steps · B,)``: chains that leave their episode,
    and predictions that are not finite, are masked (their state is the real one, so nothing
    non-finite reaches Q)."""
    idx, valid = buffer.chains(index, steps)
    dtype = next(model.parameters()).dtype
    t = torch.from_numpy
    x = t(buffer.obs[idx[:, 0]]).to(dtype)
    preds = []
    with torch.no_grad():
        for k in range(1, steps + 1):
            x = model(x, t(buffer.act[idx[:, k - 1]]).to(dtype))
            preds.append(x)
    rows = idx[:, 1:].T.reshape(-1)
    pred = torch.cat(preds).to(torch.float32)
    mask = t(valid[:, 1:].T.reshape(-1).copy()) & torch.isfinite(pred).all(dim=1)
    real = t(buffer.obs[rows])
    obs = torch.where(mask[:, None], pred, real)
    fields = (buffer.act, buffer.cost, buffer.next_obs, buffer.terminated)
    return Batch(obs, *(t(a[rows]) for a in fields), t(rows)), mask
