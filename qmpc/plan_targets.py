"""The H-step MPC-value TD target (``train.target_horizon = H > 1``): ``y = c + γ (1 − d) V_H(x⁺)``
with the value of the best plan through the learned model,

    V_H(x) = min_{u_0 … u_{H−1} ∈ [low, high]}
             Σ_{k<H−1} γᵏ s_k ĉ(x_k, u_k, x_{k+1}) + γ^{H−1} s_{H−1} Q(x_{H−1}, u_{H−1}),
    x_0 = x,  x_{k+1} = f̂(x_k, u_k),  s_0 = 1,  s_{k+1} = s_k (1 − p̂(x_k, u_k, x_{k+1})),

``f̂`` the dynamics model, ``ĉ`` and ``p̂`` the learned stage cost and termination probability
(:class:`~qmpc.dynamics.OutcomeModel`). ``V_1(x) = min_u Q(x, u)`` is the usual target. The plans of
a batch are solved together by the batched box SQP of :mod:`qmpc.boxsqp` on the objective's value,
gradient and exact Hessian: in closed form with numpy (:mod:`qmpc.plan_batch`) for a Q with
closed-form derivatives (PICNN), else from torch (:class:`PlanObjective`: float64 copies of the
networks; the Hessian by one second backward pass over the batch repeated once per action). Samples
whose plan does not converge are masked from the loss and counted, as the H = 1 target's failed
solves are.
"""

from __future__ import annotations

import copy
import time
from typing import NamedTuple

import numpy as np
import torch

from qmpc.boxsqp import solve_box_sqp
from qmpc.networks.base import np64
from qmpc.plan_batch import PlanBatchOracle, PlanClosedForms
from qmpc.solver import Status, single_blas_thread

__all__ = ["PlanObjective", "PlanTargets", "PlanValues"]


class PlanObjective:
    """The plan objective ``J(u_0 … u_{H−1})`` of ``V_H`` for the states ``x0 (B, nx)``, as a
    :class:`~qmpc.newton.Oracle` of the flattened actions ``u (R, H · nu)`` of rows ``rows``."""

    def __init__(self, q, model, heads, x0: torch.Tensor, horizon: int, gamma: float, termination: bool = True):
        self.q, self.model, self.heads = q, model, heads
        self.x0, self.H, self.gamma, self.termination = x0, int(horizon), float(gamma), bool(termination)
        self.nu = q.act_dim

    def objective(self, u: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """``J (R,)`` of the plans ``u (R, H · nu)`` from ``x0 (R, nx)`` (differentiable in ``u``)."""
        us = u.reshape(u.shape[0], self.H, self.nu)
        x, alive, J = x0, torch.ones_like(u[:, 0]), torch.zeros_like(u[:, 0])
        for k in range(self.H - 1):
            xn = self.model(x, us[:, k])
            J = J + self.gamma**k * alive * self.heads.cost(x, us[:, k], xn)
            if self.termination:  # (else the plan ignores that an episode ends)
                alive = alive * (1.0 - self.heads.termination(x, us[:, k], xn))
            x = xn
        return J + self.gamma ** (self.H - 1) * alive * self.q(x, us[:, -1]).reshape(-1)

    def value(self, u: np.ndarray, rows: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            f = self.objective(torch.from_numpy(u), self.x0[rows]).numpy()
        return np.where(np.isfinite(f), f, np.inf)

    def gradient(self, u: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """``∇J (R, n)`` alone (one backward pass)."""
        U = torch.from_numpy(u).requires_grad_(True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(self.objective(U, self.x0[rows]).sum(), U)
        return g.numpy()

    def derivatives(self, u: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``J (R,)``, ``∇J (R, n)`` and ``∇²J (R, n, n)``. The plans are independent, so the
        gradient of a batch's sum is each plan's gradient. The batch is repeated ``n`` times, copy
        ``i`` seeded with the ``i``-th action of every plan: one second backward pass through the
        ``n · R`` plans gives every column of every Hessian (measured faster than ``n`` separate
        Hessian-vector products, and than ``torch.func``'s vectorised forward-over-reverse)."""
        R, n = u.shape
        U = torch.from_numpy(np.tile(u, (n, 1))).requires_grad_(True)  # copy i: rows i·R … (i+1)·R − 1
        with torch.enable_grad():
            f = self.objective(U, self.x0[rows].repeat(n, 1))
            (g,) = torch.autograd.grad(f.sum(), U, create_graph=True)
            seed = torch.eye(n, dtype=U.dtype).repeat_interleave(R, dim=0)  # copy i: direction e_i
            (Hc,) = torch.autograd.grad((g * seed).sum(), U)
        H = Hc.reshape(n, R, n).permute(1, 2, 0).numpy()  # [b, :, i]: column i of plan b's Hessian
        f, g = f.detach()[:R].numpy(), g.detach()[:R].numpy()
        return np.where(np.isfinite(f), f, np.inf), g, 0.5 * (H + np.swapaxes(H, 1, 2))


class PlanValues(NamedTuple):
    """A batch of ``V_H`` solves, with the attributes the TD loss reads of an argmin layer's result."""

    value: torch.Tensor
    """``(B,)`` ``V_H(x)`` (of the scoring network; float64)."""
    plan: np.ndarray
    """``(B, H · nu)`` the plans ``u_0 … u_{H−1}``."""
    status: np.ndarray
    """``(B,)`` int8 :class:`~qmpc.solver.Status`: ``SOLVED`` or ``FAILED`` (masked)."""
    kkt_residual: np.ndarray
    """``(B,)`` projected-gradient residual of each plan."""
    solve_ms: float
    message: str = ""


class PlanTargets:
    """``V_H`` for TD targets: float64 copies of Q, the target network, the model and the heads,
    refreshed from the training networks at each call where the call reads them
    (``load_state_dict``: a cast, no rebuild).

    Args:
        q, q_target, model, heads: the training networks (any dtype).
        low, high: ``(nu,)`` action bounds.
        horizon: ``H ≥ 2``; gamma: the discount.
        tol, max_iter: the box SQP's stopping residual and iteration budget.
        termination: weight the stages and Q by the heads' probability of still being alive
            (``train.plan_termination``).
    """

    def __init__(
        self, q, q_target, model, heads, low, high, horizon: int, gamma: float, tol=1e-5, max_iter=10, termination=True
    ):
        self.sources = (q, q_target, model, heads)
        self.copies = tuple(copy.deepcopy(m).double().requires_grad_(False) for m in self.sources)
        self.low, self.high = np.asarray(low, np.float64), np.asarray(high, np.float64)
        self.horizon, self.gamma, self.tol, self.max_iter = int(horizon), float(gamma), tol, max_iter
        self.termination = bool(termination)
        self.closed_form = True
        """Plan on the closed forms of :mod:`qmpc.plan_batch` where Q has them (False: torch's, the
        reference the tests compare with)."""

    def __call__(
        self, x: torch.Tensor, u0: np.ndarray, planner: str = "target", through_plan: bool = False
    ) -> PlanValues:
        """``V_H`` at ``x (B, nx)`` from the plans ``u0 (B, H · nu)`` (e.g. the last ones found
        there, :meth:`~qmpc.data.ReplayBuffer.warm_starts`; ``(B, nu)``: that action held along the plan).
        ``planner``: ``"target"`` (the target network plans and scores: ``semi``) or ``"online"``
        (Q plans, the target network scores its plan: ``double_detached``). ``through_plan``
        (``"online"`` only, ``double``): the value carries the gradient through the plan,
        ``∂V/∂θ = ∇_U J_target(U*)ᵀ ∂U*/∂θ`` with ``θ`` the weights of ``q`` (:meth:`_through_plan`)."""
        t0 = time.perf_counter()
        for i, (src, dst) in enumerate(zip(self.sources, self.copies, strict=True)):
            if i > 0 or planner != "target":  # the target network plans alone: Q's copy is not read
                dst.load_state_dict(src.state_dict())
        q, q_target, model, heads = self.copies
        x64 = x.detach().to(torch.float64)
        scorer = self._objective(q_target, model, heads, x64)
        solver = scorer if planner == "target" else self._objective(q, model, heads, x64)
        lb, ub = np.tile(self.low, self.horizon), np.tile(self.high, self.horizon)
        u0 = np.asarray(u0, np.float64)
        start = np.clip(u0 if u0.shape[1] == lb.size else np.tile(u0, (1, self.horizon)), lb, ub)
        with single_blas_thread():  # numpy's GEMMs of the closed forms: a second BLAS thread only waits
            res = solve_box_sqp(solver, start, lb, ub, tol=self.tol, max_iter=self.max_iter)
            value = res.value if solver is scorer else scorer.value(res.u, np.arange(len(res.u)))
            ok = res.converged & np.isfinite(value)
            status = np.where(ok, Status.SOLVED, Status.FAILED).astype(np.int8)
            v = torch.from_numpy(np.where(ok, value, 0.0))
            if through_plan and planner == "online":
                v = v + self._through_plan(x64, scorer, res, ok, lb, ub)
        return PlanValues(v, res.u, status, res.residual, (time.perf_counter() - t0) * 1e3)

    def _objective(self, q, model, heads, x64: torch.Tensor):
        """The plan objective of ``q`` (a float64 copy) at the states ``x64``: the closed forms of
        :mod:`qmpc.plan_batch` where ``q`` has them (PICNN: measured on InvertedPendulum-v5 at H = 3,
        see docs/benchmarks.md), else :class:`PlanObjective` (torch)."""
        if not hasattr(q, "numpy_batch_derivatives") or not self.closed_form:
            return PlanObjective(q, model, heads, x64, self.horizon, self.gamma, self.termination)
        weights = {n: np64(t) for n, t in (*q.named_parameters(), *q.named_buffers())}
        stage = model.stage_derivatives()
        forms = PlanClosedForms(
            step=stage.step,
            model=stage,
            cost=heads.cost_derivatives(),
            cost_value=heads.cost_value(),
            q=q.numpy_batch_derivatives(),
            q_value=lambda X, U: q.action_oracle(X, weights).value(U),
            termination=heads.termination_derivatives() if self.termination else None,
            termination_value=heads.termination_value() if self.termination else None,
        )
        return PlanBatchOracle(forms, x64.numpy(), self.horizon, self.gamma)

    def _through_plan(self, x64: torch.Tensor, scorer, res, ok, lb, ub) -> torch.Tensor:
        """``(B,)`` zeros whose gradient in ``q``'s weights is ``∇_U J_target(U*)ᵀ ∂U*/∂θ``. At a plan
        ``U*`` with the components on a bound held, ``∇_F J_θ(U*) = 0`` on the free ones ``F``;
        differentiating it, ``∂U*_F/∂θ = −H_FF⁻¹ ∂_θ ∇_F J_θ``, so with ``λ = H_FF⁻¹ a_F``,
        ``a = ∇_U J_target(U*)``, the product is ``−∂_θ (λᵀ ∇_U J_θ(U*))`` at fixed ``λ`` (the
        tilt trick: one Hessian solve per plan, no Jacobian in ``θ``). Plans that did not converge,
        or whose free block is not positive definite, carry no gradient. The online objective's
        gradient and Hessian at ``U*`` are the SQP's last ones (``res``); the target's, a gradient."""
        U, g, H = res.u, res.grad, res.hessian
        a = scorer.gradient(U, np.arange(len(U)))
        free = ~(((U - lb <= 1e-6) & (g > 0)) | ((ub - U <= 1e-6) & (g < 0)))  # held: on a bound, pushed out
        lam = np.zeros_like(U)
        Hf = np.where(free[:, :, None] & free[:, None, :], H, 0.0) + np.eye(U.shape[1]) * ~free[:, None, :]
        good = ok & np.all(np.linalg.eigvalsh(Hf) > 1e-10, axis=1)
        if good.any():
            lam[good] = np.linalg.solve(Hf[good], np.where(free, a, 0.0)[good][:, :, None])[:, :, 0]
        q64, (q_train, *_) = self.copies[0], self.sources
        weights = {n: p.to(torch.float64) for n, p in q_train.named_parameters()}  # differentiable cast
        live = _Functional(q64, weights)
        obj = PlanObjective(live, self.copies[2], self.copies[3], x64, self.horizon, self.gamma, self.termination)
        Ut = torch.from_numpy(U).requires_grad_(True)
        (g,) = torch.autograd.grad(obj.objective(Ut, x64).sum(), Ut, create_graph=True)
        tilt = (torch.from_numpy(lam) * g).sum(dim=1)
        return tilt.detach() - tilt


class _Functional:
    """``q64`` evaluated with the given weights (``torch.func.functional_call``): a float64 copy of
    Q through which gradients reach the training network's own parameters."""

    def __init__(self, q64, weights: dict[str, torch.Tensor]):
        self.q64, self.weights, self.act_dim = q64, weights, q64.act_dim

    def __call__(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(self.q64, self.weights, (x, u))
