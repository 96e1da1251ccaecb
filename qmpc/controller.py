"""The controller: ``argmin_u Q(x, u)`` (horizon 1) or an MPC plan with Q as cost-to-go, in
closed loop. It never stalls and never emits an action outside the bounds: a failed solve falls
back to the shifted previous plan, then to a safe default (the bounds' midpoint), and is counted.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import casadi as ca
import numpy as np

from qmpc.boxsqp import FLOOR, convexified
from qmpc.checkpoint import (
    CheckpointError,
    dynamics_from_checkpoint,
    load_checkpoint,
    network_from_checkpoint,
    outcome_from_checkpoint,
    spec_arrays,
)
from qmpc.costs import STAGE_COSTS, stage_cost, stage_cost_derivatives
from qmpc.env import make_env
from qmpc.errors import InputError
from qmpc.linearize import MujocoLinearization
from qmpc.networks import QNetwork
from qmpc.planner import Planner, as_bounds
from qmpc.problem import MPCSpec
from qmpc.solver import SolveResult, SolverOptions, Status, box_qpsol

__all__ = [
    "MODELS",
    "STAGE_COST_SOURCES",
    "TERMINATIONS",
    "BatchController",
    "Controller",
    "model_functions",
    "trained_units",
]

_SPEC_FIELDS = frozenset(f.name for f in dataclasses.fields(MPCSpec)) - {"low", "high"}

MODELS = ("auto", "exact", "learned", "mujoco")
"""Model sources for horizons > 1: ``exact`` (a qmpc task's own model), ``learned`` (the
checkpoint's dynamics model, any task with a stage cost in :mod:`qmpc.costs`), ``mujoco``
(a qmpc task linearised by MuJoCo along the previous plan, :mod:`qmpc.linearize`), ``auto``
(exact where there is one, else learned)."""


STAGE_COST_SOURCES = ("auto", "symbolic", "learned")
"""Stage costs for horizons > 1: ``symbolic`` (:mod:`qmpc.costs`, or a qmpc task's own),
``learned`` (the checkpoint's :class:`~qmpc.dynamics.OutcomeModel`, any task, trained with
``model.learn``), ``auto`` (symbolic where there is one, else learned)."""

TERMINATIONS = ("auto", "learned", "none")
"""Termination in a plan of ``H > 1``: ``learned`` (the checkpoint's learned termination weights
each stage and Q by the probability of still being alive; a checkpoint without the heads is an
error), ``none`` (the plan ignores that an episode ends), ``auto`` (learned where the checkpoint has
the heads, else none)."""


def has_symbolic_cost(env) -> bool:
    """Whether ``env``'s task has a symbolic stage cost (:func:`qmpc.costs.stage_cost`)."""
    spec_id = env.spec.id if env.spec is not None else ""
    return hasattr(env.unwrapped, "casadi_model") or spec_id in STAGE_COSTS


def model_functions(
    ckpt: dict, model: str = "auto", env=None, stage_cost_source: str = "auto", termination: str = "auto"
) -> dict[str, Any]:
    """Controller keywords (``dynamics`` or ``linearization``, ``stage_cost`` and, where the
    checkpoint has learned heads, ``termination``) for a checkpoint's task from the chosen sources.

    The stage cost is symbolic or learned (``stage_cost_source``, see :data:`STAGE_COST_SOURCES`).
    The learned termination probability weights the plan (:attr:`qmpc.problem.MPCSpec.termination`)
    whenever the checkpoint has the learned heads (``termination``, see :data:`TERMINATIONS`), with
    either stage cost: a plan that falls is costly (with a symbolic cost too, e.g.
    InvertedPendulum-v5's constant −1 per step alive). A
    learned cost is in Q's units already (``stage_cost_scaled``: not multiplied by ``cost_scale``
    again)."""
    if model not in MODELS:
        raise InputError(f"expected model in {MODELS}, got {model!r}")
    if stage_cost_source not in STAGE_COST_SOURCES:
        raise InputError(f"expected stage cost in {STAGE_COST_SOURCES}, got {stage_cost_source!r}")
    if termination not in TERMINATIONS:
        raise InputError(f"expected termination in {TERMINATIONS}, got {termination!r}")
    env = env if env is not None else make_env(ckpt["spec"]["env_id"])
    exact = hasattr(env.unwrapped, "casadi_model")
    if model in ("exact", "mujoco") and not exact:
        raise InputError(
            f"expected a qmpc task for --model {model} (e.g. qmpc/PointMass-v0), got {ckpt['spec']['env_id']}: "
            "use --model learned with a checkpoint trained with model.learn = true"
        )
    source = stage_cost_source
    if source == "auto":
        source = "symbolic" if has_symbolic_cost(env) else "learned"
    out: dict[str, Any] = {}
    weighted = termination == "learned" or (termination == "auto" and "outcome" in ckpt)
    if weighted or source == "learned":
        heads = outcome_from_checkpoint(ckpt)  # a clear error where the checkpoint has none
        if weighted:
            out.update(
                termination=heads.termination_function(), termination_derivatives=heads.termination_derivatives()
            )
        if source == "learned":
            out.update(
                stage_cost=heads.cost_function(),
                stage_cost_derivatives=heads.cost_derivatives(),
                stage_cost_scaled=True,
            )
    if model == "mujoco":
        out["linearization"] = MujocoLinearization(env)
    elif model == "exact" or (model == "auto" and exact):
        out["dynamics"], c = env.unwrapped.casadi_model()
        out.setdefault("stage_cost", c)
    else:
        m = dynamics_from_checkpoint(ckpt)
        out["dynamics"], out["dynamics_derivatives"] = m.casadi_function(), m.stage_derivatives()
    if source == "symbolic" and "stage_cost" not in out:
        out["stage_cost"] = stage_cost(env)
        derivatives = stage_cost_derivatives(env)  # where the task's cost has a closed form
        if derivatives is not None:
            out["stage_cost_derivatives"] = derivatives
    return out


def _scaled_derivatives(derivatives, scale: float):
    """Closed-form stage-cost derivatives (:class:`~qmpc.problem.ClosedForms`) multiplied by
    ``scale``, with their compiled cost head's layout scaled too (its ``shift`` and ``scale``)."""

    def out(X, U, Xn, *args, **kw):
        c, g, H = derivatives(X, U, Xn, *args, **kw)
        return scale * c, scale * g, None if H is None else scale * H

    pack = getattr(derivatives, "compiled", None)
    if pack is not None and pack[0] == "cost_head":
        out.compiled = ("cost_head", {**pack[1], "floats": [scale * f for f in pack[1]["floats"]]})
    return out


def trained_units(ckpt: dict) -> dict[str, float]:
    """``{"discount": γ, "cost_scale": s}`` that a checkpoint's Q was trained with (top-level keys
    of the checkpoint, else its saved config; checkpoints with neither: 0.99 and 1.0)."""
    train = ckpt.get("config", {}).get("train", {})
    return {
        "discount": float(ckpt.get("gamma", train.get("gamma", 0.99))),
        "cost_scale": float(ckpt.get("cost_scale", train.get("cost_scale", 1.0))),
    }


def scaled(cost: ca.Function, scale: float) -> ca.Function:
    """A stage cost ``Function`` multiplied by ``scale`` (same inputs and names)."""
    if scale == 1.0:
        return cost
    ins = cost.mx_in()
    return ca.Function(cost.name(), ins, [scale * cost(*ins)], cost.name_in(), cost.name_out())


class Controller:
    """Acts on single observations with warm starts from the previous plan.

    ``Controller(q, spec)`` with an :class:`~qmpc.problem.MPCSpec`, or ``Controller(q, low, high,
    horizon=…, dynamics=…, stage_cost=…, discount=…)`` with the spec's fields as keywords.

    Args:
        q: the cost-to-go network.
        low: an :class:`~qmpc.problem.MPCSpec`, or the lower action bounds ``(act_dim,)``.
        high: the upper action bounds (with ``low`` as bounds).
        cost_scale: stage costs are multiplied by this before they are added to Q: the units Q
            was trained in (``train.cost_scale``: Q learned ``c = −reward × cost_scale``; 0.1 in
            the balancing and HalfCheetah launch files). ``from_checkpoint`` takes it from the
            checkpoint, and the ``discount`` (which must be the ``γ`` Q was trained with) too.
        env_id: the task the network was trained on (checked against observations' size only).
        budget_ms: wall-time budget of one control step in milliseconds (0: none). The solver is
            stopped between iterations when it runs out (retries included); a step that overruns
            falls back to the shifted previous plan and is counted in ``stats["overrun"]``.
        linearization: a :class:`~qmpc.linearize.MujocoLinearization` to use instead of
            ``dynamics``: the model is MuJoCo's linearisation along the previous plan, renewed at
            every step.
        trust_region: 0 (default): none. ``ρ > 0`` (a plan of ``H > 1``, single shooting, finite
            action bounds): every action of the plan stays within ``ρ · (high − low)`` of the
            greedy plan of this step (the argmin of Q at the state and at each state the model
            predicts under the greedy actions before it; from an episode's second step on, the
            previous step's carried forward with its first and last actions solved anew: see
            :meth:`_greedy_start`), so the plan cannot steer to states where Q was never trained
            and is wrong; the plan starts from the shifted previous plan clipped into the region
            (the greedy plan at an episode's start); a plan that fails falls back to the greedy
            action. ``ρ ≥ 1`` bounds nothing (the free plan, at the cost of the greedy plan's
            solves).
        carry_greedy: with a trust region, carry the greedy plan from step to step (two greedy
            solves a step; see :meth:`_greedy_start`); False: the whole greedy plan every step
            (``H`` solves). Training's plan actor passes False: the carried plan is state its
            checkpoints do not hold, and its launch files were measured so.
        **options: the :class:`~qmpc.problem.MPCSpec` fields when ``low`` is not a spec
            (``horizon`` 1 by default, ``dynamics``, ``stage_cost``, ``discount`` 0.99 by default,
            ``shooting``, ``dynamics_derivatives``), and :class:`~qmpc.solver.SolverOptions`
            fields (``solver`` names the plugin):

            * ``max_iter`` (default 50): iteration budget of each solve;
            * ``tol``: the solver's own tolerance; default 1e-8 for horizon 1 and 1e-6 for longer
              horizons (an SQP iteration at H = 10 costs ~3 ms at HalfCheetah size and the last one
              only moves the plan by ~1e-6; measured: 3.1 → 2.6 iterations per step). A solution
              is accepted by the same certificate either way (``kkt_tol``, 1e-6);
            * ``qpsol``: the QP solver of ``sqpmethod``; default :func:`~qmpc.solver.box_qpsol`
              (DAQP) for the greedy solves (horizon 1, and a plan's greedy start), qrqp for plans;
            * ``retry`` (default True): retry a failed solve cold with the other plugin before
              falling back to the shifted plan. Measured on the shipped InvertedPendulum-v5
              controller over 10 episodes: with the retry 1000 ± 0 and no fallback (p99 ≈ 10 ms:
              the retries); without it 78 ± 46 (3–30 fallbacks per episode). Turn it off only for a
              hard latency budget;
            * ``shooting`` ``auto`` (default): single when ``dynamics_derivatives`` is given or the
              plan has more than 64 state entries (``(H − 1) · nx``), else multiple. Measured p50
              per step at H = 10 (``benchmarks/bench_controller.py``): HalfCheetah-v5 with a learned
              64×64 model 9.4 ms single vs 32 ms multiple; a linear model of its size 12 vs 32 ms;
              a linear model of InvertedPendulum-v5's size 1.6 vs 0.8 ms.
    """

    def __init__(
        self,
        q: QNetwork,
        low: MPCSpec | np.ndarray,
        high: np.ndarray | None = None,
        *,
        cost_scale: float = 1.0,
        env_id: str = "",
        budget_ms: float = 0.0,
        linearization: MujocoLinearization | None = None,
        stage_cost_scaled: bool = False,
        trust_region: float = 0.0,
        carry_greedy: bool = True,
        **options: Any,
    ):
        self.stage_cost_scaled = bool(stage_cost_scaled)
        if not (isinstance(cost_scale, int | float) and np.isfinite(cost_scale) and cost_scale > 0):
            raise InputError(f"expected a finite cost_scale > 0, got {cost_scale!r}")
        self.cost_scale = float(cost_scale)
        self.q = q  # not converted: the planner reads its values as float64 whenever they change
        self.linearization = linearization
        self.env_id = env_id
        spec = self._spec(q, low, high, options)
        options.setdefault("max_iter", 50)
        options.setdefault("tol", 1e-8 if spec.horizon == 1 else 1e-6)
        box_qp = options.get("qpsol") or box_qpsol()  # the greedy solves' (bounds only)
        if spec.horizon == 1:
            options["qpsol"] = box_qp
        try:
            opts = SolverOptions(plugin=options.pop("solver", "sqpmethod"), workers=1, max_wall_ms=budget_ms, **options)
        except TypeError as e:
            raise InputError(f"unknown solver option: {e}") from None
        self.planner = Planner(q, spec, opts, bake_weights=True)
        self.budget_ms = float(budget_ms)
        self.low, self.high = spec.low, spec.high
        self.safe_action = safe_action(self.low, self.high)
        self._greedy: Planner | None = None  # horizon 1: the start of a plan (built here: not in a step)
        self._greedy_seen = self.planner.version  # the planner's version the greedy planner last synced at
        if spec.horizon > 1 and spec.shooting == "single" and linearization is None:
            opts = dataclasses.replace(self.planner.options, max_wall_ms=0.0, tol=1e-8, qpsol=box_qp)
            self._greedy = Planner(q, MPCSpec(self.low, self.high), opts, bake_weights=True)
        self.trust_region = self._check_trust_region(trust_region, spec)
        self.carry_greedy = bool(carry_greedy)
        self._warm_up_compiled()
        if self.budget_ms and spec.horizon > 1:
            self._check_budget()
        self.last_result: SolveResult | None = None
        """The latest step's solve (``w`` is the whole plan)."""
        self._last_x: np.ndarray | None = None
        self.reset()

    def _spec(self, q: QNetwork, low, high, options: dict) -> MPCSpec:
        """The controller's :class:`MPCSpec` (its stage cost in Q's units); takes the spec's fields
        out of ``options``."""
        fields = {k: options.pop(k) for k in list(options) if k in _SPEC_FIELDS}
        shooting = fields.pop("shooting", "auto")
        if isinstance(low, MPCSpec):
            if high is not None or fields or shooting != "auto":
                raise InputError(f"expected an MPCSpec alone, got high and/or {sorted(fields)} with it")
            spec, shooting = low, low.shooting
        else:
            if high is None:
                raise InputError("expected low and high (or an MPCSpec), got no high")
            fields.setdefault("discount", 0.99)
            if self.linearization is not None:
                fields["dynamics"] = self.linearization.dynamics
                fields["dynamics_params"] = self.linearization.n_p if fields.get("horizon", 1) > 1 else 0
            spec = MPCSpec(as_bounds(low, q.act_dim, "low"), as_bounds(high, q.act_dim, "high"), **fields)
        if shooting == "auto":
            big = (spec.horizon - 1) * q.obs_dim > 64
            shooting = "single" if spec.dynamics_derivatives is not None or big else "multiple"
        changes: dict[str, Any] = {"shooting": shooting}
        if spec.stage_cost is not None and self.cost_scale != 1.0 and not self.stage_cost_scaled:
            changes["stage_cost"] = scaled(spec.stage_cost, self.cost_scale)
            if spec.stage_cost_derivatives is not None:
                changes["stage_cost_derivatives"] = _scaled_derivatives(spec.stage_cost_derivatives, self.cost_scale)
        return spec.replace(**changes)

    def _check_trust_region(self, rho: Any, spec: MPCSpec) -> float:
        """``rho`` as a float, or an :class:`InputError` naming why this controller cannot have it."""
        if isinstance(rho, bool) or not isinstance(rho, int | float) or not np.isfinite(rho) or rho < 0:
            raise InputError(f"expected a finite trust_region >= 0 (a fraction of the action range), got {rho!r}")
        if rho and self._greedy is None:
            raise InputError(
                f"expected a plan of horizon > 1 with single shooting and a learned or given model for a trust region, "
                f"got horizon {spec.horizon}, {spec.shooting} shooting"
                + (", a linearisation" if self.linearization is not None else "")
                + " (qmpc run --trust-region 0 plans without one)"
            )
        if rho and not (np.isfinite(self.low).all() and np.isfinite(self.high).all()):
            raise InputError(f"expected finite action bounds for a trust region, got low {self.low}, high {self.high}")
        return float(rho)

    def _trust_bounds(self, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(lbw, ubw)`` of the plan, each ``(n_w,)``: the problem's bounds tightened to within
        :attr:`trust_region` of the greedy plan ``ref (n_w,)``."""
        P = self.planner.problem
        half = np.tile(self.trust_region * (self.high - self.low), P.N + 1)
        return np.maximum(P.lbw, ref - half), np.minimum(P.ubw, ref + half)

    def _check_budget(self) -> None:
        """Refuse a plan whose solver's indivisible unit of work does not fit the budget: one
        evaluation of the plan's derivatives and Hessian (single shooting: with the
        eigen-decomposition that convexifies it; multiple shooting: the Lagrangian's Hessian and
        the constraints' Jacobian, a lower bound of one sqpmethod iteration), the fastest of three
        at a zero state. The deadline is checked between such units, never inside one: measured
        on ``models/inverted_pendulum.pt`` with a learned model, one unit takes ~50 ms at H = 500
        and the first step of such a plan ran 2.1 s against a 40 ms budget."""
        P, solver = self.planner.problem, self.planner.solver
        x0, theta = np.zeros((1, P.nx)), self.planner.problem_theta()
        w = np.clip(np.zeros((1, P.n_w)), P.lbw, P.ubw)
        times = []
        for _ in range(4):  # the first one warms up
            t = time.perf_counter()
            if P.shooting == "single":
                H = solver.plan_derivatives(w, x0, theta)[2]
                convexified(np.where(np.isfinite(H), H, 0.0), FLOOR)
            else:
                solver.second_order(w, x0, theta, np.zeros((1, P.n_g)))
            times.append((time.perf_counter() - t) * 1e3)
        ms = min(times[1:])
        if ms > self.budget_ms:
            raise InputError(
                f"expected a plan whose solver can take a step within the budget of {self.budget_ms:g} ms, got "
                f"horizon {P.horizon} ({P.shooting} shooting), where one evaluation of the plan's derivatives "
                f"takes {ms:.1f} ms here; use a shorter horizon, or no budget (budget_ms=0, qmpc run --budget-ms 0)"
            )

    def _warm_up_compiled(self) -> None:
        """Compile the compiled plan's and greedy solver's kernels (:mod:`qmpc.compiled`) now, not in
        the first control step: 89 s the first time on the benchmark machine, then loaded from
        numba's cache in about a second."""
        P = self.planner.problem
        cp = P.compiled_plan
        if cp is not None:  # each entry point (a QP the compiled SQP leaves calls them from Python)
            x, w = np.zeros(P.nx), np.clip(np.zeros(P.n_w), P.lbw, P.ubw)
            cp.solve(x, w, P.lbw, P.ubw, tol=0.0, max_iter=1)
            cp.value(w, x), cp.first_order(w, x), cp.derivatives(w, x)
        if self._greedy is not None and self._greedy.compiled_greedy is not None:
            self._greedy.compiled_greedy.solve(np.zeros(P.nx))

    def _greedy_start(self, x: np.ndarray, deadline: float = np.inf, carry: bool = False) -> np.ndarray:
        """``(1, n_w)``: the greedy plan of this step: the greedy action ``argmin_u Q(x_k, u)`` at
        ``x`` and at each state the model predicts under the actions before it (the start of a plan
        with no previous one, and the trust region's centre). Measured on ``models/half_cheetah.pt``
        at H = 5: from zero actions one of ten closed-loop states needed 57 SQP iterations.

        ``carry`` (the trust region's centre from an episode's second step on): the previous step's
        greedy plan shifted by one step, its first action solved anew at ``x`` and its last at the
        state the model predicts under the others, each warm-started from the shifted action: two
        solves at any horizon instead of H. The middle actions are then greedy at the states the
        previous step predicted (one step older predictions). Measured on the three Hopper-v5
        100k checkpoints within ρ = 0.1, 5 episodes each from seed 100: returns 913 against 895
        with the whole greedy plan at H = 3, 851 against 779 at H = 5; ``models/hopper.pt``'s step
        p50 at H = 5 13.4 → 10.1 ms (``docs/benchmarks.md``, round 6). A network that changed
        since (training between steps) gets the full greedy plan. Past ``deadline`` (a
        ``time.perf_counter()``) no solve starts: the remaining actions are the carried ones, else
        the last greedy action."""
        P, theta = self.planner.problem, self.planner.problem_theta()
        if self._greedy_seen != self.planner.version:  # the network changed (act synced the planner first)
            with self._greedy.lock:  # once for the solves of this step
                self._greedy.sync()
            self._greedy_seen = self.planner.version
        prev = self._ref if carry and self._ref is not None and self._ref[0] == self._greedy.version else None
        acts = None
        if prev is not None:
            old = prev[1].reshape(P.N + 1, P.nu)
            acts = np.concatenate([old[1:], old[-1:]])
        w, xk, u = np.zeros(P.n_w), x, self.safe_action
        for k in range(P.N + 1):
            live = np.isfinite(xk).all()
            if acts is not None and 0 < k < P.N:
                u = acts[k]
            elif live and time.perf_counter() <= deadline:
                u = self._greedy_action(xk, None if acts is None else acts[k])
            else:  # past the deadline, or a predicted state that is not finite: no solve
                live = False
                u = u if acts is None else acts[k]
            if live and k < P.N:
                xk = P.model_step(xk, u, k, theta)
            w[P.u_slice(k)] = u
        self._ref = (self._greedy.version, w.copy())
        return w[None]

    def _greedy_action(self, x: np.ndarray, warm: np.ndarray | None) -> np.ndarray:
        """``(nu,)``: ``argmin_u Q(x, u)`` within the bounds from the optional warm start ``warm
        (nu,)``; the safe action if the solve fails. Compiled where the network has a compiled form
        (:attr:`~qmpc.planner.Planner.compiled_greedy`); CasADi's solver where that one does not converge."""
        fast = self._greedy.compiled_greedy
        if fast is not None:
            u, converged = fast.solve(x, warm)
            if converged:
                return np.clip(u, self.low, self.high)
        res, _ = self._greedy.solve(x[None], None if warm is None else warm[None], values_only=True, sync=False)
        return np.clip(res.w[0], self.low, self.high) if Status.ok(res.status)[0] else self.safe_action

    @property
    def problem(self):
        """The planner's current :class:`~qmpc.problem.ControlProblem`."""
        return self.planner.problem

    def plan(self) -> dict[str, np.ndarray]:
        """The latest step's plan: ``actions (1, H, nu)`` and ``states (1, H − 1, nx)``."""
        if self.last_result is None:
            raise InputError("expected a step before plan(), got none")
        return self.planner.plan(self.last_result.w, self._last_x)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        horizon: int = 1,
        model: str = "auto",
        stage_cost: str = "auto",
        termination: str = "auto",
        **kw: Any,
    ) -> Controller:
        """Load a checkpoint written by ``qmpc train``. For ``horizon > 1`` the model comes from
        ``model`` (see :data:`MODELS`), the stage cost from ``stage_cost`` (see
        :data:`STAGE_COST_SOURCES`) and the termination from ``termination`` (see
        :data:`TERMINATIONS`; :func:`model_functions`) unless ``dynamics`` and ``stage_cost`` are
        passed in ``kw``."""
        ckpt = load_checkpoint(path)
        return cls.from_policy(ckpt, horizon, model, stage_cost, where=str(path), termination=termination, **kw)

    @classmethod
    def from_policy(
        cls,
        ckpt: dict[str, Any],
        horizon: int = 1,
        model: str = "auto",
        stage_cost: str = "auto",
        env=None,
        where: str = "the checkpoint",
        termination: str = "auto",
        **kw: Any,
    ) -> Controller:
        """:meth:`from_checkpoint` of a checkpoint already in memory (a policy dict of
        :data:`~qmpc.checkpoint.POLICY_KEYS`, e.g. a training run's as it is now); ``env``: an
        environment of its task for the model's sources (default: a new one)."""
        if isinstance(stage_cost, ca.Function):  # a stage cost Function passed as a keyword
            kw["stage_cost"], stage_cost = stage_cost, "auto"
        if isinstance(termination, ca.Function):  # likewise a termination Function (kept: not the heads')
            kw["termination"], termination = termination, "none"
        for name, trained in trained_units(ckpt).items():  # plan in the units Q was trained in
            if name in kw and not np.isclose(kw[name], trained, rtol=1e-12, atol=0.0):
                raise InputError(
                    f"expected {name} = {trained} (what {where} was trained with: its Q is a cost-to-go in those "
                    f"units), got {kw[name]}"
                )
            kw[name] = trained
        if horizon > 1 and "dynamics" not in kw and "linearization" not in kw:
            kw.update(model_functions(ckpt, model, env, stage_cost_source=stage_cost, termination=termination))
        q = network_from_checkpoint(ckpt)
        low, high = spec_arrays(ckpt["spec"])
        return cls(q, low, high, horizon=horizon, env_id=ckpt["spec"]["env_id"], **kw)

    def check_task(self, env_id: str, obs_dim: int, act_dim: int) -> None:
        """Raise if this controller was trained for another task."""
        _check_task(self.q, self.env_id, env_id, obs_dim, act_dim)

    @property
    def warm_plan(self) -> np.ndarray | None:
        """``(n_w,)``: the plan the next step shifts and starts from (None: the next step starts a
        plan afresh, as at an episode's start)."""
        return self._plan

    @warm_plan.setter
    def warm_plan(self, w: np.ndarray | None) -> None:
        n = self.planner.problem.n_w
        if w is not None and np.shape(w) != (n,):
            raise InputError(f"expected a plan of shape ({n},), got {np.shape(w)}")
        self._plan = None if w is None else np.asarray(w, dtype=np.float64).copy()
        self._ref = None  # a plan set from outside: the next step solves the whole greedy plan

    def reset(self) -> None:
        """Forget the previous plan (call at the start of an episode)."""
        self._plan: np.ndarray | None = None
        self._ref: tuple[int, np.ndarray] | None = None  # the greedy plan (the network's version, (n_w,))
        self.stats = {"steps": 0, "failed": 0, "overrun": 0, "fallback": 0}

    def act(self, obs) -> tuple[np.ndarray, dict[str, Any]]:
        """Action for one observation ``(obs_dim,)``; ``info`` has ``solve_ms``, ``status``,
        ``fallback`` and ``value`` (the predicted cost-to-go)."""
        try:
            x = np.asarray(obs)
            if x.dtype.kind not in "biuf":  # strings (numpy would parse "1.5"), objects
                raise TypeError(f"dtype {x.dtype}")
            x = x.astype(np.float64)
        except (TypeError, ValueError) as e:
            raise InputError(
                f"expected a numeric observation of shape ({self.q.obs_dim},), got {_brief(obs)} ({e})"
            ) from None
        if x.shape != (self.q.obs_dim,):
            raise InputError(f"expected an observation of shape ({self.q.obs_dim},), got {x.shape}")
        if not np.isfinite(x).all():
            raise InputError(f"expected a finite observation, got {x}")
        P = self.planner.problem
        w0 = None
        if self._plan is not None:  # shift the previous plan by one step
            w0 = self._plan.copy()
            acts = w0[: (P.N + 1) * P.nu].reshape(P.N + 1, P.nu)
            acts[:-1] = acts[1:].copy()
            if P.N and P.shooting == "multiple":
                st = w0[(P.N + 1) * P.nu :].reshape(P.N, P.nx)
                st[:-1] = st[1:].copy()
            w0 = np.clip(w0, P.lbw, P.ubw)[None]
        t0 = time.perf_counter()
        with self.planner.lock:  # once a step: the greedy planner follows only where this one found a change
            self.planner.sync()
        bounds = None
        if self.trust_region:  # the greedy plan of this state, and the plan kept near it
            deadline = t0 + 0.5e-3 * self.budget_ms if self.budget_ms else np.inf
            ref = self._greedy_start(x, deadline, carry=self.carry_greedy and self._plan is not None)
            bounds = self._trust_bounds(ref[0])
            w0 = ref if w0 is None else np.clip(w0, *bounds)
        elif w0 is None and self._greedy is not None:
            w0 = self._greedy_start(x, t0 + 0.5e-3 * self.budget_ms if self.budget_ms else np.inf)
        if self.linearization is not None and P.N:  # linearise along the shifted plan (zeros at first)
            nominal = w0[0, : P.N * P.nu] if w0 is not None else np.tile(self.safe_action, P.N)
            self.planner.model_params = self.linearization.params(x, nominal)
        res, _ = self.planner.solve(x[None], w0, values_only=True, started=t0, bounds=bounds, sync=False)
        self.last_result, self._last_x = res, x[None]
        solve_ms = (time.perf_counter() - t0) * 1e3
        status = int(res.status[0])
        self.stats["steps"] += 1
        ok = bool(Status.ok(np.array([status]))[0])
        overrun = bool(self.budget_ms) and (status == Status.TIMEOUT or solve_ms > self.budget_ms)
        failed = not overrun and not ok
        fallback = overrun or failed
        self.stats["overrun"] += overrun
        self.stats["failed"] += failed
        self.stats["fallback"] += fallback
        if fallback:
            action = (ref if self.trust_region else w0)[0, P.u_slice(0)] if w0 is not None else self.safe_action
            if overrun and (ok or status == Status.TIMEOUT):
                # too late to act on, but the best plan there is for this state: the next step
                # warm-starts from it (a solve cut short continues where it stopped)
                self._plan = res.w[0].copy()
            elif w0 is not None:  # the shifted plan is now the plan: the next fallback walks along it
                self._plan = w0[0].copy()
        else:
            action = res.w[0, P.u_slice(0)]
            self._plan = res.w[0].copy()
        action = np.clip(action, self.low, self.high)
        info = {
            "solve_ms": solve_ms,
            "status": status,
            "fallback": fallback,
            "overrun": overrun,
            "value": float(res.value[0]),
        }
        return action, info


def _check_task(q: QNetwork, trained_for: str, env_id: str, obs_dim: int, act_dim: int) -> None:
    """A :class:`CheckpointError` if ``q`` (trained for ``trained_for``, "" unknown) is not for the task."""
    if (obs_dim, act_dim) != (q.obs_dim, q.act_dim) or (trained_for and env_id != trained_for):
        raise CheckpointError(
            f"expected a checkpoint for {env_id} (obs_dim {obs_dim}, act_dim {act_dim}), got one for "
            f"{trained_for or 'an unknown task'} (obs_dim {q.obs_dim}, act_dim {q.act_dim})"
        )


def safe_action(low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """The action of a step with no plan to fall back on: the bounds' midpoint where both are
    finite, else 0, clipped to the bounds."""
    both = np.isfinite(low) & np.isfinite(high)
    return np.clip(0.5 * (np.where(both, low, 0.0) + np.where(both, high, 0.0)), low, high)


class BatchController:
    """The greedy controller (horizon 1) of ``q`` for ``envs`` environments at once: a
    :class:`~qmpc.data.BatchPolicy` for :func:`~qmpc.data.batch_rollouts` (evaluations, datasets).

    One call solves the argmins of all the states it is given in one batch (for a PICNN the
    batched projected Newton on Q's closed form, certified by the network, the plugin for the
    states that fail the certificate: a state's argmin is the same alone and in a batch, and the
    same as :class:`Controller`'s to the solvers' tolerance), each warm-started from its
    environment's previous action. A state whose solve fails acts as :class:`Controller` falls
    back: its environment's previous action (the bounds' midpoint at an episode's first step).
    ``q`` is followed as it changes (each call syncs its weights). ``stats``: ``steps`` and
    ``fallback`` (failed solves), summed over calls.

    Args:
        q: the cost-to-go network.
        low, high: the action bounds ``(act_dim,)``.
        envs: how many environments (the largest slot index + 1 a call may name).
        max_iter, tol: the solver's (:class:`Controller`'s defaults for horizon 1).
        env_id: the task ``q`` was trained for ("" unknown; :meth:`check_task`).
    """

    def __init__(self, q: QNetwork, low, high, envs: int, max_iter: int = 50, tol: float = 1e-8, env_id: str = ""):
        if isinstance(envs, bool) or not isinstance(envs, int) or envs < 1:
            raise InputError(f"expected envs to be an int >= 1, got {envs!r}")
        spec = MPCSpec(as_bounds(low, q.act_dim, "low"), as_bounds(high, q.act_dim, "high"))
        opts = SolverOptions(workers=1, max_iter=max_iter, tol=tol, qpsol=box_qpsol())
        self.planner = Planner(q, spec, opts)  # the weights as a parameter: the batched Newton's path
        self.q, self.low, self.high, self.env_id = q, spec.low, spec.high, env_id
        self.safe_action = safe_action(self.low, self.high)
        self.previous = np.tile(self.safe_action, (envs, 1))
        self.stats = {"steps": 0, "fallback": 0}
        self.last_fallback = np.zeros(0, bool)

    @classmethod
    def from_checkpoint(cls, path: str | Path, envs: int, **kw: Any) -> BatchController:
        """The greedy controller of a checkpoint written by ``qmpc train`` (its network, bounds and
        task; ``kw``: ``max_iter``, ``tol``)."""
        ckpt = load_checkpoint(path)
        low, high = spec_arrays(ckpt["spec"])
        return cls(network_from_checkpoint(ckpt), low, high, envs, env_id=ckpt["spec"]["env_id"], **kw)

    def check_task(self, env_id: str, obs_dim: int, act_dim: int) -> None:
        """Raise if this controller was trained for another task."""
        _check_task(self.q, self.env_id, env_id, obs_dim, act_dim)

    def __call__(self, obs: np.ndarray, slots: np.ndarray, fresh: np.ndarray) -> np.ndarray:
        """Actions ``(n, act_dim)`` for ``obs (n, obs_dim)`` of environments ``slots (n,)``;
        ``fresh (n,)``: the first step of an episode there."""
        x = np.asarray(obs, np.float64)
        if x.ndim != 2 or x.shape[1] != self.q.obs_dim or not np.isfinite(x).all():
            raise InputError(f"expected finite observations of shape (n, {self.q.obs_dim}), got {x.shape}")
        self.previous[slots[fresh]] = self.safe_action
        warm = self.previous[slots]
        res, _ = self.planner.solve(x, warm.copy())  # the solve may write into its start; warm is the fallback
        ok = Status.ok(res.status)
        u = np.clip(np.where(ok[:, None], res.w[:, : self.q.act_dim], warm), self.low, self.high)
        self.previous[slots] = u
        self.last_fallback = ~ok  # (n,): the environments of this call that kept their previous action
        self.stats["steps"] += len(slots)
        self.stats["fallback"] += int((~ok).sum())
        return u


def _brief(obj: Any) -> str:
    """``obj`` in an error message: its repr, cut to one short line."""
    text = " ".join(repr(obj).split())
    return text if len(text) <= 80 else text[:77] + "..."
