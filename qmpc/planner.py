"""The plan solver of a Q network: its CasADi twin, an :class:`~qmpc.problem.MPCSpec` and a
:class:`~qmpc.solver.BatchedSolver`, kept in step with the network's weights. Numpy in, numpy
out, no autograd: the controller owns one (:class:`~qmpc.controller.Controller`), and the torch
layer (:class:`~qmpc.bridge.ArgminLayer`) wraps one with its gradients.

For horizon 1 with a PICNN, batches are first solved at once by the batched projected Newton of
:mod:`qmpc.newton` on the network's closed-form derivatives and certified by the torch network
itself; CasADi takes the samples that fail.

Thread safety: every solve (and every evaluation of a solve's sensitivities) holds the
planner's :attr:`~Planner.lock`, so one planner may be called from several threads; the calls
run one at a time. Functional evaluations of the network (``torch.func.functional_call``) use a
private copy of its structure (:attr:`Planner.functional_q`), never the user's module.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable
from typing import Literal

import casadi as ca
import numpy as np
import torch
from torch import nn

from qmpc.compiled import GreedyNewton, pack_of
from qmpc.errors import InputError
from qmpc.networks import QNetwork
from qmpc.problem import ControlProblem, MPCSpec
from qmpc.solver import BatchedSolver, SolveResult, SolverOptions, single_blas_thread

__all__ = ["NEWTON_MIN_WEIGHTS", "NEWTON_VALUE_TOL", "Planner", "as_bounds", "split_plan"]

NEWTON_MIN_WEIGHTS = 16384
"""Kept for reference (no longer a switch): a network's batches of every size go to the batched
Newton wherever it applies, so that a state gets the same argmin alone and in a batch (before, a
batch of 7 went to the plugin and one of 8 to the Newton: 1.6e-6 apart on an
InvertedPendulum-sized PICNN). Measured when sizes decided: one state took 5.2 ms by the Newton
against 7.7 ms by the plugin on a HalfCheetah-sized PICNN (24831 weights), and 3.8 against 2.8 ms
on an InvertedPendulum-sized one (the plugin was faster up to 4 states there)."""

NEWTON_VALUE_TOL = 0.1
"""Without gradients (``grad_mode="none"``, a TD target's value) the batched Newton stops at a
residual of this fraction of ``kkt_tol`` (the certificate's threshold; the value is then exact to
about residual² / curvature) instead of ``tol``: measured on a HalfCheetah-sized batch of 256
warm-started after a small change of the weights, 8.0 → 6.1 ms."""


def as_bounds(v, act_dim: int, name: str) -> np.ndarray:
    """Action bounds ``low`` or ``high`` (a number, array or tensor) as float64 ``(act_dim,)``."""
    if isinstance(v, int | float):
        v = np.full(act_dim, float(v))
    a = v.detach().cpu().double().numpy() if isinstance(v, torch.Tensor) else np.asarray(v, dtype=float)
    if a.shape != (act_dim,):
        raise InputError(f"expected {name} of shape ({act_dim},), got {a.shape}")
    if np.isnan(a).any():
        raise InputError(f"expected {name} without NaN, got {a}")
    return a


def split_plan(problem: ControlProblem, w: np.ndarray, x0: np.ndarray, theta) -> dict[str, np.ndarray]:
    """Solutions ``w (B, n_w)`` for states ``x0 (B, nx)`` split into ``actions (B, H, nu)`` and
    ``states (B, H − 1, nx)`` (single shooting: the model's rollout of the actions)."""
    P, B = problem, w.shape[0]
    acts = w[:, : (P.N + 1) * P.nu].reshape(B, P.N + 1, P.nu)
    if P.shooting == "single":
        states = np.stack([np.asarray(P.states(w[i], x0[i], theta)).reshape(P.N, P.nx) for i in range(B)])
    else:
        states = w[:, (P.N + 1) * P.nu :].reshape(B, P.N, P.nx)
    return {"actions": acts, "states": states}


class Planner:
    """Solves ``spec``'s problem for ``q`` as it is now, for batches of states.

    Args:
        q: a :class:`~qmpc.networks.QNetwork`.
        spec: the :class:`~qmpc.problem.MPCSpec` (bounds ``(act_dim,)``, horizon, model…).
        options: the :class:`~qmpc.solver.SolverOptions`.
        bake_weights: build the twin with the weights as constants (the controller's fast path:
            no gradients). The problem is rebuilt whenever the weights change.
        backend: ``"threads"`` (``options.workers`` threads of this process) or ``"ray"``
            (``options.workers`` Ray actors, :mod:`qmpc.distributed`). The results are the same.

    Every solve follows the network's current values, however they were changed (an optimiser
    step, a Polyak update through ``.data``, ``load_state_dict``, a new input normalisation):
    they are compared with a copy, not torch's version counters.
    """

    def __init__(
        self,
        q: QNetwork,
        spec: MPCSpec,
        options: SolverOptions,
        bake_weights: bool = False,
        backend: Literal["threads", "ray"] = "threads",
    ):
        if backend not in ("threads", "ray"):
            raise InputError(f"expected backend in ('threads', 'ray'), got {backend!r}")
        if backend == "ray" and options.max_wall_ms:
            raise InputError("expected backend='threads' with a wall-time limit (max_wall_ms), got backend='ray'")
        self.q, self.spec, self.options = q, spec, options
        self.bake_weights, self.backend = bool(bake_weights), backend
        self.workers = options.worker_count
        self.lock = threading.RLock()
        self._runner = None
        self._params = tuple(q.parameters())
        self._shapes = tuple(p.shape for p in self._params)  # the structure the twin is built for
        self._synced: tuple[torch.Tensor, tuple[torch.Tensor, ...], ca.DM | None] | None = None
        self.version = 0
        """How many times :meth:`sync` found the network's values changed (what a caller that keeps
        solutions between solves compares to know they are still of this network)."""
        self._names = ([n for n, _ in q.named_parameters()], [n for n, _ in q.named_buffers()])
        sizes = [int(np.prod(shape)) for shape in self._shapes]
        self._offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        self.sync()  # builds the problem and its solver
        self.model_params = np.zeros(self.problem.n_theta - self.problem.n_theta_q)
        """``(N · n_p,)`` parameters of a time-varying model, set before each solve."""

    # -- following the network ------------------------------------------------------------
    @property
    def params(self) -> tuple[torch.Tensor, ...]:
        """The network's parameters as of the last :meth:`sync`."""
        return self._params

    @property
    def newton_path(self) -> bool:
        """Horizon 1, weights as a parameter, a network with closed-form derivatives in ``u`` and a
        vectorised twin (PICNN), and ``SolverOptions.newton``: solve by the batched Newton."""
        return bool(
            self.options.newton
            and self.spec.horizon == 1
            and not self.bake_weights
            and getattr(self.q, "vectorized_twin", False)
            and hasattr(self.q, "action_oracle")
        )

    def _build(self) -> None:
        """The problem and its solver, from the network's twin as it is now (its buffers are
        constants of the twin; with ``bake_weights`` its weights too). A Ray backend's actors
        rebuild theirs from the network's ``state_dict``."""
        newton = self.newton_path
        self.problem = ControlProblem.of_network(self.q, self.spec, self.bake_weights, newton)
        # the network's structure for torch.func.functional_call, which swaps a module's tensors
        # while it runs: never the user's module, which another thread may be using meanwhile
        # (the backward's; with baked weights there is none)
        self.functional_q = None if self.bake_weights else copy.deepcopy(self.q).requires_grad_(False)
        self.compiled_greedy: GreedyNewton | None = None
        """Horizon 1 with baked weights and a network with a compiled form (a PICNN): its argmin for
        one state at a time, compiled (:class:`~qmpc.compiled.GreedyNewton`; the controller's greedy
        actions), with the weights of this build."""
        if self.bake_weights and self.spec.horizon == 1 and hasattr(self.q, "numpy_derivatives"):
            layout = pack_of(self.q.numpy_derivatives(), "picnn")
            if layout is not None:
                o = self.options
                self.compiled_greedy = GreedyNewton(layout, self.spec.low, self.spec.high, o.tol, o.max_iter)
        self._certifier = self._new_certifier() if newton else None
        runner = None
        if self.backend == "ray":
            if self._runner is None:
                from qmpc.distributed import RayRunner

                self._runner = RayRunner(self.workers, self.q, self.spec, self.options, self.bake_weights, newton)
            else:
                self._runner.rebuild(self.q)
            runner = self._runner
        self.solver = BatchedSolver(self.problem, self.options, runner)

    def _new_certifier(self) -> nn.Module:
        """The certificate's network: a private copy of the network on the CPU in float64 (its
        buffers as they are now: a change of them rebuilds), its parameters views of
        :attr:`_certifier_theta`, which each sync overwrites (no ``functional_call`` per solve,
        which swapped every tensor in and out: ~0.6 ms at batch 1)."""
        q = copy.deepcopy(self.q).to(device="cpu", dtype=torch.float64).requires_grad_(False)
        self._certifier_theta = torch.zeros(int(self._offsets[-1]), dtype=torch.float64)
        for i, (name, shape) in enumerate(zip(self._names[0], self._shapes, strict=True)):
            view = self._certifier_theta[self._offsets[i] : self._offsets[i + 1]].view(shape)
            module, _, attr = name.rpartition(".")
            setattr(q.get_submodule(module), attr, nn.Parameter(view, requires_grad=False))
        return q

    def _read_weights(self) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """The network's parameters and buffers, re-read in one walk over its modules (a replaced
        Parameter or submodule is picked up), with the shapes the planner was built for."""
        params: list[torch.Tensor] = []
        buffers: list[torch.Tensor] = []
        seen: set[int] = set()  # a tensor shared by two modules counts once, as in q.parameters()
        for m in self.q.modules():  # each module's own tensors, from its dicts (its generators cost more)
            for own, out in ((m._parameters, params), (m._buffers, buffers)):
                for t in own.values():
                    if t is not None and id(t) not in seen:
                        seen.add(id(t))
                        out.append(t)
        shapes = tuple(p.shape for p in params)
        if shapes != self._shapes:
            raise InputError(
                f"expected the parameter shapes the layer was built for, {[tuple(s) for s in self._shapes]}, "
                f"got {[tuple(s) for s in shapes]}"
            )
        return tuple(params), tuple(buffers)

    def sync(self) -> None:
        """Follow every change of the network's values. On a change: the weights as float64
        numpy (:attr:`theta64`, by name :attr:`weights64`; the DM is converted when needed), the
        problem rebuilt if the buffers (or baked weights) changed. Raises on NaN/Inf weights or
        buffers."""
        params, buffers = self._read_weights()
        self._params = params
        last = self._synced
        with torch.no_grad():  # float64 holds every float32 exactly: equal here iff equal there
            theta_t = torch.cat([p.detach().reshape(-1) for p in params]).to("cpu", torch.float64)
        same_buffers = last is not None and _same(buffers, last[1])
        if same_buffers and torch.equal(theta_t, last[0]):
            return
        theta = theta_t.numpy()
        with torch.no_grad():
            bufs = [b.detach().to("cpu", torch.float64).numpy() for b in buffers]
        if not (np.isfinite(theta).all() and all(np.isfinite(b).all() for b in bufs)):
            self._check_finite()  # names the tensor
        if self.bake_weights or not same_buffers:
            self._build()
        self._synced = (theta_t, tuple(b.detach().clone() for b in buffers), None)
        self.version += 1
        self.theta64 = np.zeros(0) if self.bake_weights else theta
        self.weights64 = self._named_arrays(theta, bufs)
        if self._certifier is not None:
            self._certifier_theta.numpy()[:] = theta

    def _theta_dm(self) -> ca.DM:
        """The synced weights as a CasADi DM, converted once per change (~2 ms for 25k weights)."""
        if self._synced[2] is None:
            self._synced = (*self._synced[:2], ca.DM(self.theta64))
        return self._synced[2]

    def _named_arrays(self, theta: np.ndarray, buffers: list[np.ndarray]) -> dict[str, np.ndarray]:
        """float64 arrays by ``state_dict`` name: views into ``theta``, and the buffers."""
        off = self._offsets
        out = {
            name: theta[off[i] : off[i + 1]].reshape(shape)
            for i, (name, shape) in enumerate(zip(self._names[0], self._shapes, strict=True))
        }
        out.update(zip(self._names[1], buffers, strict=True))
        return out

    def _check_finite(self) -> None:
        for kind, named in (("weights", self.q.named_parameters()), ("buffers", self.q.named_buffers())):
            for name, t in named:
                if not torch.isfinite(t).all():
                    raise InputError(f"expected finite network {kind}, got NaN/Inf in {name!r}")

    # -- solving ----------------------------------------------------------------------------
    def problem_theta(self, batch: int = 0) -> ca.DM | np.ndarray:
        """The problem's parameter vector after a :meth:`sync`: the network's weights (none when
        baked), then :attr:`model_params`. For the batched Newton, a numpy vector: the solver
        converts it to a DM only if a sample falls back to the plugin."""
        if self.newton_batch(batch):
            return self.theta64
        theta = self._theta_dm()
        if self.model_params.size:
            p = np.asarray(self.model_params, dtype=np.float64)
            if p.shape != (self.problem.n_theta - self.problem.n_theta_q,) or not np.isfinite(p).all():
                raise InputError(f"expected finite model_params of shape {self.model_params.shape}, got {p.shape}")
            theta = ca.vertcat(theta, ca.DM(p))
        return theta

    def newton_batch(self, batch: int) -> bool:
        """Whether a batch goes to the batched Newton: wherever it applies, whatever its size (a
        state gets the same argmin alone and in a batch, see :data:`NEWTON_MIN_WEIGHTS`)."""
        return batch > 0 and self.problem.batched

    def solve(
        self,
        x64: np.ndarray,
        w0: np.ndarray | None = None,
        lam_x0: np.ndarray | None = None,
        lam_g0: np.ndarray | None = None,
        values_only: bool = False,
        started: float | None = None,
        bounds: tuple[np.ndarray, np.ndarray] | None = None,
        sync: bool = True,
    ) -> tuple[SolveResult, ca.DM | np.ndarray]:
        """Solve for every row of ``x64 (B, nx)`` (float64, validated by the caller) from the
        optional warm start ``w0 (B, n_w)`` (and multipliers); returns the result and the
        parameter vector it was solved with. ``values_only``: no sensitivities will be asked of
        this solve (the batched Newton may stop at a looser residual, :data:`NEWTON_VALUE_TOL`).
        ``started``: where the wall-time limit counts from (see :meth:`BatchedSolver.solve`).
        ``bounds``: ``(lbw, ubw)``, each ``(n_w,)``, inside the problem's own (a trust region;
        validated by the caller). ``sync=False``: the caller has called :meth:`sync` since the
        network last changed (a controller's solves within one step: each sync walks the network's
        modules and compares every weight, ~0.2 ms). Call with :attr:`lock` held when the result's
        sensitivities follow."""
        with self.lock:
            if sync:
                self.sync()
            theta = self.problem_theta(x64.shape[0])
            fast = {}
            if self.newton_batch(x64.shape[0]):  # the closed form solves, the network checks it
                with single_blas_thread():  # small GEMMs: a second BLAS thread only costs (as in the solver)
                    oracle = self.q.action_oracle(x64, self.weights64)
                fast = {"oracle": oracle, "certificate": self._certificate(x64)}
                if values_only:  # values only (a TD target): the certificate's threshold decides
                    fast["newton_tol"] = max(self.options.tol, NEWTON_VALUE_TOL * self.options.kkt_tol)
            lbw, ubw = (self.problem.lbw, self.problem.ubw) if bounds is None else bounds
            res = self.solver.solve(x64, theta, lbw, ubw, w0, lam_x0, lam_g0, started=started, **fast)
            return res, theta

    def action_hessian(self, x64: np.ndarray) -> Callable[[np.ndarray], np.ndarray] | None:
        """``u (B, nu) -> ∇²_u Q(x, u) (B, nu, nu)`` at the states ``x64 (B, nx)`` in closed form (the
        network's action oracle), with the weights as synced now (those of the latest solve); None
        off the batched Newton's path (a horizon above 1, baked weights, a network without an
        oracle): the implicit gradient then takes CasADi's Hessians."""
        if not self.newton_batch(x64.shape[0]):
            return None
        q, weights = self.q, self.weights64
        return lambda u: q.action_oracle(x64, weights).derivatives(u)[2]

    def _certificate(self, x64: np.ndarray):
        """``u -> (Q(x, u), ∂Q/∂u)`` by the torch network itself in float64 on the CPU, with the
        weights of the solve: the independent evaluation that checks the batched Newton's closed
        form (:meth:`~qmpc.solver.BatchedSolver._certify`; measured on a HalfCheetah-sized batch of
        256: ~2 ms; the vectorised CasADi twin took ~33 ms)."""
        q, x = self._certifier, torch.from_numpy(x64)

        def value_grad(u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            ut = torch.from_numpy(u).requires_grad_(True)
            with torch.enable_grad():
                qv = q(x, ut)
                (g,) = torch.autograd.grad(qv.sum(), ut)
            return qv.detach().numpy(), g.numpy()

        return value_grad

    def plan(self, w: np.ndarray, x0: np.ndarray) -> dict[str, np.ndarray]:
        """Solutions ``w (B, n_w)`` of states ``x0 (B, nx)`` as ``actions (B, H, nu)`` and
        ``states (B, H − 1, nx)`` (:func:`split_plan`)."""
        with self.lock:
            return split_plan(self.problem, w, x0, self.problem_theta())

    def close(self) -> None:
        """Release the Ray actors' copies of this problem (nothing to do with threads)."""
        if self._runner is not None:
            self._runner.close()


def _same(now: tuple[torch.Tensor, ...], copies: tuple[torch.Tensor, ...]) -> bool:
    """Whether tensors hold the same values as their copies (False on NaN)."""
    return len(now) == len(copies) and all(torch.equal(a, b) for a, b in zip(now, copies, strict=True))
