"""Batched CasADi solves of a :class:`~qmpc.problem.ControlProblem`, with per-sample status,
and the adjoint solve of the reduced KKT system that the torch bridge needs.

This module never imports torch and never raises on a failed solve: every sample gets a
:class:`Status`. A sample is accepted by a solver-independent certificate (its projected
gradient and constraint residual), not by the plugin's own flag (sqpmethod was seen to report
success at points with a projected gradient of 2); samples that fail it are retried once from a
cold start, one by one, by default with the other plugin, then reported as ``MAX_ITER`` or
``FAILED``.

Sensitivities (the tilt trick; the docs' sensitivity guide has the math). For a seed ``ū`` on ``w*``, the adjoint
``(a, b)`` solves the reduced KKT system

    [H_FF  G_Fᵀ] [a_F]   [ū_F]
    [G_F    0  ] [ b ] = [ 0 ]          a_A = 0

at the primal–dual solution, where ``H = ∇²_ww L``, ``G = ∂g/∂w``, ``F`` the free components
and ``A`` the components at a bound. ``a`` is ``−(∂w*/∂δ)ᵀ ū`` for a tilt ``J + δᵀw``, so for
any parameter ``p`` of the problem, ``p̄ = −∂/∂p [aᵀ ∇_w L + bᵀ g]``: the caller evaluates that
VJP where ``p`` lives (torch for the network weights).

Which components are at a bound (the active set, :meth:`BatchedSolver.at_bounds`) is read from
the bound multipliers as well as the distance: an interior-point solution (IPOPT) stops
``1e-9..1e-6`` inside an active bound, where a distance test alone calls it free and the
adjoint then differentiates the unconstrained problem (measured: ``∂u*/∂θ`` off by 1e-4..0.2
against central differences at ``tol=1e-8``). Complementarity ``dist · |λ| ≈ μ`` separates the
two cases by orders of magnitude (``|λ|/dist`` ≥ 10 at the active bounds and ≤ 0.2 elsewhere
in every case measured), so a component is active when it is within ``bound_tol`` of its bound
or its multiplier (with the bound's sign) exceeds its distance to the bound.

Weakly active bounds (at the bound with a multiplier below ``multiplier_tol``) have no
derivative; qmpc treats them as active (the one-sided derivative in which the bound stays
active: zero) and counts them.

Second-order check. The adjoint is only meaningful at a strict local minimum: the reduced
Hessian ``Zᵀ H Z`` on the null space ``Z`` of the active bounds and of ``G`` must be positive
definite, else the sample is ``SINGULAR``. With multiple shooting the last ``n_g`` components of
``w`` are the states, which have no bounds, and ``∂g/∂(x_1..x_N)`` is block lower bidiagonal
with ``−I`` on its diagonal, so ``Z = [E_F; −G_x⁻¹ G_u E_F]`` (``E_F`` the free actions) is
explicit (one forward recursion through the model's Jacobians) and ``Zᵀ H Z`` has the size of
the actions only.

The KKT math (the certificate, the active set, the reduced system and its adjoint) is numpy in
:mod:`qmpc.kkt`; this module evaluates the problem's functions with CasADi and calls it. For
horizon 1 with closed-form derivatives of Q (a PICNN), :meth:`BatchedSolver.solve` first solves
the whole batch by the batched projected Newton of :mod:`qmpc.newton` and sends only the samples
that fail the certificate to the plugin.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os
import threading
import time
import warnings
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import IntEnum
from typing import ClassVar, NamedTuple, Protocol

import casadi as ca
import numpy as np

from qmpc import kkt, newton
from qmpc.boxsqp import solve_box_sqp
from qmpc.errors import InputError
from qmpc.kkt import Adjoint
from qmpc.newton import Oracle
from qmpc.problem import ControlProblem

__all__ = [
    "PLUGINS",
    "QPSOLS",
    "Adjoint",
    "BatchedSolver",
    "ChunkRunner",
    "FirstOrder",
    "PluginOutput",
    "SecondOrder",
    "SolveResult",
    "SolverOptions",
    "Status",
    "box_qpsol",
]

PLUGINS = ("sqpmethod", "ipopt")
"""NLP solver plugins whose solutions the sensitivity suite checks."""

QPSOLS: dict[str, dict] = {
    # max_iter: a QP is not interruptible by the wall-time callback; without a cap, a nonconvex
    # H = 10 QP (no convexification) was measured at 145 ms per SQP iteration and 1.7 s per step
    "qrqp": {"print_iter": False, "print_header": False, "print_info": False, "error_on_fail": False, "max_iter": 100},
    "qpoases": {"printLevel": "none", "error_on_fail": False},
    "daqp": {"error_on_fail": False},
}
"""QP solvers of ``sqpmethod`` and qmpc's options for each."""


def box_qpsol() -> str:
    """The QP solver for problems whose only constraints are bounds (the greedy, H = 1, argmin of
    a controller and the greedy start of its plans): DAQP where this CasADi has the plugin, else
    qrqp. Measured on ``models/hopper.pt``'s own closed loop (300 steps at H = 1): qrqp ended 8
    solves with a zero step and multipliers on bounds that were not active (each then retried by
    IPOPT: p99 6.4 ms a step), DAQP none (p99 3.9 ms); on the other shipped checkpoints both
    solved every step, at the same speed."""
    return "daqp" if ca.has_conic("daqp") else "qrqp"


class Status(IntEnum):
    """Per-sample outcome of a solve."""

    SOLVED = 0
    """Converged on the first attempt."""
    RETRIED = 1
    """Failed the first attempt, converged on the cold-start retry."""
    MAX_ITER = 2
    """Hit the iteration limit on the retry: masked (zero gradient)."""
    FAILED = 3
    """Any other failure (non-finite values, infeasible QP, line search…): masked."""
    SINGULAR = 4
    """Converged, but the reduced KKT matrix is singular or not positive definite (not a strict
    local minimum): ``∂w*`` does not exist and is zero; the value gradient (envelope) is kept.
    Found by the sensitivity computation, not by the solve: :meth:`BatchedSolver.adjoint`
    reports it per sample (``Adjoint.singular``; the layer puts it on that call's result,
    ``LayerResult.adjoint``), and leaves the solve's statuses as they were."""
    TIMEOUT = 5
    """Stopped by the wall-time limit (``SolverOptions.max_wall_ms``) before converging: masked."""

    @staticmethod
    def ok(status: np.ndarray) -> np.ndarray:
        """Mask of samples whose solution is usable (converged)."""
        return (status == Status.SOLVED) | (status == Status.RETRIED) | (status == Status.SINGULAR)


@dataclass
class SolverOptions:
    """Options of :class:`BatchedSolver`."""

    plugin: str = "sqpmethod"
    """NLP solver plugin: ``sqpmethod`` (with ``qrqp``) or ``ipopt``."""
    max_iter: int = 100
    """Iteration limit of one solve."""
    tol: float = 1e-10
    """The plugin's own convergence tolerance."""
    kkt_tol: float = 1e-6
    """A solution is accepted when its projected gradient and constraint residual are below this."""
    bound_tol: float = 1e-8
    """A component within this distance of a bound (times ``1 + |bound|``) is at that bound; so is
    one whose multiplier (with the bound's sign) exceeds its distance to the bound, as at an
    interior-point solution (see :meth:`BatchedSolver.at_bounds`)."""
    multiplier_tol: float = 1e-8
    """A bound at which the multiplier is at most this is weakly active."""
    retry: bool = True
    """Retry failed samples once from a cold start."""
    retry_plugin: str = "auto"
    """Plugins of the cold retries: ``auto`` (the same plugin, then the other one), ``same``, or a
    plugin name. sqpmethod can report success at points that fail qmpc's KKT certificate; a cold
    sqpmethod start rescues most such closed-loop steps cheaply (70 of 72 on the shipped
    InvertedPendulum-v5 controller over 1000 steps), but repeated the mistake on all 23 failing
    TD targets of a trained network's batch, which IPOPT then rescued."""
    workers: int = 0
    """Threads that solve parts of a batch in parallel (each with its own solver instance);
    0 picks ``min(4, cpu_count)``."""
    qpsol: str = "qrqp"
    """QP solver of ``sqpmethod`` (one of :data:`QPSOLS`)."""
    convexify: str = "auto"
    """``sqpmethod``'s Hessian convexification: ``eigen-clip``, ``none`` or ``auto`` (eigen-clip
    where the Hessian is the reduced one: horizon 1 and single shooting; none for multiple
    shooting). Measured on a HalfCheetah-sized H = 10 problem through
    a learned model: with eigen-clip sqpmethod reported success after 0–2 iterations at points
    with a projected gradient of 0.1–1 on 7 of 8 states (the multiple-shooting Hessian is
    indefinite through the dynamics' curvature); without it all 8 converged to 1e-11."""
    plugin_options: dict | None = None
    """Extra options handed to ``casadi.nlpsol`` for ``plugin`` (merged over qmpc's defaults;
    not given to a retry with another plugin)."""
    newton: bool = True
    """Single-shooting plans (horizon > 1), and horizon 1 with closed-form derivatives of Q in
    ``u`` (a :class:`~qmpc.networks.PICNN`): solve each batch by the batched projected Newton first
    (:mod:`qmpc.newton`; every solution still
    passes the certificate, and those that do not go to the plugin). Measured on a
    HalfCheetah-sized batch of 256: ~20 ms against ~2.3 s for one plugin call per sample."""
    lazy_plugins: bool = False
    """Build the plugin's solver instances at their first use, not with the solver: for a planner
    rebuilt with every change of its weights whose solves seldom reach the plugin (training's plan
    actor: its compiled plans and greedy Newton solve; the plugins' four instances cost ~16 ms of a
    ~70 ms Hopper rebuild). A step that first needs them then pays for them."""
    max_wall_ms: float = 0.0
    """Wall-time limit of one ``solve`` call in milliseconds, retries included (0: none). The
    plugin is stopped between iterations once the time is up (an ``iteration_callback``);
    samples that have not converged by then are ``TIMEOUT``. Needs ``workers == 1`` (a Python
    callback from several solver threads would serialise on the GIL)."""

    @property
    def worker_count(self) -> int:
        """``workers``, with 0 resolved to ``min(4, cpu_count)``."""
        return self.workers or min(4, os.cpu_count() or 1)

    def __post_init__(self) -> None:
        if self.plugin not in PLUGINS:
            raise InputError(f"expected solver plugin in {PLUGINS}, got {self.plugin!r}")
        if self.convexify not in ("auto", "eigen-clip", "none"):
            raise InputError(f"expected convexify in ('auto', 'eigen-clip', 'none'), got {self.convexify!r}")
        if self.qpsol not in QPSOLS:
            raise InputError(f"expected qpsol in {tuple(QPSOLS)}, got {self.qpsol!r}")
        if self.retry_plugin not in ("auto", "same", *PLUGINS):
            raise InputError(f"expected retry_plugin in {('auto', 'same', *PLUGINS)}, got {self.retry_plugin!r}")
        if not isinstance(self.workers, int) or self.workers < 0:
            raise InputError(f"expected workers to be an int >= 0, got {self.workers!r}")
        if not isinstance(self.max_iter, int) or self.max_iter < 1:
            raise InputError(f"expected max_iter to be an int >= 1, got {self.max_iter!r}")
        for name in ("tol", "kkt_tol", "bound_tol", "multiplier_tol"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and np.isfinite(v) and v > 0):
                raise InputError(f"expected {name} > 0, got {v!r}")
        if not (isinstance(self.max_wall_ms, int | float) and np.isfinite(self.max_wall_ms) and self.max_wall_ms >= 0):
            raise InputError(f"expected max_wall_ms >= 0 (0: no limit), got {self.max_wall_ms!r}")
        if self.max_wall_ms and self.workers != 1:
            raise InputError(f"expected workers = 1 with a wall-time limit (max_wall_ms), got workers={self.workers}")


class ChunkRunner(Protocol):
    """Evaluates the chunks of one batched evaluation elsewhere, e.g. on Ray actors
    (:class:`qmpc.distributed.RayRunner`), each holding its own solver built for the same problem.

    ``run(method, chunks)``: ``method`` is one of :data:`BatchedSolver.CHUNK_METHODS`;
    ``chunks[k]`` are its arguments restricted to the ``k``-th part of the batch (the shared ones
    whole). Returns, per chunk, the batch-first outputs of ``BatchedSolver.<method>`` on that
    chunk, in order; ``None`` if it cannot (the solver then evaluates the batch itself)."""

    workers: int

    def run(self, method: str, chunks: list[list]) -> list[list[np.ndarray]] | None: ...


CHECK_EVERY = 10
"""The batched Newton's closed-form values and gradients are checked against the network itself
on the first solve of a solver and every this many after (:meth:`BatchedSolver._certify`)."""
CHECK_TOL = 0.01
"""How far (a fraction of ``kkt_tol``) a closed-form gradient may be from the network's."""


def _agree(value, grad, v_ind, g_ind, grad_tol: float) -> bool:
    """Whether closed-form values ``(B,)`` and gradients ``(B, nu)`` are those of an independent
    evaluation: gradients within ``grad_tol`` (absolute, plus ``1e-9`` relative), values within
    ``1e-9`` relative; a value or gradient finite in one and not in the other disagrees."""
    a = np.column_stack([value, grad])
    b = np.column_stack([v_ind, g_ind])
    fin = np.isfinite(a)
    if not np.array_equal(fin, np.isfinite(b)):
        return False
    tol = np.full(a.shape, grad_tol)
    tol[:, 0] = 0.0
    tol = tol + 1e-9 * (1.0 + np.abs(b))
    return bool(np.all(np.abs(a - b)[fin] <= tol[fin]))


Certificate = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
"""``u (B, nu) -> (Q (B,), ∂Q/∂u (B, nu))`` at the batch's states: an evaluation of horizon-1
objectives that the solve does not use (see :meth:`BatchedSolver.solve`)."""


class _Plugins(NamedTuple):
    """A solver's plugin instances (:meth:`BatchedSolver.plugins`)."""

    nlpsol: ca.Function
    """The first worker's instance."""
    solve_one: list[ca.Function]
    """Per worker: one solve and its first-order residual, ``(w0, lam_x0, lam_g0, x0, theta, lbw,
    ubw) -> (w, f, lam_x, lam_g, grad_L, g)``."""
    retry: list[ca.Function]
    """The cold retries' instances."""


class PluginOutput(NamedTuple):
    """What :meth:`BatchedSolver.run_plugin` returns, batch first (float64)."""

    w: np.ndarray
    """``(B, n_w)`` the plugin's solutions (not clipped)."""
    f: np.ndarray
    """``(B, 1)`` objective values."""
    lam_x: np.ndarray
    """``(B, n_w)`` bound multipliers."""
    lam_g: np.ndarray
    """``(B, n_g)`` constraint multipliers."""
    grad_L: np.ndarray
    """``(B, n_w)`` gradient of the Lagrangian at the solution."""
    g: np.ndarray
    """``(B, n_g)`` constraint values at the solution."""


class FirstOrder(NamedTuple):
    """What :meth:`BatchedSolver.first_order` returns."""

    grad_L: np.ndarray
    """``(B, n_w)`` ``∇_w L``."""
    g: np.ndarray
    """``(B, n_g)`` the constraints."""


class SecondOrder(NamedTuple):
    """What :meth:`BatchedSolver.second_order` returns."""

    hess_L: np.ndarray
    """``(B, n_w, n_w)`` ``∇²_ww L``."""
    jac_g: np.ndarray
    """``(B, n_g, n_w)`` ``∂g/∂w``."""


class SolveResult(NamedTuple):
    """A batch of solutions; arrays are float64 numpy, batch first."""

    w: np.ndarray
    """``(B, n_w)`` primal solutions (the plan), clipped to the bounds."""
    value: np.ndarray
    """``(B,)`` optimal values ``V = J(w*)``."""
    lam_x: np.ndarray
    """``(B, n_w)`` bound multipliers (CasADi's sign: negative at a lower bound)."""
    lam_g: np.ndarray
    """``(B, n_g)`` multipliers of the dynamics."""
    status: np.ndarray
    """``(B,)`` int8 :class:`Status` codes."""
    kkt_residual: np.ndarray
    """``(B,)`` max of the projected gradient and constraint residual."""
    solve_ms: float
    """Wall time of the whole batch, retries included, in milliseconds."""
    message: str = ""
    """The NLP plugin's own return status of the last failed retry (e.g. ``sqpmethod:
    Search_Direction_Becomes_Too_Small``), ``""`` when none failed."""


_BLAS: list = []


def single_blas_thread():
    """A context in which numpy's BLAS/LAPACK runs on one thread (threadpoolctl; restored on exit).
    The solver's linear algebra is on small matrices (6 × 6 to 30 × 30, batched), where BLAS
    threads only cost: measured under load on this 2-core machine, ``eigh`` of a 30 × 30 matrix
    took 0.94 ms with OpenBLAS's 2 threads and 0.065 ms with one (entering the context: 8 µs)."""
    if not _BLAS:
        from threadpoolctl import ThreadpoolController

        _BLAS.append(ThreadpoolController())
    return _BLAS[0].limit(limits=1, user_api="blas")


def one_blas_thread(fn):
    """``fn`` run inside :func:`single_blas_thread`."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with single_blas_thread():
            return fn(*args, **kwargs)

    return wrapped


def _as_dm(theta: np.ndarray | ca.DM) -> ca.DM:
    """``theta`` as a CasADi DM (a numpy vector of 25k weights takes ~2 ms to convert)."""
    return theta if isinstance(theta, ca.DM) else ca.DM(theta)


class _Deadline(ca.Callback):
    """An ``iteration_callback`` that asks the plugin to stop once ``time.perf_counter()`` passes
    ``self.at`` (and records that it did). It reads none of the iterates (empty inputs: nothing
    is converted to Python per iteration)."""

    def __init__(self):
        ca.Callback.__init__(self)
        self.at = np.inf
        self.fired = False
        self.construct("qmpc_deadline", {})

    def get_n_in(self) -> int:
        return ca.nlpsol_n_out()

    def get_n_out(self) -> int:
        return 1

    def get_name_in(self, i: int) -> str:
        return ca.nlpsol_out(i)

    def get_name_out(self, i: int) -> str:
        return "stop"

    def get_sparsity_in(self, i: int) -> ca.Sparsity:
        return ca.Sparsity(0, 0)

    def eval(self, arg):
        if time.perf_counter() > self.at:
            self.fired = True
            return [1]
        return [0]


def _plugin_options(o: SolverOptions, callback: ca.Callback | None = None) -> dict:
    if o.plugin == "sqpmethod":
        opts = {
            "qpsol": o.qpsol,
            "qpsol_options": dict(QPSOLS[o.qpsol]),
            "print_header": False,
            "print_iteration": False,
            "print_status": False,
            "print_time": False,
            "max_iter": o.max_iter,
            "tol_pr": o.tol,
            "tol_du": o.tol,
            "min_step_size": 1e-14,
            # CasADi's default of 3 backtracks (of 0.8 each) cannot shorten a step below half:
            # on models/hopper.pt's own closed-loop states, 21 of 300 greedy (H = 1) solves then
            # cycled between two points to the iteration limit (each then retried by IPOPT,
            # 8-20 ms a step); with 20 none did (mean 4.9 iterations, at most 23)
            "max_iter_ls": 20,
            "error_on_fail": False,
            # a NaN/Inf evaluation (a trial step through a learned model that overflows) fails the
            # step or the solve, which qmpc counts: no warning on stderr
            "show_eval_warnings": False,
        }
        if o.convexify == "eigen-clip":
            # max_iter_eig: the default 50 Jacobi sweeps did not converge on a dense 30 × 30 plan
            # Hessian (H = 5, HalfCheetah), and sqpmethod then stopped with no status
            opts.update(convexify_strategy="eigen-clip", convexify_margin=1e-8, max_iter_eig=1000)
    else:
        opts = {
            "print_time": False,
            "error_on_fail": False,
            "show_eval_warnings": False,
            "ipopt": {"print_level": 0, "sb": "yes", "tol": o.tol, "max_iter": o.max_iter, "bound_relax_factor": 0.0},
        }
    for k, v in (o.plugin_options or {}).items():
        if isinstance(v, dict) and isinstance(opts.get(k), dict):
            opts[k] = {**opts[k], **v}
        else:
            opts[k] = v
    if callback is not None:
        opts["iteration_callback"] = callback
    return opts


class _Buffered:
    """One evaluation of a CasADi Function at a time through its buffer interface: the inputs are
    copied into arrays owned here and the outputs read from others, no DM built or converted
    (measured on the shipped HalfCheetah plan at H = 5: the objective 0.10 → 0.05 ms a call, the
    plan's derivatives 0.85 → 0.66 ms). Outputs ``(rows, cols)``. Not shared between threads."""

    def __init__(self, fn: ca.Function):
        self._fn = fn  # the buffer evaluates it: kept alive here
        self._buf, self._eval = fn.buffer()
        self._ins = [np.zeros(fn.nnz_in(i)) for i in range(fn.n_in())]
        self._outs = [np.zeros(fn.nnz_out(i)) for i in range(fn.n_out())]
        self._sizes = [fn.size_out(i) for i in range(fn.n_out())]
        for i, a in enumerate(self._ins):
            self._buf.set_arg(i, memoryview(a))
        for i, a in enumerate(self._outs):
            self._buf.set_res(i, memoryview(a))

    @staticmethod
    def applies(fn: ca.Function) -> bool:
        """Dense inputs and outputs (the buffers hold every entry)."""
        return all(fn.sparsity_in(i).is_dense() for i in range(fn.n_in())) and all(
            fn.sparsity_out(i).is_dense() for i in range(fn.n_out())
        )

    def __call__(self, *args: np.ndarray) -> list[np.ndarray]:
        for dst, a in zip(self._ins, args, strict=True):
            dst[:] = a.reshape(-1)
        self._eval()  # an exception inside raises RuntimeError, as a call does
        if self._buf.ret():  # a failure reported by a return code leaves the last outputs in place
            raise RuntimeError(f"evaluation of {self._fn.name()} failed")
        return [o.reshape(size, order="F").copy() for o, size in zip(self._outs, self._sizes, strict=True)]


class PlanOracle:
    """The :class:`~qmpc.newton.Oracle` of a single-shooting plan: ``J``, ``∇J`` and the exact
    condensed Hessian of the problem's own CasADi functions, for the states ``x0 (B, nx)``."""

    def __init__(self, solver: BatchedSolver, x0: np.ndarray, theta: ca.DM):
        self.solver, self.x0, self.theta = solver, x0, theta
        self._one: tuple[_Buffered, _Buffered, _Buffered] | None = None  # one state (a controller's plan)
        self._compiled = solver.compiled_plan if x0.shape[0] == 1 else None  # the same, compiled
        if x0.shape[0] == 1 and self._compiled is None:
            fns = tuple(solver.one_state(m) for m in ("objective", "plan_derivatives", "plan_first_order"))
            if all(f is not None for f in fns):
                self._one, self._theta64 = fns, np.asarray(theta, dtype=np.float64)

    def value(self, u: np.ndarray, rows: np.ndarray) -> np.ndarray:
        if self._compiled is not None:
            f = np.array([self._compiled.value(u[0], self.x0[0])])
        elif self._one is not None:
            f = self._buffered(self._one[0], u, [np.inf])[0].reshape(1)
        else:
            (f,) = self._contained(self.solver.objective, u, rows, [np.inf])
        return np.where(np.isfinite(f), f, np.inf)  # a rollout that overflows is no descent

    def derivatives(self, u: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        fill = [np.inf, np.nan, np.nan]
        if self._compiled is not None:
            f, g, H = self._compiled.derivatives(u[0], self.x0[0])
            f, g, H = np.array([f]), g[None], H[None]
        elif self._one is not None:
            f, g, H = self._buffered(self._one[1], u, fill)
            f, g, H = f.reshape(1), g.reshape(1, -1), H.reshape(1, *H.shape)
        else:
            f, g, H = self._contained(self.solver.plan_derivatives, u, rows, fill)
        return np.where(np.isfinite(f), f, np.inf), g, H  # non-finite: the SQP stops the sample

    def first_order(self, u: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``J`` and ``∇J`` alone (the same values as :meth:`derivatives`', without the Hessian)."""
        fill = [np.inf, np.nan]
        if self._compiled is not None:
            f, g = self._compiled.first_order(u[0], self.x0[0])
            f, g = np.array([f]), g[None]
        elif self._one is not None:
            f, g = self._buffered(self._one[2], u, fill)
            f, g = f.reshape(1), g.reshape(1, -1)
        else:
            f, g = self._contained(self.solver.plan_first_order, u, rows, fill)
        return np.where(np.isfinite(f), f, np.inf), g

    def _buffered(self, fn: _Buffered, u: np.ndarray, fill: list[float]) -> list[np.ndarray]:
        """The one state's outputs (``fill`` where the evaluation raises inside CasADi)."""
        with np.errstate(all="ignore"):  # an overflowing rollout: non-finite, stopped by the SQP
            try:
                return fn(u, self.x0, self._theta64)
            except RuntimeError:
                n = self.solver.problem.n_w
                return [np.full(s, v) for s, v in zip([(1,), (n,), (n, n)][: len(fill)], fill, strict=True)]

    def _contained(self, fn, u: np.ndarray, rows: np.ndarray, fill: list[float]) -> list[np.ndarray]:
        """``fn`` over the rows; if an evaluation raises inside CasADi (e.g. a model's derivative
        code), row by row, with ``fill`` (non-finite) for the rows that raise."""
        with np.errstate(all="ignore"):  # an overflowing rollout: non-finite, stopped by the SQP
            try:
                out = fn(u, self.x0[rows], self.theta)
                return list(out) if isinstance(out, tuple) else [out]
            except RuntimeError:
                pass
            parts = []
            for i, r in enumerate(rows):
                try:
                    o = fn(u[i : i + 1], self.x0[r : r + 1], self.theta)
                    parts.append(list(o) if isinstance(o, tuple) else [o])
                except RuntimeError:
                    parts.append(None)
        ok = next(p for p in parts if p is not None) if any(p is not None for p in parts) else None
        if ok is None:  # every row raised: shapes from the problem
            n = self.solver.problem.n_w
            shapes = [(1,), (1, n), (1, n, n)][: len(fill)]
            return [np.full((len(rows), *s[1:]), v) for s, v in zip(shapes, fill, strict=True)]
        return [
            np.concatenate([p[k] if p is not None else np.full_like(ok[k], fill[k]) for p in parts])
            for k in range(len(fill))
        ]


class BatchedSolver:
    """Solves a :class:`ControlProblem` for a batch of states sharing one ``theta``.

    The solver, its batch wrapper (``Function.map`` with ``theta`` and the bounds shared, one
    per batch size, built on first use and kept) and the derivative functions are built once.
    """

    CHUNK_METHODS: ClassVar[frozenset[str]] = frozenset(
        {"run_plugin", "first_order", "second_order", "x_adjoint", "cold_start", "objective", "plan_derivatives"}
    )
    """The batched evaluations a :class:`ChunkRunner` may be asked to run."""

    def __init__(
        self, problem: ControlProblem, options: SolverOptions | None = None, runner: ChunkRunner | None = None
    ):
        """``runner``: split batches over it (its ``workers`` parts) instead of local threads; the
        samples that stay here (retries, single rows, batches too small to split) use this
        solver's own instance."""
        self.problem = problem
        self.runner = runner
        self.options = options or SolverOptions()
        if self.options.convexify == "auto":
            reduced = problem.N == 0 or problem.shooting == "single"  # the Hessian is the reduced one
            self.options = dataclasses.replace(self.options, convexify="eigen-clip" if reduced else "none")
        self.deadline = _Deadline() if self.options.max_wall_ms else None
        self.oracle_agrees = True
        """Whether the batched Newton's closed form has agreed with the network at every check
        (:meth:`_certify`); False: every solve is certified by the network."""
        self._newton_solves = 0
        self.compiled_plan = problem.compiled_plan
        """The problem's compiled plan (:class:`~qmpc.compiled.CompiledPlan`: one state's plans are
        solved by it), checked against the problem's CasADi functions on the first solve and every
        :data:`CHECK_EVERY`-th after; None where there is none, or once it disagreed."""
        self._compiled_solves = 0
        if self.deadline is not None:  # threadpoolctl's first use scans every loaded library: not in a step
            single_blas_thread()
        self.workers = runner.workers if runner else self.options.worker_count
        # one solver instance per worker thread: CasADi releases the GIL while it solves
        self._threads = threads = 1 if runner else self.workers
        self._maps: dict[tuple[str, int, int], ca.Function] = {}
        self._one_state = threading.local()  # _Buffered by method name, per thread
        self._plugins_lock = threading.Lock()
        self._plugins: _Plugins | None = None
        if not self.options.lazy_plugins:
            self.plugins()
        self._pool = ThreadPoolExecutor(threads) if threads > 1 else None
        if self._pool is not None:  # its threads end with the solver (a layer rebuilds it often)
            weakref.finalize(self, self._pool.shutdown, wait=False)

    def plugins(self) -> _Plugins:
        """The plugin's solver instances (built here once: with the solver, or at their first use
        with ``options.lazy_plugins``)."""
        with self._plugins_lock:
            if self._plugins is None:
                self._plugins = self._build_plugins(self._threads)
            return self._plugins

    def _build_plugins(self, threads: int) -> _Plugins:
        P, o = self.problem, self.options
        nlpsol = self._nlpsol("qmpc_nlp", o, self.deadline)
        w0, lx0, lg0 = ca.MX.sym("w0", P.n_w), ca.MX.sym("lam_x0", P.n_w), ca.MX.sym("lam_g0", P.n_g)
        x0, th = ca.MX.sym("x0", P.nx), ca.MX.sym("theta", P.n_theta)
        lb, ub, zg = ca.MX.sym("lbw", P.n_w), ca.MX.sym("ubw", P.n_w), ca.DM.zeros(P.n_g)
        solve_one = []
        for solver in [nlpsol] + [self._nlpsol(f"qmpc_nlp_{i}", o) for i in range(1, threads)]:
            r = solver(x0=w0, lam_x0=lx0, lam_g0=lg0, p=ca.vertcat(x0, th), lbx=lb, ubx=ub, lbg=zg, ubg=zg)
            # the first-order residual of the solution, in the same call (one call per batch)
            grad_L, g = P.first_order(r["x"], x0, th, r["lam_g"])
            solve_one.append(
                ca.Function(
                    "solve_one",
                    [w0, lx0, lg0, x0, th, lb, ub],
                    [r["x"], r["f"], r["lam_x"], r["lam_g"], grad_L, g],
                    ["w0", "lam_x0", "lam_g0", "x0", "theta", "lbw", "ubw"],
                    ["w", "f", "lam_x", "lam_g", "grad_L", "g"],
                )
            )
        other = next(p for p in PLUGINS if p != o.plugin)
        names = {"auto": [o.plugin, other], "same": [o.plugin]}.get(o.retry_plugin, [o.retry_plugin])
        retry = [
            nlpsol
            if p == o.plugin
            else self._nlpsol("qmpc_nlp_retry", dataclasses.replace(o, plugin=p, plugin_options=None), self.deadline)
            for p in names
        ]
        return _Plugins(nlpsol, solve_one, retry)

    @property
    def nlpsol(self) -> ca.Function:
        """The plugin's solver instance of the first worker (the one retries share)."""
        return self.plugins().nlpsol

    @property
    def retry_solvers(self) -> list[ca.Function]:
        """The solver instances of the cold retries (see ``SolverOptions.retry_plugin``)."""
        return self.plugins().retry

    def _nlpsol(self, name: str, options: SolverOptions, callback: ca.Callback | None = None) -> ca.Function:
        opts = _plugin_options(options, callback)
        h = self.problem.hess_lag
        if h is not None:  # single shooting: the condensed exact Hessian
            if options.plugin == "ipopt":  # IPOPT takes the upper triangle
                ins = h.mx_in()
                h = ca.Function("hess_lag", ins, [ca.triu(h(*ins))], h.name_in(), h.name_out())
            opts["hess_lag"] = h
        return ca.nlpsol(name, options.plugin, self.problem.nlp, opts)

    # -- batched evaluations ------------------------------------------------------------
    def one_state(self, method: str) -> _Buffered | None:
        """The problem's function ``method`` for one state at a time, through its buffers, one per
        calling thread (None where an input or output is sparse)."""
        cache = self._one_state.__dict__
        if method not in cache:
            fn = getattr(self.problem, method)
            cache[method] = _Buffered(fn) if _Buffered.applies(fn) else None
        return cache[method]

    def _base(self, method: str, worker: int = 0) -> ca.Function:
        return self.plugins().solve_one[worker] if method == "run_plugin" else getattr(self.problem, method)

    def _mapped(self, method: str, B: int, worker: int, shared: tuple[int, ...]) -> ca.Function:
        key = (method, B, worker, shared)
        if key not in self._maps:
            base = self._base(method, worker)
            self._maps[key] = base.map(f"{method}_{B}_{worker}", "serial", B, list(shared), [])
        return self._maps[key]

    def _chunks(self, B: int) -> list[slice]:
        n = max(1, min(self.workers, B // 8))
        if n == 1:
            return [slice(0, B)]
        edges = np.linspace(0, B, n + 1).astype(int)
        return [slice(int(a), int(b)) for a, b in itertools.pairwise(edges)]

    def _batched(self, method: str, args: tuple, matrix_out: bool = False) -> list[np.ndarray]:
        """Evaluate the CasADi function behind ``method`` over a batch, batch first in and out,
        split across the worker threads (or sent to the :class:`ChunkRunner`'s workers, from 8
        samples on: single rows and retries stay here); a batch is split into
        ``min(workers, B // 8)`` parts either way.

        The ``(B, n)`` arrays among ``args`` are split by rows; the others (``theta``, the
        bounds) are shared by the batch. ``matrix_out``: the outputs are matrices, returned as
        ``(B, rows, cols)``."""
        B = args[0].shape[0]
        shared = tuple(i for i, a in enumerate(args) if not (isinstance(a, np.ndarray) and a.ndim == 2))

        def run(k: int, sl: slice) -> list[np.ndarray]:
            ins = [a if i in shared else np.asarray(a[sl]).T for i, a in enumerate(args)]
            outs = self._mapped(method, sl.stop - sl.start, k, shared)(*ins)
            return [np.asarray(o) for o in (outs if isinstance(outs, tuple | list) else [outs])]

        chunks = self._chunks(B)
        if self.runner is not None and B >= 8:  # batch first in and out; None: do it here
            parts = self.runner.run(
                method, [[a if i in shared else a[sl] for i, a in enumerate(args)] for sl in chunks]
            )
            if parts is not None:
                return [np.concatenate(outs, axis=0) for outs in zip(*parts, strict=True)]
        if len(chunks) == 1 or self._pool is None:
            parts = [run(0, c) for c in chunks]
        else:
            parts = list(self._pool.map(run, range(len(chunks)), chunks))
        base = self._base(method)
        res = []
        for k in range(base.n_out()):
            r, c = base.size_out(k)
            blocks = []
            for sl, part in zip(chunks, parts, strict=True):
                o, b = part[k], sl.stop - sl.start
                if matrix_out:  # horzcat of b (r × c) blocks
                    blocks.append(o.reshape(r, b, c).transpose(1, 0, 2))
                else:
                    blocks.append(o.T.reshape(b, r))
            res.append(np.concatenate(blocks, axis=0))
        return res

    def run_plugin(self, w0, lam_x0, lam_g0, x0, theta: ca.DM, lbw, ubw) -> PluginOutput:
        """One call of the NLP plugin per row of ``x0 (B, nx)``, from ``w0, lam_x0, lam_g0``
        (``(B, n_w)``, ``(B, n_w)``, ``(B, n_g)``), no certificate and no retry (see :meth:`solve`)."""
        return PluginOutput(*self._batched("run_plugin", (w0, lam_x0, lam_g0, x0, theta, lbw, ubw)))

    def first_order(self, w: np.ndarray, x0: np.ndarray, theta: ca.DM, lam_g: np.ndarray) -> FirstOrder:
        """``∇_w L (B, n_w)`` and ``g (B, n_g)`` at ``w (B, n_w)``, ``lam_g (B, n_g)``."""
        return FirstOrder(*self._batched("first_order", (w, x0, theta, lam_g)))

    def second_order(self, w: np.ndarray, x0: np.ndarray, theta: ca.DM, lam_g: np.ndarray) -> SecondOrder:
        """``∇²_ww L (B, n_w, n_w)`` and ``∂g/∂w (B, n_g, n_w)``."""
        return SecondOrder(*self._batched("second_order", (w, x0, theta, lam_g), matrix_out=True))

    def x_adjoint(self, w, x0, theta: ca.DM, lam_g, a: np.ndarray, b: np.ndarray, vbar: np.ndarray) -> np.ndarray:
        """``x̄ (B, nx)`` from the stage costs and the dynamics (:attr:`ControlProblem.x_adjoint`)
        for adjoints ``a (B, n_w)``, ``b (B, n_g)`` and value seeds ``vbar (B, 1)``."""
        return self._batched("x_adjoint", (w, x0, theta, lam_g, a, b, vbar))[0]

    def cold_start(
        self, x0: np.ndarray, theta: ca.DM, lbw: np.ndarray | None = None, ubw: np.ndarray | None = None
    ) -> np.ndarray:
        """``(B, n_w)`` initial guess: zero actions (clipped to ``lbw, ubw`` when given), model rolled out."""
        (w,) = self._batched("cold_start", (x0, theta))
        return w if lbw is None else np.clip(w, lbw, ubw)

    # -- solving ------------------------------------------------------------------------
    @one_blas_thread
    def solve(
        self,
        x0: np.ndarray,
        theta: np.ndarray | ca.DM,
        lbw: np.ndarray,
        ubw: np.ndarray,
        w0: np.ndarray | None = None,
        lam_x0: np.ndarray | None = None,
        lam_g0: np.ndarray | None = None,
        oracle: Oracle | None = None,
        certificate: Certificate | None = None,
        newton_tol: float | None = None,
        started: float | None = None,
    ) -> SolveResult:
        """Solve for every row of ``x0 (B, nx)``; never raises on a failed sample.

        ``w0, lam_x0, lam_g0`` warm-start the solve (``(B, n_w)``, ``(B, n_w)``, ``(B, n_g)``);
        without them the solve starts cold. Inputs are assumed validated (see the bridge).

        ``oracle`` (horizon 1, a problem with a ``q_batch``): closed-form values and derivatives
        of Q in ``u`` for these states and ``theta`` (e.g. ``PICNN.action_oracle(x0)``). The whole
        batch is then solved by the batched projected Newton (:mod:`qmpc.newton`) and certified
        on the oracle's gradient, the oracle checked on schedule against an evaluation independent
        of it (:meth:`_certify`: ``certificate``, else the vectorised twin); the samples that
        fail the certificate go to the plugin, warm-started at
        the Newton iterate, then to its retries (``RETRIED`` if they pass). ``newton_tol``: the
        Newton's stopping residual (default ``tol``). ``started``: the ``time.perf_counter()`` the
        wall-time limit counts from (default: now; a controller passes the start of its step).
        """
        P, o = self.problem, self.options
        t0 = time.perf_counter()
        if self.deadline is not None:
            start = t0 if started is None else min(t0, started)
            self.deadline.at, self.deadline.fired = start + o.max_wall_ms * 1e-3, False
        if P.plan_newton and o.newton:
            return self._solve_plan(x0, _as_dm(theta), lbw, ubw, w0, t0)
        if oracle is None or not P.batched:
            theta_dm = _as_dm(theta)
            *out, message = self._plugin_solve(x0, theta_dm, lbw, ubw, w0, lam_x0, lam_g0)
            return SolveResult(*out, (time.perf_counter() - t0) * 1e3, message)
        theta_dm = theta  # converted to a DM only where CasADi needs it (a numpy theta of 25k
        # weights took ~2 ms to convert: as long as the Newton and its certificate)
        u0 = np.clip(np.zeros((x0.shape[0], P.n_w)), lbw, ubw) if w0 is None else w0
        tol = o.tol if newton_tol is None else newton_tol
        nr = newton.solve_box(oracle, u0, lbw, ubw, tol=tol, max_iter=o.max_iter)
        w, value, lam_x, res = self._certify(nr, x0, theta_dm, lbw, ubw, certificate)
        lam_g = np.zeros((x0.shape[0], 0))
        status = np.where(res <= o.kkt_tol, Status.SOLVED, Status.FAILED).astype(np.int8)
        bad = np.flatnonzero(status != Status.SOLVED)
        message = ""
        if bad.size:  # the plugin, from the Newton iterate (then its cold retries)
            theta_dm = _as_dm(theta)
            message = self._finish_by_plugin(bad, x0, theta_dm, lbw, ubw, (w, value, lam_x, lam_g, status, res))
        return SolveResult(w, value, lam_x, lam_g, status, res, (time.perf_counter() - t0) * 1e3, message)

    def _solve_plan(self, x0, theta_dm: ca.DM, lbw, ubw, w0, t0: float) -> SolveResult:
        """Single shooting, horizon > 1: the plan is a box-constrained problem in the actions. The
        batched SQP of :mod:`qmpc.boxsqp` solves it on the problem's own value, gradient and exact
        (condensed) Hessian, made positive definite where the plan is not convex; samples that do
        not pass the certificate go to the plugin from its iterate (then its cold retries).

        Measured on ``models/half_cheetah.pt`` at its own closed-loop states, H = 3, cold starts:
        sqpmethod without convexification failed 21 of 30 states (``Search_Direction_Becomes_Too_
        Small``: the condensed Hessian is indefinite), with eigen-clip it aborted at H = 5 (its
        Jacobi eigen-decomposition ran out of iterations) or stopped at residuals of 0.1–2."""
        o = self.options
        B = x0.shape[0]
        u0 = self.cold_start(x0, theta_dm, lbw, ubw) if w0 is None else np.clip(w0, lbw, ubw)
        deadline = self.deadline.at if self.deadline is not None else np.inf
        nr = self._compiled_sqp(x0, theta_dm, u0, lbw, ubw, deadline) if B == 1 and self.compiled_plan else None
        if nr is None:  # (a compiled plan that disagreed is gone from the oracle too)
            oracle = PlanOracle(self, x0, theta_dm)
            nr = solve_box_sqp(
                oracle, u0, lbw, ubw, tol=o.tol, max_iter=o.max_iter, deadline=deadline, hessian_at_solution=False
            )
        w, value, res = nr.u, nr.value, nr.residual
        lam_x = np.where((w <= lbw) | (w >= ubw), -nr.grad, 0.0)
        lam_g = np.zeros((B, 0))
        status = np.where(res <= o.kkt_tol, Status.SOLVED, Status.FAILED).astype(np.int8)
        bad = np.flatnonzero(status != Status.SOLVED)
        message = ""
        if bad.size and time.perf_counter() > deadline:  # out of time: no plugin, no retries
            status[bad] = Status.TIMEOUT
            self.deadline.fired = True
        elif bad.size:
            message = self._finish_by_plugin(bad, x0, theta_dm, lbw, ubw, (w, value, lam_x, lam_g, status, res))
        return SolveResult(w, value, lam_x, lam_g, status, res, (time.perf_counter() - t0) * 1e3, message)

    def _compiled_sqp(self, x0, theta_dm: ca.DM, u0, lbw, ubw, deadline: float) -> newton.BoxNewtonResult | None:
        """One state's plan by the compiled SQP (:meth:`~qmpc.compiled.CompiledPlan.solve`, the same
        iterations as :func:`~qmpc.boxsqp.solve_box_sqp`); where an iteration's QP is not solved,
        :mod:`qmpc.boxsqp` finishes from its iterate. The solution's value and gradient are checked
        against the problem's CasADi functions on the first solve and every :data:`CHECK_EVERY`-th
        after: where they disagree, this solver stops using the compiled plan (with a warning) and
        returns None (the caller solves again without it)."""
        o, cp = self.options, self.compiled_plan
        u, f, g, r, its, qp_failed = cp.solve(x0[0], u0[0], lbw, ubw, tol=o.tol, max_iter=o.max_iter, deadline=deadline)
        if qp_failed:
            nr = solve_box_sqp(
                PlanOracle(self, x0, theta_dm),
                u[None],
                lbw,
                ubw,
                tol=o.tol,
                max_iter=max(1, o.max_iter - its),
                deadline=deadline,
                hessian_at_solution=False,
            )
            u, f, g, r = nr.u[0], float(nr.value[0]), nr.grad[0], float(nr.residual[0])
        if self._compiled_solves % CHECK_EVERY == 0:
            try:
                with np.errstate(all="ignore"):
                    out = self.problem.plan_first_order(u, x0[0], theta_dm)
                f_ind, g_ind = (np.asarray(a, np.float64) for a in out)
            except RuntimeError:  # CasADi could not evaluate it (an overflowing rollout): no check this time
                f_ind, g_ind = np.array(f), g
            if not _agree(np.array([f]), g[None], f_ind.reshape(1), g_ind.reshape(1, -1), CHECK_TOL * o.kkt_tol):
                self.compiled_plan = None
                warnings.warn(
                    "the compiled plan's value or gradient disagrees with the problem's CasADi functions; this "
                    "solver solves plans without it from now on (slower)",
                    RuntimeWarning,
                    stacklevel=3,
                )
                return None
        self._compiled_solves += 1
        return newton.BoxNewtonResult(
            u[None], np.array([f]), g[None], np.array([r]), np.array([r <= o.tol]), np.array([its]), None
        )

    def plan_derivatives(self, w: np.ndarray, x0: np.ndarray, theta: ca.DM) -> tuple[np.ndarray, ...]:
        """Single shooting: ``J (B,)``, ``∇J (B, n_w)`` and ``∇²J (B, n_w, n_w)`` in one call."""
        f, g, H = self._batched("plan_derivatives", (w, x0, theta), matrix_out=True)
        return f.reshape(-1), g.reshape(g.shape[0], -1), H

    def plan_first_order(self, w: np.ndarray, x0: np.ndarray, theta: ca.DM) -> tuple[np.ndarray, np.ndarray]:
        """Single shooting: ``J (B,)`` and ``∇J (B, n_w)``, without the Hessian."""
        f, g = self._batched("plan_first_order", (w, x0, theta))
        return f.reshape(-1), g.reshape(g.shape[0], -1)

    def objective(self, w: np.ndarray, x0: np.ndarray, theta: ca.DM) -> np.ndarray:
        """``J (B,)`` of the plans ``w (B, n_w)`` from ``x0 (B, nx)``."""
        return self._batched("objective", (w, x0, theta))[0].reshape(-1)

    def _certify(
        self,
        nr: newton.BoxNewtonResult,
        x0: np.ndarray,
        theta_dm: ca.DM | np.ndarray,
        lbw: np.ndarray,
        ubw: np.ndarray,
        certificate: Certificate | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Horizon 1: ``(u, value, lam_x, residual)`` of the batched Newton's last iterates: the
        projected-gradient residual (the same certificate as every other solve) and the bound
        multipliers ``−∂Q/∂u`` at the components on a bound (CasADi's sign).

        The values and gradients are the closed form's, checked against an evaluation independent
        of it (``certificate``, the torch network itself; else the CasADi twin, vectorised) on the
        first solve and every :data:`CHECK_EVERY`-th after. Where they disagree (more than
        :data:`CHECK_TOL` of ``kkt_tol`` in a gradient, or ``1e-9`` relative in a value: a closed
        form that is not the network's), every later solve of this solver takes the independent
        evaluation's values and gradients instead, with a warning; until then a check changes no
        result."""
        u, B = nr.u, nr.u.shape[0]
        value, grad = nr.value, nr.grad
        check = not self.oracle_agrees or self._newton_solves % CHECK_EVERY == 0
        self._newton_solves += 1
        if check:
            if certificate is not None:
                v_ind, g_ind = certificate(u)
            else:
                q, g = self.problem.batch_first_order(B)(u.reshape(-1), x0.T, theta_dm)
                v_ind, g_ind = np.asarray(q).reshape(B), np.asarray(g).T
            if self.oracle_agrees and not _agree(value, grad, v_ind, g_ind, CHECK_TOL * self.options.kkt_tol):
                self.oracle_agrees = False
                warnings.warn(
                    "the closed-form derivatives of the network's action_oracle disagree with the network itself; "
                    "this solver certifies every solve by the network from now on (slower)",
                    RuntimeWarning,
                    stacklevel=2,
                )
            if not self.oracle_agrees:
                value, grad = v_ind, g_ind
        res = kkt.kkt_residual(u, grad, np.zeros((B, 0)), lbw, ubw)
        res[~np.isfinite(value)] = np.inf
        lam_x = np.where((u <= lbw) | (u >= ubw), -grad, 0.0)
        return u.copy(), value.copy(), lam_x, res

    def _finish_by_plugin(self, bad, x0, theta_dm, lbw, ubw, out) -> str:
        """The samples ``bad`` that a Newton or SQP left unconverged, by the plugin from their
        iterates (then its cold retries; ``RETRIED`` if they pass); writes into ``out = (w, value,
        lam_x, lam_g, status, residual)`` and returns the plugin's last failure message."""
        w, value, lam_x, lam_g, status, res = out
        sub = self._plugin_solve(x0[bad], theta_dm, lbw, ubw, w[bad], None, None)
        w[bad], value[bad], lam_x[bad], lam_g[bad], st, res[bad], message = sub
        status[bad] = np.where(st == Status.SOLVED, Status.RETRIED, st)
        return message

    def _plugin_solve(self, x0, theta_dm, lbw, ubw, w0, lam_x0, lam_g0) -> tuple:
        """The plugin's batched solve, then a cold retry of each sample that fails the certificate:
        ``(w, value, lam_x, lam_g, status, residual, message)``."""
        P, o = self.problem, self.options
        B = x0.shape[0]
        if w0 is None:
            w0 = self.cold_start(x0, theta_dm, lbw, ubw)
        lam_x0 = np.zeros((B, P.n_w)) if lam_x0 is None else lam_x0
        lam_g0 = np.zeros((B, P.n_g)) if lam_g0 is None else lam_g0
        args = (w0, lam_x0, lam_g0, x0, theta_dm, lbw, ubw)
        try:
            w, f, lam_x, lam_g, grad_L, g = self.run_plugin(*args)
        except RuntimeError:  # an evaluation inside CasADi raised: solve row by row, keep the others
            w, f, lam_x, lam_g, grad_L, g = self._solve_rows(*args)
        w = np.clip(w, lbw, ubw)
        value = f.reshape(B)
        res = kkt.kkt_residual(w, grad_L, g, lbw, ubw)
        status = np.where(res <= o.kkt_tol, Status.SOLVED, Status.FAILED).astype(np.int8)
        bad = np.flatnonzero(status != Status.SOLVED)
        message = ""
        if o.retry and bad.size:
            message = self._retry(bad, x0, theta_dm, lbw, ubw, (w, value, lam_x, lam_g, status, res))
        elif bad.size:
            status[bad] = Status.TIMEOUT if self.deadline is not None and self.deadline.fired else Status.FAILED
        return w, value, lam_x, lam_g, status, res, message

    def _retry(self, bad, x0, theta_dm, lbw, ubw, out) -> str:
        """Cold retries of the samples ``bad``, each plugin in turn until one passes; writes into
        the arrays ``out = (w, value, lam_x, lam_g, status, residual)``. Returns the plugin's return
        status of the last attempt that failed (``""`` if none)."""
        o = self.options
        message = ""
        w, value, lam_x, lam_g, status, res = out
        wc = self.cold_start(x0[bad], theta_dm, lbw, ubw)
        for j, i in enumerate(bad):
            for solver in self.retry_solvers:
                if self.deadline is not None and time.perf_counter() > self.deadline.at:
                    status[i] = Status.TIMEOUT
                    break
                attempt = self._attempt(solver, wc[j], x0[i], theta_dm, lbw, ubw)
                if attempt is None:
                    status[i], message = Status.FAILED, f"{solver.name()}: an evaluation raised"
                    continue
                w[i], value[i], lam_x[i], lam_g[i], res[i], stats = attempt
                if res[i] <= o.kkt_tol:
                    status[i] = Status.RETRIED
                    break
                message = f"{solver.name()}: {stats.get('return_status', 'no status')}, KKT residual {res[i]:.3g}"
                if self.deadline is not None and self.deadline.fired:
                    status[i] = Status.TIMEOUT
                elif "Maximum_Iter" in str(stats.get("return_status")) or stats.get("iter_count", 0) >= o.max_iter:
                    status[i] = Status.MAX_ITER
                else:
                    status[i] = Status.FAILED
        return message

    def _attempt(self, solver: ca.Function, w0, x0, theta_dm, lbw, ubw):
        """One cold solve of one sample: ``(w, value, lam_x, lam_g, residual, stats)``, or None
        if the evaluation raised."""
        try:
            r = solver(x0=w0, p=ca.vertcat(ca.DM(x0), theta_dm), lbx=lbw, ubx=ubw, lbg=0, ubg=0)
        except RuntimeError:
            return None
        try:
            stats = solver.stats()
        except RuntimeError:  # seen with sqpmethod after some failed solves in CasADi 3.8.2
            stats = {}
        wi = np.clip(np.asarray(r["x"]).reshape(-1), lbw, ubw)
        lgi = np.asarray(r["lam_g"]).reshape(-1)
        try:
            ri = self._residual(wi[None], x0[None], theta_dm, lgi[None], lbw, ubw)[0]
        except RuntimeError:
            ri = np.inf
        return wi, float(r["f"]), np.asarray(r["lam_x"]).reshape(-1), lgi, ri, stats

    def _solve_rows(self, w0, lam_x0, lam_g0, x0, theta_dm, lbw, ubw) -> list[np.ndarray]:
        """The batched solve one row at a time; a row whose evaluation raises comes back as its
        initial guess with NaN residuals (so it is marked failed and retried)."""
        B, P = x0.shape[0], self.problem
        out = [
            w0.copy(),
            np.full((B, 1), np.nan),
            lam_x0.copy(),
            lam_g0.copy(),
            np.full((B, P.n_w), np.nan),
            np.full((B, P.n_g), np.nan),
        ]
        for i in range(B):
            row = (w0[i : i + 1], lam_x0[i : i + 1], lam_g0[i : i + 1], x0[i : i + 1], theta_dm, lbw, ubw)
            try:
                res = self.run_plugin(*row)
            except RuntimeError:
                continue
            for k, v in enumerate(res):
                out[k][i] = v[0]
        return out

    def _residual(self, w, x0, theta_dm, lam_g, lbw, ubw) -> np.ndarray:
        grad_L, g = self.first_order(w, x0, theta_dm, lam_g)
        return kkt.kkt_residual(w, grad_L, g, lbw, ubw)

    # -- sensitivities ------------------------------------------------------------------
    def at_bounds(
        self, w: np.ndarray, lam_x: np.ndarray, lbw: np.ndarray, ubw: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(fixed, weak)`` masks ``(B, n_w)`` of solutions ``w`` with bound multipliers ``lam_x``
        (:func:`qmpc.kkt.at_bounds` with this solver's ``bound_tol`` and ``multiplier_tol``)."""
        return kkt.at_bounds(w, lam_x, lbw, ubw, self.options.bound_tol, self.options.multiplier_tol)

    def adjoint(
        self,
        result: SolveResult,
        x0: np.ndarray,
        theta: np.ndarray | ca.DM,
        lbw: np.ndarray,
        ubw: np.ndarray,
        seed: np.ndarray,
        hessian: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> Adjoint:
        """Solve the reduced KKT system for seeds ``(B, n_w)`` on ``w*`` (see module docstring):
        CasADi evaluates the Hessian of the Lagrangian and the constraint Jacobian at the
        solutions, :func:`qmpc.kkt.adjoint` does the rest. ``hessian``: ``w (B, n_w) -> (B, n_w,
        n_w)``, the Lagrangian's Hessian by other means, for a problem without constraints ``g``
        (horizon 1, where it is ``∇²_u Q``: e.g. in closed form from the network's oracle); CasADi
        is then not called."""
        P = self.problem
        if hessian is None:
            H, G = self.second_order(result.w, x0, _as_dm(theta), result.lam_g)
        else:
            if P.n_g:
                raise InputError(f"expected a problem without constraints g with a given Hessian, got n_g = {P.n_g}")
            with single_blas_thread():
                H = np.asarray(hessian(result.w), dtype=np.float64)
            if H.shape != (x0.shape[0], P.n_w, P.n_w):
                raise InputError(f"expected a Hessian of shape {(x0.shape[0], P.n_w, P.n_w)}, got {H.shape}")
            G = np.zeros((x0.shape[0], 0, P.n_w))
        fixed, weak = self.at_bounds(result.w, result.lam_x, lbw, ubw)
        with single_blas_thread():
            a, b, singular = kkt.adjoint(H, G, fixed, seed, Status.ok(result.status), self.problem.nx)
        return Adjoint(a, b, singular, weak.sum(axis=1))
