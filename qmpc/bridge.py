"""The torch bridge: :class:`ArgminLayer`, a differentiable ``min_u Q_θ(x, u)`` (or MPC plan).

``u_star, value = layer(x)`` solves the control problem of :mod:`qmpc.problem` for each row of
``x`` with CasADi and returns the first action and the optimal value (for horizon 1 with a PICNN,
batches are first solved at once by the batched projected Newton of :mod:`qmpc.newton` on the
network's closed-form derivatives, and certified by the torch network itself; CasADi takes the
samples that fail). Its backward needs two things only (the math is in the docs' sensitivity guide):

* the **value gradient** (envelope theorem): ``dV/dθ = γ^N ∂Q/∂θ`` at the solution, and
  ``dV/dx = ∂L/∂x``;
* the **argmin sensitivity** by the tilt trick: the adjoint ``a`` of the reduced KKT system
  (solved in the small ``w`` space, :meth:`BatchedSolver.adjoint`), then
  ``θ̄ = −∂/∂θ [aᵀ ∇_w J]``, a single batched double-backward through the torch network.

So CasADi never differentiates with respect to the weights, and the backward costs one KKT
solve per sample plus one torch VJP for the whole batch.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import casadi as ca
import numpy as np
import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.func import functional_call

from qmpc.errors import InputError, SolverError
from qmpc.networks import ARCHITECTURES, QNetwork
from qmpc.planner import Planner, as_bounds
from qmpc.problem import ControlProblem, MPCSpec
from qmpc.solver import Adjoint, BatchedSolver, SolveResult, SolverOptions, Status

__all__ = ["ArgminLayer", "GradMode", "LayerResult", "Tally"]

GradMode = Literal["implicit", "envelope", "none"]
GRAD_MODES = ("implicit", "envelope", "none")
_SPEC_FIELDS = frozenset(f.name for f in dataclasses.fields(MPCSpec)) - {"low", "high"}


class Tally:
    """Counts of a layer's samples, safe to add to from several threads: ``solves``, ``failed``,
    ``retried`` (by the forward), ``singular`` and ``weakly_active`` (by the implicit backward,
    through the call's :meth:`LayerResult.set_adjoint`)."""

    KEYS = ("solves", "failed", "retried", "singular", "weakly_active")

    def __init__(self):
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(self.KEYS, 0)

    def add(self, **counts: int) -> None:
        with self._lock:
            for k, v in counts.items():
                self._counts[k] += int(v)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


@dataclass
class LayerResult:
    """What one call of an :class:`ArgminLayer` did (numpy, batch first). Returned by
    ``layer(x, return_result=True)``; :attr:`ArgminLayer.last_result` is the latest call's."""

    plan: np.ndarray
    """``(B, n_w)``: the whole solution ``w*`` (actions ``u_0..u_N``, then, with multiple shooting,
    states ``x_1..x_N``)."""
    status: np.ndarray
    """``(B,)`` int8 :class:`~qmpc.solver.Status` per sample."""
    kkt_residual: np.ndarray
    """``(B,)`` projected-gradient / constraint residual of each solution."""
    solve_ms: float
    """Wall time of the batched solve, retries included."""
    lam_x: np.ndarray
    """``(B, n_w)`` bound multipliers."""
    lam_g: np.ndarray
    """``(B, n_g)`` dynamics multipliers."""
    x0: np.ndarray | None = None
    """``(B, obs_dim)`` the states that were solved for."""
    message: str = ""
    """The NLP plugin's return status of the last failed retry (:attr:`SolveResult.message`)."""
    adjoint: Adjoint | None = None
    """Set by the implicit backward of this call: its ``singular`` mask and ``weak`` counts say
    which samples had no ``∂u*`` (zero) and how many weakly active bounds each had."""
    tally: Tally | None = dataclasses.field(default=None, repr=False)
    """The layer's counts, which :meth:`set_adjoint` adds to."""

    def set_adjoint(self, adjoint: Adjoint) -> None:
        """Record the adjoint of this call's backward (and count its singular and weakly active
        samples in the layer's :class:`Tally`)."""
        self.adjoint = adjoint
        if self.tally is not None:
            self.tally.add(singular=adjoint.singular.sum(), weakly_active=(adjoint.weak > 0).sum())

    @property
    def status_tensor(self) -> torch.Tensor:
        """``status`` as a ``(B,)`` int8 torch tensor (``Status.SOLVED == 0``)."""
        return torch.from_numpy(self.status)

    @property
    def num_failed(self) -> int:
        """Samples whose solve failed (``MAX_ITER`` or ``FAILED``): they get zero gradient."""
        return int((~Status.ok(self.status)).sum())

    @property
    def num_retried(self) -> int:
        """Samples that converged only on the cold-start retry."""
        return int((self.status == Status.RETRIED).sum())


@dataclass(frozen=True)
class _Solved:
    """Everything the backward of one call needs, fixed at the forward: the problem and solver
    the solve used (a later rebuild does not change them), its solution and parameters, and the
    network's structure and buffers (its weights are the Function's inputs)."""

    problem: ControlProblem
    solver: BatchedSolver
    lock: Any
    q: nn.Module
    """A copy of the network's structure for ``functional_call`` (the planner's)."""
    theta: ca.DM | np.ndarray
    x64: np.ndarray
    res: SolveResult
    result: LayerResult
    mode: str
    param_names: tuple[str, ...]
    buffer_names: tuple[str, ...]
    buffers: tuple[torch.Tensor, ...]
    hessian: Callable[[np.ndarray], np.ndarray] | None = None
    """``u (B, nu) -> ∇²_u Q (B, nu, nu)`` in closed form with the weights of the solve (horizon 1
    on the batched Newton's path: :meth:`~qmpc.planner.Planner.action_hessian`); None: CasADi's."""


class ArgminLayer(nn.Module):
    """Differentiable ``u*(x), V(x) = argmin / min_u Q_θ(x, u)`` subject to ``low ≤ u ≤ high``,
    or, with a horizon ``H > 1``, the MPC plan of an :class:`~qmpc.problem.MPCSpec` (``H`` actions,
    ``H − 1`` steps of its ``dynamics`` with its ``stage_cost``, Q as the cost-to-go of the last
    state–action pair, discounted); it returns the first action and the optimal value.

    ``ArgminLayer(q, spec)`` with an :class:`~qmpc.problem.MPCSpec`, or ``ArgminLayer(q, low,
    high, horizon=…, dynamics=…, …)`` with the spec's fields as keywords.

    Args:
        q: a :class:`~qmpc.networks.QNetwork` (its CasADi twin is built once, here).
        low: an :class:`~qmpc.problem.MPCSpec`, or the lower action bounds ``(act_dim,)`` (a
            number, array or tensor; ``−inf`` allowed).
        high: the upper action bounds (with ``low`` as bounds), ``low ≤ high``.
        grad_mode: ``"implicit"`` (∂u*/∂θ, ∂u*/∂x and ∂V), ``"envelope"`` (value gradient only;
            ``u_star`` is detached) or ``"none"``. Can be overridden per call.
        on_failure: ``"mask"`` (failed samples get zero gradient and are counted in the call's
            :class:`LayerResult`) or ``"raise"`` (:class:`~qmpc.errors.SolverError`).
        warm_start: start each solve from the previous call's solution when the batch size
            matches (useful for repeated solves on the same batch, e.g. in MPC); saved and
            restored by :meth:`warm_start_state` and :meth:`load_warm_start_state`.
        bake_weights: build the problem with the network's weights as constants
            (``grad_mode="none"`` only; the controller's fast path). The problem is rebuilt
            when the weights change, so it never acts on stale weights.
        backend: where the parts of a batch are solved: ``"threads"`` (``workers`` threads of this
            process) or ``"ray"`` (``workers`` Ray actors; :mod:`qmpc.distributed`).
        **options: the :class:`~qmpc.problem.MPCSpec` fields (``horizon``, ``dynamics``,
            ``stage_cost``, ``discount``, ``dynamics_params``, ``shooting``,
            ``dynamics_derivatives``) when ``low`` is not a spec, and the fields of
            :class:`~qmpc.solver.SolverOptions` (``solver`` names its ``plugin``; ``max_iter``,
            ``tol``, ``workers``…).

    Call: ``u_star, value = layer(x)`` with ``x: (B, obs_dim)`` → ``u_star: (B, act_dim)``,
    ``value: (B,)``, in ``x``'s dtype. Solves and sensitivities run in float64. A layer may be
    called from several threads (the solves run one at a time).
    """

    def __init__(
        self,
        q: QNetwork,
        low: MPCSpec | torch.Tensor | np.ndarray | float,
        high: torch.Tensor | np.ndarray | float | None = None,
        *,
        grad_mode: GradMode = "implicit",
        on_failure: Literal["mask", "raise"] = "mask",
        warm_start: bool = False,
        bake_weights: bool = False,
        backend: Literal["threads", "ray"] = "threads",
        **options: Any,
    ):
        super().__init__()
        if not isinstance(q, QNetwork):
            raise InputError(f"expected q to be a qmpc QNetwork ({', '.join(ARCHITECTURES)}…), got {type(q).__name__}")
        self.q = q
        spec = _spec_of(q, low, high, {k: options.pop(k) for k in list(options) if k in _SPEC_FIELDS})
        self.grad_mode = _check_mode(grad_mode)
        if on_failure not in ("mask", "raise"):
            raise InputError(f"expected on_failure in ('mask', 'raise'), got {on_failure!r}")
        self.on_failure = on_failure
        self.warm_start = bool(warm_start)
        try:
            opts = SolverOptions(plugin=options.pop("solver", "sqpmethod"), **options)
        except TypeError as e:
            raise InputError(f"unknown solver option: {e}") from None
        if bake_weights and self.grad_mode != "none":
            raise InputError(f"expected grad_mode='none' with bake_weights=True, got {self.grad_mode!r}")
        self.planner = Planner(q, spec, opts, bake_weights=bake_weights, backend=backend)
        if self.problem.shooting == "single" and self.grad_mode != "none":
            raise InputError(
                f"expected grad_mode='none' with shooting='single' (sensitivities need shooting='multiple'), "
                f"got {self.grad_mode!r}"
            )
        if self.problem.spec.termination is not None and self.grad_mode != "none":
            raise InputError(
                f"expected grad_mode='none' with a termination in the spec (the survival-weighted Q term has no "
                f"sensitivities here), got {self.grad_mode!r}"
            )
        self.last_result: LayerResult | None = None
        """The result of the latest call (from any thread): :class:`LayerResult`."""
        self._warm: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        """``(plan, lam_x, lam_g)`` of the latest solve: what ``warm_start`` starts the next one from."""
        self.tally = Tally()

    # -- what the layer solves (the planner's) -------------------------------------------------
    spec = property(lambda self: self.planner.spec, doc="The :class:`~qmpc.problem.MPCSpec`.")
    problem = property(lambda self: self.planner.problem, doc="The current :class:`~qmpc.problem.ControlProblem`.")
    solver = property(lambda self: self.planner.solver, doc="The current :class:`~qmpc.solver.BatchedSolver`.")
    low = property(lambda self: self.planner.spec.low, doc="``(act_dim,)`` lower action bounds.")
    high = property(lambda self: self.planner.spec.high, doc="``(act_dim,)`` upper action bounds.")
    lbw = property(lambda self: self.planner.problem.lbw, doc="``(n_w,)`` lower bounds of the plan.")
    ubw = property(lambda self: self.planner.problem.ubw, doc="``(n_w,)`` upper bounds of the plan.")
    horizon = property(lambda self: self.planner.spec.horizon, doc="Actions in the plan.")
    backend = property(lambda self: self.planner.backend, doc="``threads`` or ``ray``.")
    workers = property(lambda self: self.planner.workers, doc="Threads or Ray actors per batch.")
    bake_weights = property(lambda self: self.planner.bake_weights, doc="Whether the weights are baked.")

    @property
    def counters(self) -> dict[str, int]:
        """Samples solved, failed and retried by this layer's calls, and found singular or with
        weakly active bounds by their backwards (a snapshot of :attr:`tally`)."""
        return self.tally.snapshot()

    @property
    def last_adjoint(self) -> Adjoint | None:
        """The adjoint of the latest call's implicit backward (``last_result.adjoint``)."""
        return None if self.last_result is None else self.last_result.adjoint

    @property
    def model_params(self) -> np.ndarray:
        """``(N · n_p,)`` parameters of a time-varying model (no gradient flows to them)."""
        return self.planner.model_params

    @model_params.setter
    def model_params(self, value: np.ndarray) -> None:
        self.planner.model_params = value

    # -- validation ---------------------------------------------------------------------
    def _validate(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise InputError(f"expected x to be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise InputError(f"expected a floating-point x, got dtype {x.dtype}")
        if x.ndim != 2 or x.shape[1] != self.q.obs_dim or x.shape[0] == 0:
            raise InputError(f"expected x of shape (B, {self.q.obs_dim}) with B >= 1, got {tuple(x.shape)}")
        if x.device.type == "meta":
            raise InputError("expected x with data (on the CPU or a GPU), got a tensor on the 'meta' device")
        if not torch.isfinite(x).all():
            rows = torch.nonzero(~torch.isfinite(x).all(dim=1)).flatten().tolist()
            raise InputError(f"expected finite x, got NaN/Inf in rows {rows[:10]}")

    def _check_w0(self, w0, B: int) -> np.ndarray | None:
        if w0 is None:
            return None
        w0 = w0.detach().cpu().double().numpy() if isinstance(w0, torch.Tensor) else np.asarray(w0, float)
        if w0.shape != (B, self.problem.n_w) or not np.isfinite(w0).all():
            raise InputError(f"expected finite w0 of shape ({B}, {self.problem.n_w}), got {w0.shape}")
        return w0

    # -- forward ------------------------------------------------------------------------
    def forward(
        self,
        x: torch.Tensor,
        *,
        grad_mode: GradMode | None = None,
        w0: torch.Tensor | np.ndarray | None = None,
        return_result: bool = False,
        uses_argmin: bool = False,
    ):
        """Solve for every row of ``x (B, obs_dim)``; returns ``(u_star (B, act_dim), value (B,))``,
        and with ``return_result`` this call's :class:`LayerResult` as a third element.

        Without gradients only the value is assumed to be used, and the batched Newton may stop at
        a looser residual (:data:`~qmpc.planner.NEWTON_VALUE_TOL`: the value is then exact to about
        residual² / curvature); ``uses_argmin=True`` asks for ``u_star`` to the full tolerance.

        ``w0 (B, n_w)`` is an optional initial guess for the whole plan (for ``horizon=1``:
        the action).
        """
        mode = _check_mode(grad_mode or self.grad_mode)
        self._validate(x)
        w0 = self._check_w0(w0, x.shape[0])
        grads = mode != "none" and torch.is_grad_enabled()
        if grads and self.problem.shooting == "single":
            raise InputError(f"expected grad_mode='none' with shooting='single', got {mode!r}")
        if grads and self.problem.spec.termination is not None:
            raise InputError(f"expected grad_mode='none' with a termination in the spec, got {mode!r}")
        x64 = x.detach().cpu().double().numpy()
        with self.planner.lock:  # the solve and the state the backward reads, consistently
            res, theta, result = self._solve(x64, w0, values_only=not (grads or uses_argmin))
            params = self.planner.params
            problem, solver = self.planner.problem, self.planner.solver
            hessian = self.planner.action_hessian(x64) if grads and mode == "implicit" else None
        u = torch.as_tensor(res.w[:, problem.u_slice(0)], dtype=x.dtype, device=x.device)
        v = torch.as_tensor(res.value, dtype=x.dtype, device=x.device)
        if grads:
            solved = _Solved(
                problem,
                solver,
                self.planner.lock,
                self.planner.functional_q,
                theta,
                x64,
                res,
                result,
                mode,
                tuple(n for n, _ in self.q.named_parameters()),
                tuple(n for n, _ in self.q.named_buffers()),
                tuple(b for _, b in self.q.named_buffers()),
                hessian,
            )
            u, v = _ArgminFunction.apply(solved, x, *params)
            u = u.detach() if mode == "envelope" else u
        return (u, v, result) if return_result else (u, v)

    def solve(self, x: np.ndarray, w0: np.ndarray | None = None) -> SolveResult:
        """Solve without torch or autograd: ``x (B, obs_dim)`` and ``w0 (B, n_w)`` float64 numpy,
        already validated by the caller; updates :attr:`last_result` and the counters like a call."""
        with self.planner.lock:
            return self._solve(x, w0, values_only=True)[0]

    def warm_start_state(self) -> dict[str, np.ndarray] | None:
        """What the next call starts from with ``warm_start`` (when its batch size matches): copies
        of the latest solve's ``plan (B, n_w)``, ``lam_x (B, n_w)`` and ``lam_g (B, n_g)``; None
        before any solve. A checkpoint saves it so that a resumed run solves as the original did."""
        with self.planner.lock:
            if self._warm is None:
                return None
            return {k: a.copy() for k, a in zip(("plan", "lam_x", "lam_g"), self._warm, strict=True)}

    def load_warm_start_state(self, state: dict[str, np.ndarray] | None) -> None:
        """Continue from :meth:`warm_start_state` (arrays or tensors; None: the next solve is cold)."""
        if state is None:
            warm = None
        else:
            warm = tuple(_float64_copy(state[k]) for k in ("plan", "lam_x", "lam_g"))
            B = warm[0].shape[0]
            shapes = ((B, self.problem.n_w), (B, self.problem.n_w), (B, self.problem.n_g))
            if tuple(a.shape for a in warm) != shapes:
                raise InputError(f"expected a warm start of shapes {shapes}, got {tuple(a.shape for a in warm)}")
        with self.planner.lock:
            self._warm = warm

    def _solve(self, x64: np.ndarray, w0: np.ndarray | None, values_only: bool):
        lam_x0 = lam_g0 = None
        warm = self._warm
        if w0 is None and self.warm_start and warm is not None and warm[0].shape[0] == x64.shape[0]:
            w0, lam_x0, lam_g0 = warm
        res, theta = self.planner.solve(x64, w0, lam_x0, lam_g0, values_only=values_only)
        result = LayerResult(res.w, res.status, res.kkt_residual, res.solve_ms, res.lam_x, res.lam_g, x64, res.message)
        result.tally = self.tally
        self.last_result = result
        self._warm = (res.w, res.lam_x, res.lam_g)
        self.tally.add(solves=x64.shape[0], failed=result.num_failed, retried=result.num_retried)
        if self.on_failure == "raise" and result.num_failed:
            bad = np.flatnonzero(~Status.ok(res.status))
            names = [Status(int(s)).name for s in res.status[bad[:5]]]
            raise SolverError(
                f"{bad.size} of {x64.shape[0]} solves failed (samples {bad[:5].tolist()}: {names}; "
                f"KKT residuals {res.kkt_residual[bad[:5]].tolist()})"
            )
        return res, theta, result

    def plan(self) -> dict[str, np.ndarray]:
        """The latest solution split into ``actions (B, H, nu)`` and ``states (B, H − 1, nx)``."""
        if self.last_result is None:
            raise InputError("expected a solve before plan(), got none")
        return self.planner.plan(self.last_result.plan, self.last_result.x0)


def _float64_copy(v: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(v, torch.Tensor):
        return v.detach().cpu().double().numpy().copy()
    return np.array(v, dtype=np.float64)


def _check_mode(mode: str) -> str:
    if mode not in GRAD_MODES:
        raise InputError(f"expected grad_mode in {GRAD_MODES}, got {mode!r}")
    return mode


def _spec_of(q: QNetwork, low, high, fields: dict) -> MPCSpec:
    """The layer's :class:`MPCSpec`: ``low`` itself, or built from the bounds and ``fields``."""
    if isinstance(low, MPCSpec):
        if high is not None or fields:
            raise InputError(f"expected an MPCSpec alone, got high and/or {sorted(fields)} with it")
        as_bounds(low.low, q.act_dim, "low")  # the network's action size
        return low
    if high is None:
        raise InputError("expected low and high (or an MPCSpec), got no high")
    return MPCSpec(as_bounds(low, q.act_dim, "low"), as_bounds(high, q.act_dim, "high"), **fields)


class _ArgminFunction(torch.autograd.Function):
    """Tensors in (``x`` and the network's parameters) and a frozen :class:`_Solved` context,
    tensors out (the first action and the value). Once differentiable: a double backward raises."""

    @staticmethod
    def forward(ctx, solved: _Solved, x: torch.Tensor, *params: torch.Tensor):
        ctx.solved, ctx.x_dtype = solved, x.dtype
        if any(ctx.needs_input_grad):  # the parameters and buffers the solve used (checked by torch)
            ctx.save_for_backward(*params, *solved.buffers)
        u = torch.as_tensor(solved.res.w[:, solved.problem.u_slice(0)], dtype=x.dtype, device=x.device)
        v = torch.as_tensor(solved.res.value, dtype=x.dtype, device=x.device)
        return u, v

    @staticmethod
    @once_differentiable
    def backward(ctx, gu: torch.Tensor, gv: torch.Tensor):
        """A NaN/Inf in the incoming gradient of a usable sample propagates as NaN (as through any
        torch op); it never silently drops the batch's implicit gradient. The adjoint goes on the
        call's :class:`LayerResult` (``adjoint``)."""
        s, P = ctx.solved, ctx.solved.problem
        saved = ctx.saved_tensors
        params, buffers = saved[: len(s.param_names)], saved[len(s.param_names) :]
        usable = Status.ok(s.res.status)
        a, b = _adjoint(s, gu, usable)
        vbar = np.where(usable, gv.detach().cpu().double().numpy(), 0.0) if gv is not None else np.zeros(len(usable))
        need_x = ctx.needs_input_grad[1]
        dev = params[0].device if params else (gv if gv is not None else gu).device
        pgrads, xq_grad = _q_term_grads(s, params, buffers, a, vbar, need_x, dev)
        xgrad = None
        if need_x:
            if P.N == 0:
                xgrad = xq_grad
            else:
                with s.lock:
                    xb = s.solver.x_adjoint(s.res.w, s.x64, s.theta, s.res.lam_g, a, b, vbar[:, None])
                xgrad = torch.as_tensor(xb, device=dev)
            xgrad = xgrad.to(ctx.x_dtype)
        return (None, xgrad, *pgrads)


def _q_term_grads(s: _Solved, params, buffers, a: np.ndarray, vbar: np.ndarray, need_x: bool, dev):
    """The gradients of the Q term ``γ^N Σ_b [v̄_b Q(z_b) − a_zbᵀ ∇_z Q(z_b)]``, ``z = (x_N, u_N)``
    at the solution: one batched double-backward through the torch network. Returns the
    parameters' gradients (None where not needed) and, for horizon 1, ``x̄``."""
    P, res = s.problem, s.res
    with torch.enable_grad():
        uq = torch.as_tensor(res.w[:, P.u_slice(P.N)], dtype=torch.float64, device=dev).requires_grad_(True)
        if P.N == 0:
            xq = torch.as_tensor(s.x64, device=dev).requires_grad_(need_x)
        else:
            xq = torch.as_tensor(res.w[:, P.x_slice(P.N)], device=dev).requires_grad_(True)
        p64 = {n: t.to(torch.float64) for n, t in zip(s.buffer_names, buffers, strict=True)}
        p64.update({n: t.to(torch.float64) for n, t in zip(s.param_names, params, strict=True)})
        with s.lock:  # the structure's tensors are swapped while it runs
            qv = functional_call(s.q, p64, (xq, uq))
        total = (torch.as_tensor(vbar, device=dev) * qv).sum()
        if np.any(a != 0):  # NaN != 0: a NaN seed is not dropped
            zs = [uq] if P.N == 0 else [xq, uq]
            az = [a[:, P.u_slice(P.N)]] if P.N == 0 else [a[:, P.x_slice(P.N)], a[:, P.u_slice(P.N)]]
            grads = torch.autograd.grad(qv.sum(), zs, create_graph=True)
            for gz, ai in zip(grads, az, strict=True):
                total = total - (gz * torch.as_tensor(ai, device=dev)).sum()
        total = P.discount**P.N * total
        wrt = [p for p in params if p.requires_grad]
        if need_x and P.N == 0:
            wrt = [*wrt, xq]
        g = torch.autograd.grad(total, wrt, allow_unused=True) if wrt and total.requires_grad else [None] * len(wrt)
    it = iter(g)
    pgrads = [(next(it) if p.requires_grad else None) for p in params]
    pgrads = [gr if gr is None else gr.to(p.dtype) for gr, p in zip(pgrads, params, strict=True)]
    xgrad = None
    if need_x and P.N == 0:
        xgrad = next(it)
        xgrad = torch.zeros_like(xq) if xgrad is None else xgrad
    return pgrads, xgrad


def _adjoint(s: _Solved, gu: torch.Tensor | None, usable: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The adjoint ``(a (B, n_w), b (B, n_g))`` of the reduced KKT system for the seed ``gu`` on
    ``u*`` (zero unless ``implicit``). Usable samples whose seed is not finite get NaN."""
    P, res = s.problem, s.res
    B = res.w.shape[0]
    a, b = np.zeros((B, P.n_w)), np.zeros((B, P.n_g))
    if s.mode != "implicit" or gu is None:
        return a, b
    g = gu.detach().cpu().double().numpy()
    finite = np.isfinite(g).all(axis=1)
    if not np.any(g[finite] != 0) and finite.all():
        return a, b
    seed = np.zeros((B, P.n_w))
    seed[:, P.u_slice(0)] = np.where(finite[:, None], g, 0.0)
    with s.lock:
        adj = s.solver.adjoint(res, s.x64, s.theta, P.lbw, P.ubw, seed, s.hessian)
    s.result.set_adjoint(adj)
    a, b = adj.a.copy(), adj.b.copy()
    poisoned = usable & ~finite
    a[poisoned], b[poisoned] = np.nan, np.nan
    return a, b
