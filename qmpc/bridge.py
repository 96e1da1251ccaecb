"""The torch bridge: :class:`ArgminLayer`, a differentiable ``min_u Q_θ(x, u)`` (or MPC plan).

``u_star, value = layer(x)`` solves the control problem of :mod:`qmpc.problem` for each row of
``x`` with CasADi and returns the first action and the optimal value (for horizon 1 with a PICNN,
batches are first solved at once by the batched projected Newton of :mod:`qmpc.newton` on the
network's closed-form derivatives, and certified by the torch network itself; CasADi takes the
samples that fail). Its backward needs two things only (see DESIGN.md):

* the **value gradient** (envelope theorem): ``dV/dθ = γ^N ∂Q/∂θ`` at the solution, and
  ``dV/dx = ∂L/∂x``;
* the **argmin sensitivity** by the tilt trick: the adjoint ``a`` of the reduced KKT system
  (solved in the small ``w`` space, :meth:`BatchedSolver.adjoint`), then
  ``θ̄ = −∂/∂θ [aᵀ ∇_w J]``, a single batched double-backward through the torch network.

So CasADi never differentiates with respect to the weights, and the backward costs one KKT
solve per sample plus one torch VJP for the whole batch.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import casadi as ca
import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from qmpc.errors import InputError, SolverError
from qmpc.networks import ARCHITECTURES, QNetwork
from qmpc.problem import ControlProblem
from qmpc.solver import Adjoint, BatchedSolver, SolveResult, SolverOptions, Status

__all__ = ["ArgminLayer", "GradMode", "LayerResult"]

NEWTON_MIN_BATCH = 8
"""Batches of at least this many states go to the batched Newton (when it applies): measured on an
InvertedPendulum-sized PICNN, one plugin solve per sample was faster up to 4 states (1.7 against
2.1 ms for one), the Newton from 8 (3.4 against 6.5 ms; 16: 3.4 against 10.1 ms)."""
NEWTON_MIN_WEIGHTS = 16384
"""Networks with at least this many weights use the batched Newton for any batch: with weights
that change between calls (the actor of a training run) one state took 5.2 ms by the Newton
against 7.7 ms by the plugin on a HalfCheetah-sized PICNN (24831 weights: the plugin needs them
as a CasADi DM, ~2 ms to convert), and 3.8 against 2.8 ms on an InvertedPendulum-sized one."""

NEWTON_VALUE_TOL = 0.1
"""Without gradients (``grad_mode="none"``, a TD target's value) the batched Newton stops at a
residual of this fraction of ``kkt_tol`` (the certificate's threshold; the value is then exact to
about residual² / curvature) instead of ``tol``: measured on a HalfCheetah-sized batch of 256
warm-started after a small change of the weights, 8.0 → 6.1 ms."""

GradMode = Literal["implicit", "envelope", "none"]
_GRAD_MODES = ("implicit", "envelope", "none")


class LayerResult(NamedTuple):
    """What the last call of an :class:`ArgminLayer` did (numpy, batch first)."""

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


def build_problem(q: QNetwork, problem_kw: dict, bake_weights: bool, newton_path: bool) -> ControlProblem:
    """The :class:`ControlProblem` of ``q``'s twin as it is now, with the layer's ``problem_kw``
    (horizon, dynamics…): what an :class:`ArgminLayer` and each of its Ray actors build."""
    q_function = q.casadi_function(baked=bake_weights)
    kw = dict(problem_kw)
    if newton_path:
        kw["q_batch"] = q.casadi_batch_function
    if bake_weights and kw["shooting"] == "single" and hasattr(q, "numpy_derivatives"):
        kw["q_derivatives"] = q.numpy_derivatives()  # the weights are constants here too
    return ControlProblem(q_function, **kw)


def _as_bounds(v, act_dim: int, name: str) -> np.ndarray:
    if isinstance(v, int | float):
        v = np.full(act_dim, float(v))
    a = v.detach().cpu().double().numpy() if isinstance(v, torch.Tensor) else np.asarray(v, dtype=float)
    if a.shape != (act_dim,):
        raise InputError(f"expected {name} of shape ({act_dim},), got {a.shape}")
    if np.isnan(a).any():
        raise InputError(f"expected {name} without NaN, got {a}")
    return a


class ArgminLayer(nn.Module):
    """Differentiable ``u*(x), V(x) = argmin / min_u Q_θ(x, u)`` subject to ``low ≤ u ≤ high``.

    With ``horizon=H > 1`` it solves the MPC problem with ``H`` actions, ``H − 1`` steps of
    ``dynamics`` with ``stage_cost`` (a cost: ``−reward``) and ``Q`` as the cost-to-go of the
    last state–action pair, discounted by ``discount``; it returns the first action and the
    optimal value. ``horizon=1`` is the same code with no model steps.

    Args:
        q: a :class:`~qmpc.networks.QNetwork` (its CasADi twin is built once, here).
        low, high: action bounds, shape ``(act_dim,)`` (±inf allowed, ``low ≤ high``).
        horizon: number of actions in the plan.
        dynamics: CasADi ``Function(x, u) -> x⁺`` (``horizon > 1``).
        stage_cost: CasADi ``Function(x, u) -> c`` (``horizon > 1``).
        discount: ``γ ∈ (0, 1]``.
        dynamics_params: ``n_p > 0`` for a time-varying ``dynamics(x, u, p)``; the controller
            sets the ``(N · n_p,)`` vector :attr:`model_params` before each call (no gradient
            flows to it).
        grad_mode: ``"implicit"`` (∂u*/∂θ, ∂u*/∂x and ∂V), ``"envelope"`` (value gradient only;
            ``u_star`` is detached) or ``"none"``. Can be overridden per call.
        solver: NLP plugin, ``"sqpmethod"`` (default) or ``"ipopt"``.
        on_failure: ``"mask"`` (failed samples get zero gradient and are counted in
            :attr:`last_result`) or ``"raise"`` (:class:`~qmpc.errors.SolverError`).
        warm_start: start each solve from the previous call's solution when the batch size
            matches (useful for repeated solves on the same batch, e.g. in MPC).
        shooting: ``multiple`` (default; the predicted states are variables) or ``single`` (they
            are eliminated; solves only, ``grad_mode="none"``): see :mod:`qmpc.problem`.
        dynamics_derivatives: a :class:`~qmpc.problem.StageDerivatives` of ``dynamics`` for
            single shooting (default: CasADi's automatic differentiation).
        bake_weights: build the problem with the network's weights as constants
            (``grad_mode="none"`` only; the controller's fast path). The problem is rebuilt
            when the weights change (``load_state_dict``, an optimiser step), so it never acts
            on stale weights.
        backend: where the parts of a batch are solved: ``"threads"`` (``workers`` threads of this
            process) or ``"ray"`` (``workers`` Ray actors, each with its own solver built from
            the network's ``state_dict``; :mod:`qmpc.distributed`). The results are the same.
        **solver_options: fields of :class:`~qmpc.solver.SolverOptions` (``max_iter``, ``tol``,
            ``workers``…).

    Call: ``u_star, value = layer(x)`` with ``x: (B, obs_dim)`` → ``u_star: (B, act_dim)``,
    ``value: (B,)``, in ``x``'s dtype. Solves and sensitivities run in float64.
    """

    def __init__(
        self,
        q: QNetwork,
        low: torch.Tensor | np.ndarray | float,
        high: torch.Tensor | np.ndarray | float,
        *,
        horizon: int = 1,
        dynamics: ca.Function | None = None,
        stage_cost: ca.Function | None = None,
        discount: float = 1.0,
        dynamics_params: int = 0,
        shooting: str = "multiple",
        dynamics_derivatives=None,
        grad_mode: GradMode = "implicit",
        solver: str = "sqpmethod",
        on_failure: Literal["mask", "raise"] = "mask",
        warm_start: bool = False,
        bake_weights: bool = False,
        backend: Literal["threads", "ray"] = "threads",
        **solver_options,
    ):
        super().__init__()
        if not isinstance(q, QNetwork):
            raise InputError(f"expected q to be a qmpc QNetwork ({', '.join(ARCHITECTURES)}…), got {type(q).__name__}")
        self.q = q
        self.low = _as_bounds(low, q.act_dim, "low")
        self.high = _as_bounds(high, q.act_dim, "high")
        if (self.low > self.high).any():
            i = int(np.flatnonzero(self.low > self.high)[0])
            raise InputError(f"expected low <= high, got low[{i}]={self.low[i]} > high[{i}]={self.high[i]}")
        self.grad_mode = self._check_mode(grad_mode)
        if on_failure not in ("mask", "raise"):
            raise InputError(f"expected on_failure in ('mask', 'raise'), got {on_failure!r}")
        self.on_failure = on_failure
        self.warm_start = bool(warm_start)
        try:
            self._options = SolverOptions(plugin=solver, **solver_options)
        except TypeError as e:
            raise InputError(f"unknown solver option: {e}") from None
        if backend not in ("threads", "ray"):
            raise InputError(f"expected backend in ('threads', 'ray'), got {backend!r}")
        if backend == "ray" and self._options.max_wall_ms:
            raise InputError("expected backend='threads' with a wall-time limit (max_wall_ms), got backend='ray'")
        self.backend = backend
        self.workers = self._options.worker_count
        self._runner = None
        self.bake_weights = bool(bake_weights)
        if self.bake_weights and self.grad_mode != "none":
            raise InputError(f"expected grad_mode='none' with bake_weights=True, got {self.grad_mode!r}")
        self._problem_kw = {
            "horizon": horizon,
            "dynamics": dynamics,
            "stage_cost": stage_cost,
            "discount": discount,
            "dynamics_params": dynamics_params,
            "shooting": shooting,
            "dynamics_derivatives": dynamics_derivatives,
        }
        self._params = tuple(q.parameters())
        self._shapes = tuple(p.shape for p in self._params)  # the structure the twin is built for
        self._synced: tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...], ca.DM | None] | None = None
        self._names: tuple[list[str], list[str]] | None = None
        self._sync()  # builds the problem and its solver
        if self.problem.shooting == "single" and self.grad_mode != "none":
            raise InputError(
                f"expected grad_mode='none' with shooting='single' (sensitivities need shooting='multiple'), "
                f"got {self.grad_mode!r}"
            )
        self.model_params = np.zeros(self.problem.n_theta - self.problem.n_theta_q)
        self.lbw, self.ubw = self.problem.bounds(self.low, self.high)
        self.last_result: LayerResult | None = None
        self.last_adjoint: Adjoint | None = None
        """The adjoint of the last implicit backward: its ``singular`` mask and ``weak`` counts say
        which samples had no ``∂u*`` (zero) and how many weakly active bounds each had."""
        self.counters = {"solves": 0, "failed": 0, "retried": 0, "singular": 0, "weakly_active": 0}

    def _build(self) -> None:
        """The problem and its solver, from the network's twin as it is now (its buffers are
        constants of the twin; with ``bake_weights`` its weights too). A Ray backend's actors
        rebuild theirs from the network's ``state_dict``."""
        newton = self._newton_path()
        self.problem = build_problem(self.q, self._problem_kw, self.bake_weights, newton)
        runner = None
        if self.backend == "ray":
            if self._runner is None:
                from qmpc.distributed import RayRunner

                self._runner = RayRunner(
                    self.workers, self.q, self._problem_kw, self._options, self.bake_weights, newton
                )
            else:
                self._runner.rebuild(self.q)
            runner = self._runner
        self.solver = BatchedSolver(self.problem, self._options, runner)

    def _newton_path(self) -> bool:
        """Horizon 1, weights as a parameter, a network with closed-form derivatives in ``u`` and a
        vectorised twin (PICNN), and ``SolverOptions.newton``: solve by the batched Newton."""
        return (
            self._options.newton
            and self._problem_kw["horizon"] == 1
            and not self.bake_weights
            and getattr(self.q, "vectorized_twin", False)
            and hasattr(self.q, "action_oracle")
        )

    def _read_weights(self) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """The network's parameters and buffers, re-read in one walk over its modules (a replaced
        Parameter or submodule is picked up), with the shapes the layer was built for."""
        params: list[torch.Tensor] = []
        buffers: list[torch.Tensor] = []
        for m in self.q.modules():
            params.extend(p for p in m._parameters.values() if p is not None)
            buffers.extend(b for b in m._buffers.values() if b is not None)
        shapes = tuple(p.shape for p in params)
        if shapes != self._shapes:
            raise InputError(
                f"expected the parameter shapes the layer was built for, {[tuple(s) for s in self._shapes]}, "
                f"got {[tuple(s) for s in shapes]}"
            )
        return tuple(params), tuple(buffers)

    def _sync(self) -> None:
        """Follow every change of the network's values, however it was made (an optimiser step,
        ``p.data.copy_`` of a Polyak update, ``load_state_dict``, a replaced Parameter, a changed
        buffer such as the input normalisation): the values are compared with a copy, not torch's
        version counters (which ``.data`` writes do not bump). On a change: the weights as float64
        numpy (:attr:`_theta64`, by name :attr:`_weights64`; the DM is converted when needed), the
        problem rebuilt if the buffers (or baked weights) changed. Raises on NaN/Inf weights or
        buffers."""
        params, buffers = self._read_weights()
        self._params = params
        last = self._synced
        if last is not None and _same(params, last[0]) and _same(buffers, last[1]):
            return
        with torch.no_grad():
            theta = torch.cat([p.detach().reshape(-1).to("cpu", torch.float64) for p in params]).numpy()
            bufs = [b.detach().to("cpu", torch.float64).numpy() for b in buffers]
        if not (np.isfinite(theta).all() and all(np.isfinite(b).all() for b in bufs)):
            self._check_finite()  # names the tensor
        if last is None or self.bake_weights or not _same(buffers, last[1]):
            self._build()
        self._synced = (tuple(p.detach().clone() for p in params), tuple(b.detach().clone() for b in buffers), None)
        self._theta64 = np.zeros(0) if self.bake_weights else theta
        self._weights64 = self._named_arrays(theta, bufs)

    def _theta_dm(self) -> ca.DM:
        """The synced weights as a CasADi DM, converted once per change (~2 ms for 25k weights)."""
        if self._synced[2] is None:
            self._synced = (*self._synced[:2], ca.DM(self._theta64))
        return self._synced[2]

    def _named_arrays(self, theta: np.ndarray, buffers: list[np.ndarray]) -> dict[str, np.ndarray]:
        """float64 arrays by ``state_dict`` name: views into ``theta``, and the buffers."""
        if self._names is None:  # the structure is fixed (shapes are checked at every sync)
            self._names = ([n for n, _ in self.q.named_parameters()], [n for n, _ in self.q.named_buffers()])
        out, off = {}, 0
        for name, shape in zip(self._names[0], self._shapes, strict=True):
            n = int(np.prod(shape))
            out[name] = theta[off : off + n].reshape(shape)
            off += n
        out.update(zip(self._names[1], buffers, strict=True))
        return out

    def _check_finite(self) -> None:
        for kind, named in (("weights", self.q.named_parameters()), ("buffers", self.q.named_buffers())):
            for name, t in named:
                if not torch.isfinite(t).all():
                    raise InputError(f"expected finite network {kind}, got NaN/Inf in {name!r}")

    @staticmethod
    def _check_mode(mode: str) -> str:
        if mode not in _GRAD_MODES:
            raise InputError(f"expected grad_mode in {_GRAD_MODES}, got {mode!r}")
        return mode

    @property
    def horizon(self) -> int:
        return self.problem.horizon

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

    # -- forward ------------------------------------------------------------------------
    def solve(self, x: np.ndarray, w0: np.ndarray | None = None) -> SolveResult:
        """Solve without torch or autograd: ``x (B, obs_dim)`` and ``w0 (B, n_w)`` float64 numpy,
        already validated by the caller (the controller's per-step path); updates
        :attr:`last_result` and the counters like a call."""
        return self._solve(x, w0)[0]

    def forward(
        self, x: torch.Tensor, *, grad_mode: GradMode | None = None, w0: torch.Tensor | np.ndarray | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Solve for every row of ``x (B, obs_dim)``; returns ``(u_star (B, act_dim), value (B,))``.

        ``w0 (B, n_w)`` is an optional initial guess for the whole plan (for ``horizon=1``:
        the action).
        """
        mode = self._check_mode(grad_mode or self.grad_mode)
        self._validate(x)
        theta = self._problem_theta(x.shape[0])  # follows the network's current values; checks them
        if w0 is not None:
            w0 = w0.detach().cpu().double().numpy() if isinstance(w0, torch.Tensor) else np.asarray(w0, float)
            if w0.shape != (x.shape[0], self.problem.n_w) or not np.isfinite(w0).all():
                raise InputError(f"expected finite w0 of shape ({x.shape[0]}, {self.problem.n_w}), got {w0.shape}")
        params = self._params
        if mode != "none" and torch.is_grad_enabled() and self.problem.shooting == "single":
            raise InputError(f"expected grad_mode='none' with shooting='single', got {mode!r}")
        if mode == "none" or not torch.is_grad_enabled():
            with torch.no_grad():  # values only
                u, v = _ArgminFunction.apply(self, "none", w0, theta, x, *params)
            return u, v
        u, v = _ArgminFunction.apply(self, mode, w0, theta, x, *params)
        return (u.detach() if mode == "envelope" else u), v

    def _problem_theta(self, batch: int = 0) -> ca.DM | np.ndarray:
        """The problem's parameter vector: the network's weights (none when baked), then
        :attr:`model_params`. For a ``batch`` that the batched Newton solves, a numpy vector: the
        solver converts it to a DM only if a sample falls back to the plugin."""
        self._sync()
        if self._newton_batch(batch):
            return self._theta64
        theta = self._theta_dm()
        if self.model_params.size:
            p = np.asarray(self.model_params, dtype=np.float64)
            if p.shape != (self.problem.n_theta - self.problem.n_theta_q,) or not np.isfinite(p).all():
                raise InputError(f"expected finite model_params of shape {self.model_params.shape}, got {p.shape}")
            theta = ca.vertcat(theta, ca.DM(p))
        return theta

    def _newton_batch(self, batch: int) -> bool:
        """Whether a batch of this size goes to the batched Newton (see :data:`NEWTON_MIN_BATCH`)."""
        big = batch >= NEWTON_MIN_BATCH or self.problem.n_theta_q >= NEWTON_MIN_WEIGHTS
        return self.problem.batched and big

    def _solve(
        self,
        x64: np.ndarray,
        w0: np.ndarray | None,
        theta: ca.DM | np.ndarray | None = None,
        mode: str = "none",
    ) -> tuple[SolveResult, ca.DM | np.ndarray]:
        theta = self._problem_theta(x64.shape[0]) if theta is None else theta
        lam_x0 = lam_g0 = None
        last = self.last_result
        if w0 is None and self.warm_start and last is not None and last.plan.shape[0] == x64.shape[0]:
            w0, lam_x0, lam_g0 = last.plan, last.lam_x, last.lam_g
        fast = {}
        if self._newton_batch(x64.shape[0]):  # the closed form proposes, the network itself certifies
            fast = {"oracle": self.q.action_oracle(x64, self._weights64), "certificate": self._certificate(x64)}
            if mode == "none":  # values only (a TD target): the certificate's threshold decides
                fast["newton_tol"] = max(self._options.tol, NEWTON_VALUE_TOL * self._options.kkt_tol)
        res = self.solver.solve(x64, theta, self.lbw, self.ubw, w0=w0, lam_x0=lam_x0, lam_g0=lam_g0, **fast)
        self.last_result = LayerResult(res.w, res.status, res.kkt_residual, res.solve_ms, res.lam_x, res.lam_g, x64)
        self.counters["solves"] += x64.shape[0]
        self.counters["failed"] += self.last_result.num_failed
        self.counters["retried"] += self.last_result.num_retried
        if self.on_failure == "raise" and self.last_result.num_failed:
            bad = np.flatnonzero(~Status.ok(res.status))
            names = [Status(int(s)).name for s in res.status[bad[:5]]]
            raise SolverError(
                f"{bad.size} of {x64.shape[0]} solves failed (samples {bad[:5].tolist()}: {names}; "
                f"KKT residuals {res.kkt_residual[bad[:5]].tolist()})"
            )
        return res, theta

    def _certificate(self, x64: np.ndarray):
        """``u -> (Q(x, u), ∂Q/∂u)`` by the torch network itself in float64 on the CPU, with the
        weights of the solve: the independent evaluation that certifies the batched Newton's
        solutions (measured on a HalfCheetah-sized batch of 256: ~2 ms; the vectorised CasADi
        twin took ~33 ms)."""
        weights = {n: torch.from_numpy(a) for n, a in self._weights64.items()}
        x = torch.from_numpy(x64)

        def value_grad(u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            ut = torch.from_numpy(u).requires_grad_(True)
            with torch.enable_grad():
                qv = functional_call(self.q, weights, (x, ut))
                (g,) = torch.autograd.grad(qv.sum(), ut)
            return qv.detach().numpy(), g.numpy()

        return value_grad

    def plan(self) -> dict[str, np.ndarray]:
        """The last solution split into ``actions (B, H, nu)`` and ``states (B, H − 1, nx)``."""
        if self.last_result is None:
            raise InputError("expected a solve before plan(), got none")
        P, w = self.problem, self.last_result.plan
        B = w.shape[0]
        acts = w[:, : (P.N + 1) * P.nu].reshape(B, P.N + 1, P.nu)
        if P.shooting == "single":  # the states are the model's rollout of the actions
            theta = self._problem_theta()  # with the model parameters of a time-varying model
            x0 = self.last_result.x0
            states = np.stack([np.asarray(P.states(w[i], x0[i], theta)).reshape(P.N, P.nx) for i in range(B)])
        else:
            states = w[:, (P.N + 1) * P.nu :].reshape(B, P.N, P.nx)
        return {"actions": acts, "states": states}


def _same(now: tuple[torch.Tensor, ...], copies: tuple[torch.Tensor, ...]) -> bool:
    """Whether tensors hold the same values as their copies (False on NaN)."""
    return len(now) == len(copies) and all(torch.equal(a, b) for a, b in zip(now, copies, strict=True))


class _ArgminFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, layer: ArgminLayer, mode: str, w0, theta: ca.DM, x: torch.Tensor, *params: torch.Tensor):
        x64 = x.detach().cpu().double().numpy()
        res, theta = layer._solve(x64, w0, theta, mode)
        ctx.layer, ctx.mode, ctx.res, ctx.theta, ctx.x64, ctx.x_dtype = layer, mode, res, theta, x64, x.dtype
        if any(ctx.needs_input_grad):  # the parameters and buffers the solve used (checked by torch)
            ctx.names = [n for n, _ in layer.q.named_parameters()]
            named_buffers = list(layer.q.named_buffers())
            ctx.buffer_names = [n for n, _ in named_buffers]
            ctx.save_for_backward(*params, *(b for _, b in named_buffers))
        P = layer.problem
        u = torch.as_tensor(res.w[:, P.u_slice(0)], dtype=x.dtype, device=x.device)
        v = torch.as_tensor(res.value, dtype=x.dtype, device=x.device)
        return u, v

    @staticmethod
    def backward(ctx, gu: torch.Tensor, gv: torch.Tensor):
        """No side effects on the result (``last_result`` keeps the solver's statuses); the
        layer's counters add the singular and weakly active samples of this backward. A NaN/Inf
        in the incoming gradient of a usable sample propagates as NaN (as through any torch
        op); it never silently drops the batch's implicit gradient."""
        layer, res, P = ctx.layer, ctx.res, ctx.layer.problem
        saved = ctx.saved_tensors
        params, buffers = saved[: len(ctx.names)], saved[len(ctx.names) :]
        usable = Status.ok(res.status)
        a, b = _adjoint(ctx, gu, usable)
        vbar = np.where(usable, gv.detach().cpu().double().numpy(), 0.0) if gv is not None else np.zeros(len(usable))
        need_x = ctx.needs_input_grad[4]
        dev = params[0].device if params else (gv if gv is not None else gu).device
        # Q term: s = γ^N Σ_b [ v̄_b Q(z_b) − a_zbᵀ ∇_z Q(z_b) ],  z = (x_N, u_N) at the solution.
        with torch.enable_grad():
            uq = torch.as_tensor(res.w[:, P.u_slice(P.N)], dtype=torch.float64, device=dev).requires_grad_(True)
            if P.N == 0:
                xq = torch.as_tensor(ctx.x64, device=dev).requires_grad_(need_x)
            else:
                xq = torch.as_tensor(res.w[:, P.x_slice(P.N)], device=dev).requires_grad_(True)
            p64 = {n: t.to(torch.float64) for n, t in zip(ctx.buffer_names, buffers, strict=True)}
            p64.update({n: t.to(torch.float64) for n, t in zip(ctx.names, params, strict=True)})
            qv = functional_call(layer.q, p64, (xq, uq))
            s = (torch.as_tensor(vbar, device=dev) * qv).sum()
            if np.any(a != 0):  # NaN != 0: a NaN seed is not dropped
                zs = [uq] if P.N == 0 else [xq, uq]
                az = [a[:, P.u_slice(P.N)]] if P.N == 0 else [a[:, P.x_slice(P.N)], a[:, P.u_slice(P.N)]]
                grads = torch.autograd.grad(qv.sum(), zs, create_graph=True)
                for gz, ai in zip(grads, az, strict=True):
                    s = s - (gz * torch.as_tensor(ai, device=dev)).sum()
            s = P.discount**P.N * s
            wrt = [p for p in params if p.requires_grad]
            if need_x and P.N == 0:
                wrt = [*wrt, xq]
            g = torch.autograd.grad(s, wrt, allow_unused=True) if wrt and s.requires_grad else [None] * len(wrt)
        it = iter(g)
        pgrads = [(next(it) if p.requires_grad else None) for p in params]
        pgrads = [gr if gr is None else gr.to(p.dtype) for gr, p in zip(pgrads, params, strict=True)]
        xgrad = None
        if need_x:
            if P.N == 0:
                xgrad = next(it)
                xgrad = torch.zeros_like(xq) if xgrad is None else xgrad
            else:
                (xb,) = layer.solver.evaluate("x_adjoint", res.w, ctx.x64, ctx.theta, res.lam_g, a, b, vbar[:, None])
                xgrad = torch.as_tensor(xb, device=dev)
            xgrad = xgrad.to(ctx.x_dtype)
        return (None, None, None, None, xgrad, *pgrads)


def _adjoint(ctx, gu: torch.Tensor | None, usable: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The adjoint ``(a (B, n_w), b (B, n_g))`` of the reduced KKT system for the seed ``gu`` on
    ``u*`` (zero unless ``implicit``). Usable samples whose seed is not finite get NaN."""
    layer, res, P = ctx.layer, ctx.res, ctx.layer.problem
    B = res.w.shape[0]
    a, b = np.zeros((B, P.n_w)), np.zeros((B, P.n_g))
    if ctx.mode != "implicit" or gu is None:
        return a, b
    g = gu.detach().cpu().double().numpy()
    finite = np.isfinite(g).all(axis=1)
    if not np.any(g[finite] != 0) and finite.all():
        return a, b
    seed = np.zeros((B, P.n_w))
    seed[:, P.u_slice(0)] = np.where(finite[:, None], g, 0.0)
    adj = layer.solver.adjoint(res, ctx.x64, ctx.theta, layer.lbw, layer.ubw, seed)
    layer.last_adjoint = adj
    layer.counters["singular"] += int(adj.singular.sum())
    layer.counters["weakly_active"] += int((adj.weak > 0).sum())
    a, b = adj.a.copy(), adj.b.copy()
    poisoned = usable & ~finite
    a[poisoned], b[poisoned] = np.nan, np.nan
    return a, b
