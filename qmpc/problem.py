"""The control problem as a CasADi NLP, and the functions its sensitivities need.

For a state ``x0`` and flat network parameters ``theta`` the problem is

    w*(x0, θ) = argmin_w  J(w; x0, θ)   s.t.  lb ≤ w ≤ ub,  g(w; x0) = 0

with ``N = horizon − 1`` model steps:

* ``w = (u_0, …, u_N, x_1, …, x_N)`` — the ``H = N + 1`` actions first, then the predicted
  states;
* ``J = Σ_{k<N} γ^k c(x_k, u_k[, x_{k+1}]) + γ^N Q_θ(x_N, u_N)`` — Q is the cost-to-go of the
  last state–action pair; a stage cost may also read the state after the step (most gymnasium
  rewards are computed after the physics step);
* ``g = (f(x_k, u_k) − x_{k+1})_{k<N}`` — the dynamics.

With a ``termination`` probability ``τ(x_k, u_k, x_{k+1})`` in the spec, stage ``k`` and Q are also
weighted by the probability of still being alive, ``s_0 = 1``, ``s_{k+1} = s_k (1 − τ_k)``:
``J = Σ_k γ^k s_k c_k + γ^N s_N Q(x_N, u_N)``. The stages are then no longer separable, and single
shooting's Hessian is CasADi's own Hessian of ``J`` instead of :class:`_CondensedHessian`.

``horizon=1`` (``N = 0``) is exactly ``min_u Q_θ(x0, u)``: no states, no constraints, the
same code. The optimal value is ``V(x0, θ) = J(w*; x0, θ)``.

``shooting="single"`` eliminates the states: ``w = (u_0, …, u_N)`` only, the states are the
model rolled out from ``x0``, and there are no constraints but the action bounds. Its exact
Hessian is assembled by :class:`_CondensedHessian` (the reduced Hessian ``Tᵀ ∇²L T`` of the
multiple-shooting Lagrangian, ``T = ∂(u, x)/∂u``, with the costates of the rollout as
multipliers) from per-step model derivatives that a :class:`StageDerivatives` provides — in
closed form with numpy for a learned MLP (:meth:`qmpc.dynamics.DynamicsModel.stage_derivatives`),
by CasADi's automatic differentiation otherwise. The QP of each SQP iteration then has
``(N+1)·nu`` variables and bounds only, instead of ``(N+1)·nu + N·nx`` variables and ``N·nx``
equality constraints. It serves the controller; the torch bridge's sensitivities need
``shooting="multiple"``.

This module never imports torch. Every CasADi function is built once, in the constructor.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import casadi as ca
import numpy as np

from qmpc.compiled import CompiledPlan, pack_of
from qmpc.errors import InputError

__all__ = ["SHOOTING", "CasadiStageDerivatives", "ControlProblem", "MPCSpec", "StageDerivatives"]

SHOOTING = ("multiple", "single")
"""How a horizon > 1 treats the predicted states: decision variables tied by equality
constraints (``multiple``), or eliminated through the model (``single``)."""


_HESS_LAG_NAMES = (["x", "p", "lam_f", "lam_g"], ["hess_gamma_x_x"])
"""sqpmethod's / IPOPT's signature of a user Hessian (its inputs are named x, p, lam_f, lam_g)."""


class StageDerivatives(Protocol):
    """Derivatives of the model ``x⁺ = f(x, u[, p])`` at ``K`` points at once, for the single-shooting
    Hessian. Called with ``X (K, nx)``, ``U (K, nu)`` and ``P (K, n_p)`` (``None`` without model
    parameters); returns ``A = ∂f/∂x (K, nx, nx)``, ``B = ∂f/∂u (K, nx, nu)`` and a function that maps
    multipliers ``M (K, nx)`` to ``∇²_{(x,u)} μ_kᵀ f (K, nx+nu, nx+nu)`` at the same points."""

    def __call__(
        self, X: np.ndarray, U: np.ndarray, P: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray, Callable[[np.ndarray], np.ndarray]]: ...


class CasadiStageDerivatives:
    """:class:`StageDerivatives` of any CasADi model by automatic differentiation (one Jacobian and
    one Lagrangian-Hessian function, mapped over the ``K`` points, built once)."""

    def __init__(self, dynamics: ca.Function, K: int, n_p: int = 0):
        nx, nu = dynamics.size1_in(0), dynamics.size1_in(1)
        x, u, mu, p = ca.MX.sym("x", nx), ca.MX.sym("u", nu), ca.MX.sym("mu", nx), ca.MX.sym("p", n_p)
        extra = [p] if n_p else []
        f = dynamics.call([x, u, *extra], True, False)[0]
        z = ca.vertcat(x, u)
        jac = ca.Function("stage_jac", [x, u, p], [ca.densify(ca.jacobian(f, z))])
        hess = ca.Function("stage_hess", [x, u, mu, p], [ca.densify(ca.hessian(ca.dot(mu, f), z)[0])])
        self.nx, self.nu, self.n_p = nx, nu, n_p
        self._jac, self._hess = jac.map(K, "serial"), hess.map(K, "serial")

    def __call__(self, X, U, P):
        K, nx, nz = X.shape[0], self.nx, self.nx + self.nu
        Pt = P.T if P is not None else np.zeros((0, K))
        J = np.asarray(self._jac(X.T, U.T, Pt)).reshape(nx, K, nz).transpose(1, 0, 2)

        def hess(M: np.ndarray) -> np.ndarray:
            return np.asarray(self._hess(X.T, U.T, M.T, Pt)).reshape(nz, K, nz).transpose(1, 0, 2)

        return J[:, :, :nx], J[:, :, nx:], hess


class ClosedForms(NamedTuple):
    """Closed-form numpy derivatives that the single-shooting Hessian uses instead of CasADi's
    automatic differentiation (each must agree with its CasADi function)."""

    q: Callable | None = None
    """``(x, u) -> (q, ∇q, ∇²q)`` of Q at the plan's end (e.g. :meth:`qmpc.networks.PICNN.numpy_derivatives`)."""
    cost: Callable | None = None
    """``(X, U, Xn) (K, ·) -> (c (K,), ∇c (K, n3), ∇²c (K, n3, n3))`` of the stage cost in
    ``(x, u, x⁺)`` (e.g. :meth:`qmpc.dynamics.OutcomeModel.cost_derivatives`)."""
    termination: Callable | None = None
    """The same for the termination probability (:meth:`~qmpc.dynamics.OutcomeModel.termination_derivatives`)."""


class _CondensedHessian(ca.Callback):
    """The exact Hessian of the single-shooting objective ``J(u_0..u_N)``, in numpy.

    Inputs (all small: the network weights never cross into Python): the rolled-out states
    ``X (nx × N+1)``, the actions ``U (nu × N+1)``, the stage costs' gradients ``Gc (n3 × N)`` and
    Hessians ``Hc (n3 × n3·N)`` with respect to ``(x_k, u_k, x_{k+1})`` (discount applied), Q's
    gradient ``gq`` and Hessian ``Hq`` with respect to ``(x_N, u_N)`` (discount applied), the model
    parameters ``P (n_p × N)`` and the objective multiplier ``lam_f``. With the costates
    ``μ_{N−1} = ∂J/∂x_N``, ``μ_{k−1} = ∂J/∂x_k + A_kᵀ μ_k`` and the state sensitivities
    ``S_{k+1} = A_k S_k + B_k E_k`` (``E_k`` picks ``u_k``), the Hessian is
    ``Σ_k T_kᵀ Hc_k T_k + Σ_k F_kᵀ ∇²(μ_kᵀ f) F_k + F_Nᵀ Hq F_N``, ``F_k = [S_k; E_k]``,
    ``T_k = [S_k; E_k; S_{k+1}]``.

    ``survival``: the objective is survival-weighted, ``J = Σ_k s_k V_k + s_N V_N`` with
    ``V_k = γ^k c_k``, ``V_N = γ^N Q`` and ``s_k = Π_{j<k} (1 − p_j)``, ``p_j`` the termination
    probability of stage ``j`` (a function of ``(x_j, u_j, x_{j+1})`` like the cost). Four more
    inputs then carry the stage values ``V (1 × N)``, Q's value ``vq`` (discount applied; unused
    with ``closed.q``), and ``p (1 × N)`` with its gradients ``Gp (n3 × N)`` and Hessians
    ``Hp (n3 × n3·N)``. With ``q_j = 1 − p_j`` and ``Ŕ_k = ∂J/∂q_k`` (the value that stage ``k``'s
    survival multiplies), ``J``'s gradient and Hessian in the states and actions are those of the
    separable objective with stage terms ``s_k V_k + Ŕ_k q_k`` and terminal ``s_N V_N``, plus the
    terms that couple a stage with the survival before it (:meth:`_SurvivalWeights.coupling`), all
    products of the ``q``'s, without division. This replaced CasADi's Hessian of the whole ``J``
    (measured on ``models/walker2d.pt`` at H = 3: 2.4 ms a call)."""

    def __init__(
        self,
        nx: int,
        nu: int,
        N: int,
        n_p: int,
        derivatives: StageDerivatives,
        discount: float,
        closed: ClosedForms | None = None,
        survival: bool = False,
    ):
        ca.Callback.__init__(self)
        self.nx, self.nu, self.N, self.n_p, self.derivatives = nx, nu, N, n_p, derivatives
        self.closed, self.survival = closed or ClosedForms(), survival
        self.weights = float(discount) ** np.arange(N + 1)  # γ^k, k = 0..N
        self.n_w = (N + 1) * nu
        n3 = 2 * nx + nu
        nz = nx + nu
        self._shapes = [(nx, N + 1), (nu, N + 1), (n3, N), (n3, n3 * N), (nz, 1), (nz, nz), (n_p, N), (1, 1)]
        self._names = ["X", "U", "Gc", "Hc", "gq", "Hq", "P", "lam_f"]
        if survival:
            self._shapes += [(1, N), (1, 1), (1, N), (n3, N), (n3, n3 * N)]
            self._names += ["V", "vq", "p", "Gp", "Hp"]
        self._F0 = np.zeros((N + 1, nz, self.n_w))  # F_k = [S_k; E_k] with S_k = 0: E_k picks u_k
        for k in range(N + 1):
            self._F0[k, nx + np.arange(nu), k * nu + np.arange(nu)] = 1.0
        self.construct("condensed_hessian", {})

    def get_n_in(self) -> int:
        return len(self._shapes)

    def get_n_out(self) -> int:
        return 1

    def get_name_in(self, i: int) -> str:
        return self._names[i]

    def get_name_out(self, i: int) -> str:
        return "H"

    def get_sparsity_in(self, i: int) -> ca.Sparsity:
        return ca.Sparsity.dense(*self._shapes[i])

    def get_sparsity_out(self, i: int) -> ca.Sparsity:
        return ca.Sparsity.dense(self.n_w, self.n_w)

    def has_eval_buffer(self) -> bool:
        return True

    def eval_buffer(self, arg, res) -> int:
        # raw column-major buffers: no DM is built or converted (that cost ~0.8 ms a call)
        ins = [
            np.zeros(s) if a is None else np.frombuffer(a, dtype=np.float64).reshape(s, order="F")  # None: empty
            for a, s in zip(arg, self._shapes, strict=True)
        ]
        out = np.frombuffer(res[0], dtype=np.float64).reshape(self.n_w, self.n_w, order="F")
        out[:] = self._hessian(*ins)
        return 0

    def _hessian(self, X, U, Gc, Hc, gq, Hq, P, lam_f, *survival) -> np.ndarray:
        nx, nu, N = self.nx, self.nu, self.N
        n3, nz, n_w = 2 * nx + nu, nx + nu, self.n_w
        closed, w = self.closed, self.weights
        V, vq, p, Gp, Hp = survival if survival else (None,) * 5
        vq = vq[0, 0] if survival else 0.0
        if closed.q is not None:  # the closed forms' values and derivatives (the graph passed zeros)
            q, g, Hq = closed.q(X[:, N], U[:, N])
            vq, gq, Hq = w[N] * float(q), w[N] * g[:, None], w[N] * Hq
        Hc = Hc.reshape(n3, N, n3).transpose(1, 0, 2)  # (N, n3, n3)
        stages = (X[:, :N].T, U[:, :N].T, X[:, 1:].T)
        if closed.cost is not None:
            c, g, H = closed.cost(*stages)
            V, Gc, Hc = w[None, :N] * c, (w[:N, None] * g).T, w[:N, None, None] * H
        if survival:  # the separable part of the survival-weighted objective (the class docstring)
            if closed.termination is not None:
                p, Gp, Hp = closed.termination(*stages)
            else:  # the graph's, stage by stage in columns
                p, Gp, Hp = p[0], Gp.T, Hp.reshape(n3, N, n3).transpose(1, 0, 2)
            weighted = _SurvivalWeights(V[0], vq, p, Gp, Hp)
            Gc_raw, gq_raw = Gc, gq
            Gc, Hc, gq, Hq = weighted.separable(Gc, Hc, gq, Hq)
        A, B, hess_f = self.derivatives(X[:, :N].T, U[:, :N].T, P.T if self.n_p else None)
        # costates: mu_k multiplies x_{k+1} = f(x_k, u_k)
        dJdx = np.zeros((N + 1, nx))  # ∂J/∂x_k, k = 1..N (row 0 unused: x_0 is given)
        dJdx[1:] += Gc[nx + nu :].T  # stage k reads x_{k+1}
        dJdx[1:N] += Gc[:nx, 1:].T  # stage k reads x_k
        dJdx[N] += gq[:nx, 0]
        M = np.zeros((N, nx))
        M[N - 1] = dJdx[N]
        for k in range(N - 1, 0, -1):
            M[k - 1] = dJdx[k] + A[k].T @ M[k]
        G = Hc.copy()  # stage k's Hessian in (x_k, u_k, x_{k+1}): the cost's and the model's
        G[:, :nz, :nz] += hess_f(M)
        # state sensitivities S_k = ∂x_k/∂u, stacked with the action selections as F_k = [S_k; E_k]
        F = self._F0.copy()
        for k in range(1, N + 1):
            F[k, :nx] = A[k - 1] @ F[k - 1, :nx]
            F[k, :nx, (k - 1) * nu : k * nu] += B[k - 1]
        T = np.concatenate([F[:N], F[1:, :nx]], axis=1)  # (N, n3, n_w)
        # Σ_k T_kᵀ G_k T_k as one matrix product over the stacked stages
        H = T.reshape(N * n3, n_w).T @ (G @ T).reshape(N * n3, n_w)
        H += F[N].T @ Hq @ F[N]
        if survival:
            H += weighted.coupling(T, F[N], Gc_raw, gq_raw)
        return lam_f[0, 0] * 0.5 * (H + H.T)


class _SurvivalWeights:
    """The survival weights of one plan, for :class:`_CondensedHessian`: from the discounted stage
    values ``V (N,)``, Q's ``vq``, the termination probabilities ``p (N,)`` and their gradients
    ``Gp (N, n3)`` and Hessians ``Hp (N, n3, n3)`` in ``(x_k, u_k, x_{k+1})``.

    With ``q_j = 1 − p_j`` and ``s_i = Π_{j<i} q_j``, every weight is a product of the ``q``'s
    (no division: a step certain to terminate, ``q_j = 0``, is exact too, whatever ``∇p_j``
    there): ``E[j, i] = ∂s_i/∂q_j = Π_{l<i, l≠j} q_l`` and ``Ŕ_j = ∂J/∂q_j = Σ_{i>j} V_i E[j, i]``."""

    def __init__(self, V: np.ndarray, vq: float, p: np.ndarray, Gp: np.ndarray, Hp: np.ndarray):
        N = len(V)
        q = 1.0 - p
        self.s = np.concatenate([[1.0], np.cumprod(q)])  # s_i, i = 0..N
        self.values = np.append(V, vq)  # V_0..V_N
        D = np.zeros((N, N + 1))  # D[j, i] = Π_{j<m<i} q_m for j < i
        for j in range(N):
            D[j, j + 1] = 1.0
            for i in range(j + 2, N + 1):
                D[j, i] = D[j, i - 1] * q[i - 1]
        self.E = self.s[:N, None] * D
        self.U = D @ self.values  # U_j = Σ_{i>j} V_i Π_{j<m<i} q_m, so Ŕ_j = s_j U_j
        self.R = self.s[:N] * self.U
        self.Gp, self.Hp = Gp, Hp

    def separable(self, Gc, Hc, gq, Hq):
        """The stage terms ``s_k V_k + Ŕ_k q_k`` and the terminal ``s_N V_N``: the gradients
        ``Gc (n3, N)``, Hessians ``Hc (N, n3, n3)`` and Q's ``gq (nz, 1)``, ``Hq (nz, nz)``."""
        N, s, R = len(self.R), self.s, self.R
        Gc = Gc * s[None, :N] - (R[:, None] * self.Gp).T
        Hc = Hc * s[:N, None, None] - R[:, None, None] * self.Hp
        return Gc, Hc, s[N] * gq, s[N] * Hq

    def coupling(self, T: np.ndarray, FN: np.ndarray, Gc: np.ndarray, gq: np.ndarray) -> np.ndarray:
        """The terms that couple stages, ``(n_w, n_w)``: ``Σ_i (a_i ŝ_iᵀ + ŝ_i a_iᵀ)`` with ``a_i``
        and ``ŝ_i = Σ_{j<i} E[j, i] b_j`` the gradients of ``V_i`` and of ``s_i`` in the actions
        (``b_j`` that of ``q_j``), and ``Σ_{j≠l} C[j, l] b_j b_lᵀ`` with ``C[j, l] = E[j, l] U_l``
        (``j < l``), from the stages' maps to the actions ``T (N, n3, n_w)``, the terminal's
        ``FN (nz, n_w)`` and the unweighted gradients ``Gc (n3, N)``, ``gq (nz, 1)``."""
        a = np.concatenate([np.einsum("kiw,ik->kw", T, Gc), (FN.T @ gq).T])  # ∇V_i in the actions
        b = -np.einsum("kiw,ki->kw", T, self.Gp)  # ∇q_j in the actions
        s_hat = self.E.T @ b  # (N + 1, n_w): ∇s_i
        C = np.triu(self.E[:, :-1] * self.U[None, :], k=1)
        C = C + C.T
        return a.T @ s_hat + s_hat.T @ a + b.T @ C @ b


def _stage_derivatives(f: ca.Function, n3: int, nx: int, nu: int, points: list, weights: np.ndarray) -> list:
    """``[V (1 × N), G (n3 × N), H (n3 × n3·N)]``: a stage function ``f(x, u[, x⁺])``'s weighted
    values, gradients and Hessians in ``(x, u, x⁺)`` at the stages' ``points`` (graph expressions)."""
    z = ca.MX.sym("z3", n3)
    e = f.call([z[:nx], z[nx : nx + nu], z[nx + nu :]][: f.n_in()], True, False)[0]
    h, g = ca.hessian(e, z)
    d = ca.Function(f"{f.name()}_derivatives", [z], [e, ca.densify(g), ca.densify(h)])
    out = [d(pt) for pt in points]
    return [ca.horzcat(*[float(wk) * o[i] for wk, o in zip(weights, out, strict=True)]) for i in range(3)]


def _check_function(f: ca.Function, name: str, n_in: list[tuple[int, int]], n_out: list[tuple[int, int]]) -> None:
    if not isinstance(f, ca.Function):
        raise InputError(f"expected {name} to be a casadi.Function, got {type(f).__name__}")
    if f.n_in() != len(n_in) or f.n_out() != len(n_out):
        raise InputError(
            f"expected {name} to have {len(n_in)} inputs and {len(n_out)} output(s), got {f.n_in()} and {f.n_out()}"
        )
    for i, s in enumerate(n_in):
        if f.size_in(i) != s:
            raise InputError(f"expected input {i} of {name} to have shape {s}, got {f.size_in(i)}")
    for i, s in enumerate(n_out):
        if f.size_out(i) != s:
            raise InputError(f"expected output {i} of {name} to have shape {s}, got {f.size_out(i)}")


@dataclass(frozen=True, eq=False)
class MPCSpec:
    """What one control step solves, apart from Q: the action bounds, the horizon, the model, the
    stage cost and the discount. One frozen description shared by :class:`ControlProblem`, the
    torch layer (:class:`~qmpc.bridge.ArgminLayer`), the controller's planner
    (:class:`~qmpc.planner.Planner`) and the Ray actors (:mod:`qmpc.distributed`).

    ``horizon=1`` (the default) is ``min_u Q(x, u)`` within the bounds: no model, no stage cost.
    """

    low: np.ndarray
    """``(nu,)`` lower action bounds (``−inf`` allowed), float64."""
    high: np.ndarray
    """``(nu,)`` upper action bounds (``+inf`` allowed), float64, ``low ≤ high``."""
    horizon: int = 1
    """Number of actions ``H ≥ 1`` in the plan (``H − 1`` model steps)."""
    dynamics: ca.Function | None = None
    """``Function(x, u[, p]) -> x⁺``; required when ``horizon > 1``."""
    stage_cost: ca.Function | None = None
    """``Function(x, u[, x⁺]) -> c``, a cost (``−reward``, in Q's units); required when ``horizon > 1``."""
    discount: float = 1.0
    """``γ ∈ (0, 1]``: stage ``k`` is weighted by ``γ^k`` and Q by ``γ^(H−1)``."""
    dynamics_params: int = 0
    """``n_p > 0``: a time-varying ``dynamics(x, u, p)`` whose ``(N · n_p,)`` parameters follow the
    network's weights in ``theta`` (no gradient flows to them)."""
    shooting: str = "multiple"
    """``multiple`` (the predicted states are variables) or ``single`` (eliminated; solves only)."""
    dynamics_derivatives: StageDerivatives | None = None
    """Single shooting: closed-form derivatives of ``dynamics`` (default: CasADi's AD)."""
    stage_cost_derivatives: Callable | None = None
    """Single shooting: the stage cost's closed-form derivatives, ``(X, U, Xn) -> (c, ∇c, ∇²c)``
    (see :class:`ClosedForms`; default: CasADi's AD of ``stage_cost``)."""
    termination_derivatives: Callable | None = None
    """Single shooting: the same for ``termination`` (default: CasADi's AD)."""
    termination: ca.Function | None = None
    """``Function(x, u, x⁺) -> p ∈ [0, 1]``, the probability that a step ends the episode (e.g.
    :meth:`qmpc.dynamics.OutcomeModel.termination_function`), or None. With it, stage ``k`` and Q are
    weighted by the probability of still being alive, ``s_0 = 1``, ``s_{k+1} = s_k (1 − p_k)``:
    ``J = Σ_k γ^k s_k c_k + γ^N s_N Q(x_N, u_N)``, so that a plan that falls is costly. Solves only
    (:class:`~qmpc.bridge.ArgminLayer` refuses it with gradients)."""

    def __post_init__(self) -> None:
        for name in ("low", "high"):
            a = np.array(getattr(self, name), dtype=np.float64).reshape(-1)
            if np.isnan(a).any():
                raise InputError(f"expected {name} without NaN, got {a}")
            a.setflags(write=False)
            object.__setattr__(self, name, a)
        if self.low.shape != self.high.shape:
            raise InputError(f"expected low and high of the same shape, got {self.low.shape} and {self.high.shape}")
        for name, a, inf in (("low", self.low, np.inf), ("high", self.high, -np.inf)):
            if (a == inf).any():  # CasADi would fail on it with a page of output
                i = int(np.flatnonzero(a == inf)[0])
                raise InputError(
                    f"expected {name}[{i}] to be finite or {-inf:+}, got {name}[{i}]={a[i]:+} (no action fits)"
                )
        if (self.low > self.high).any():
            i = int(np.flatnonzero(self.low > self.high)[0])
            raise InputError(f"expected low <= high, got low[{i}]={self.low[i]} > high[{i}]={self.high[i]}")
        if self.shooting not in SHOOTING:
            raise InputError(f"expected shooting in {SHOOTING}, got {self.shooting!r}")
        h = self.horizon
        if not isinstance(h, int | np.integer) or isinstance(h, bool) or h < 1:
            raise InputError(f"expected horizon to be an int >= 1, got {h!r}")
        if not (0.0 < float(self.discount) <= 1.0):
            raise InputError(f"expected discount in (0, 1], got {self.discount}")
        n_p = self.dynamics_params
        if not isinstance(n_p, int | np.integer) or isinstance(n_p, bool) or n_p < 0:
            raise InputError(f"expected dynamics_params to be an int >= 0, got {n_p!r}")
        if h > 1 and (self.dynamics is None or self.stage_cost is None):
            raise InputError(f"expected dynamics and stage_cost for horizon={h} > 1, got None")

    @property
    def nu(self) -> int:
        """Action dimension (the bounds' size)."""
        return int(self.low.shape[0])

    def replace(self, **changes) -> MPCSpec:
        """A copy with ``changes`` (validated again)."""
        return dataclasses.replace(self, **changes)


class ControlProblem:
    """The NLP of one control step and its derivative functions, all built once.

    Args:
        q_function: ``Function(x (nx), u (nu), theta (n_theta)) -> q (1)``, the CasADi twin of Q.
        spec: the :class:`MPCSpec` (horizon, model, stage cost, discount, shooting; its bounds
            give :attr:`lbw`, :attr:`ubw`).
        q_derivatives: single shooting: ``(x, u) -> (q, ∇q, ∇²q)`` in numpy, for a ``q_function``
            whose weights are constants (e.g. :meth:`qmpc.networks.PICNN.numpy_derivatives`);
            default: CasADi's Hessian of ``q_function``.
        q_batch: horizon 1: ``B -> Function(x (nx × B), u (nu × B), theta) -> q (1 × B)``, the
            twin for a whole batch as matrix operations (e.g.
            :meth:`qmpc.networks.QNetwork.casadi_batch_function`); gives :meth:`batch_first_order`.

    Attributes:
        nx, nu, n_theta, n_w, n_g: sizes of the state, action, parameters (``n_theta_q`` of the
            network, then ``N · dynamics_params`` of the model), decision vector and equality
            constraints.
        lbw, ubw: ``(n_w,)`` bounds on ``w`` from the spec's action bounds (states are free).
        nlp: the dict handed to ``casadi.nlpsol`` (``p = [x0; theta]``).
        objective: ``(w, x0, theta) -> J``.
        plan_derivatives: single shooting: ``(w, x0, theta) -> (J, ∇J, ∇²J)`` in one call (the batched
            SQP's oracle); ``None`` for multiple shooting.
        hess_lag: single shooting: the condensed exact Hessian in the signature of ``nlpsol``'s
            ``hess_lag`` option; ``None`` for multiple shooting (the plugin differentiates).
        states: ``(w, x0, theta) -> x (N·nx)``: the predicted states ``x_1 … x_N``.
        first_order: ``(w, x0, theta, lam_g) -> (grad_L (n_w), g (n_g))``.
        second_order: ``(w, x0, theta, lam_g) -> (hess_L (n_w × n_w), jac_g (n_g × n_w))``.
        x_adjoint: ``(w, x0, theta, lam_g, a, b, vbar) -> xbar``: the part of ``x̄`` that comes from
            the stage costs and the dynamics (everything but Q): ``vbar · ∂(J_c + λᵀg)/∂x0 −
            ∂(aᵀ ∇_w (J_c + λᵀg) + bᵀ g)/∂x0``. Zero when ``horizon = 1``. Not valid with a
            ``termination`` (Q's survival weight depends on ``x0``): the layer refuses gradients then.
        cold_start: ``(x0, theta) -> w0``: zero actions (clipped later to the bounds) and the
            states of the model rolled out with them.
    """

    def __init__(
        self,
        q_function: ca.Function,
        spec: MPCSpec,
        *,
        q_derivatives: Callable | None = None,
        q_batch: Callable[[int], ca.Function] | None = None,
    ):
        if not isinstance(spec, MPCSpec):
            raise InputError(f"expected spec to be an MPCSpec, got {type(spec).__name__}")
        nx, nu, n_q = q_function.size1_in(0), q_function.size1_in(1), q_function.size1_in(2)
        _check_function(q_function, "q_function", [(nx, 1), (nu, 1), (n_q, 1)], [(1, 1)])
        n_p, N = int(spec.dynamics_params), int(spec.horizon) - 1
        if N > 0:
            _check_function(spec.dynamics, "dynamics", [(nx, 1), (nu, 1), (n_p, 1)][: 3 if n_p else 2], [(nx, 1)])
            c = spec.stage_cost
            n_c = c.n_in() if isinstance(c, ca.Function) else 2
            _check_function(c, "stage_cost", [(nx, 1), (nu, 1), (nx, 1)][: max(2, min(3, n_c))], [(1, 1)])
            if spec.termination is not None:
                _check_function(spec.termination, "termination", [(nx, 1), (nu, 1), (nx, 1)], [(1, 1)])
        if spec.nu != nu:
            raise InputError(f"expected bounds of shape ({nu},) (the network's actions), got {spec.low.shape}")
        self.spec = spec
        self.nx, self.nu, self.n_theta_q, self.dynamics_params, self.N = nx, nu, n_q, n_p, N
        self.n_theta = n_q + N * n_p
        self.horizon = N + 1
        self.discount = float(spec.discount)
        self.shooting = spec.shooting if N else "multiple"  # horizon 1 has no states to eliminate
        single = self.shooting == "single"
        self.n_w = (N + 1) * nu + (0 if single else N * nx)
        self.n_g = 0 if single else N * nx
        self.lbw, self.ubw = self.bounds(spec.low, spec.high)

        w, x0 = ca.MX.sym("w", self.n_w), ca.MX.sym("x0", nx)
        theta, lam_g = ca.MX.sym("theta", self.n_theta), ca.MX.sym("lam_g", self.n_g)
        us, xs, params, J_stage, g, alive = self._graph(w, x0, theta)
        # inlined, not a call node: MX derivatives through a call node cost ~10x more here
        q_term = q_function.call([xs[N], us[N], theta[:n_q]], True, False)[0]
        J = J_stage + self.discount**N * (q_term if alive is None else alive * q_term)
        L = J + ca.dot(lam_g, g) if self.n_g else J

        self.nlp = {"x": w, "p": ca.vertcat(x0, theta), "f": J, "g": g}
        self.objective = ca.Function("objective", [w, x0, theta], [J], ["w", "x0", "theta"], ["f"])
        names = ["w", "x0", "theta", "lam_g"]
        grad_L = ca.gradient(L, w)
        self.first_order = ca.Function("first_order", [w, x0, theta, lam_g], [grad_L, g], names, ["grad_L", "g"])
        self.states = ca.Function(
            "states", [w, x0, theta], [ca.vertcat(*xs[1:]) if N else ca.MX(0, 1)], ["w", "x0", "theta"], ["x"]
        )
        self.hess_lag: ca.Function | None = None
        self.plan_derivatives: ca.Function | None = None
        self.plan_first_order: ca.Function | None = None
        if single:
            self.plan_first_order = ca.Function(
                "plan_first_order", [w, x0, theta], [J, grad_L], ["w", "x0", "theta"], ["f", "g"]
            )
            self.hess_lag = self._condensed_hessian(w, x0, theta, lam_g, us, xs, params, q_function, q_derivatives)
            hess_L = self.hess_lag(w, ca.vertcat(x0, theta), 1.0, lam_g)
            self.plan_derivatives = ca.Function(
                "plan_derivatives",
                [w, x0, theta],
                [J, grad_L, ca.densify(hess_L)],
                ["w", "x0", "theta"],
                ["f", "g", "H"],
            )
        else:
            hess_L = ca.hessian(L, w)[0]
        jac_g = ca.jacobian(g, w) if self.n_g else ca.MX(0, self.n_w)
        self.second_order = ca.Function(
            "second_order", [w, x0, theta, lam_g], [ca.densify(hess_L), ca.densify(jac_g)], names, ["hess_L", "jac_g"]
        )
        # The bridge's sensitivities read Q's state out of w: they need multiple shooting.
        self.x_adjoint = None if single else self._x_adjoint(w, x0, theta, lam_g, J_stage, g)
        self.cold_start = self._cold_start(theta, params)
        self._q_batch = q_batch if N == 0 else None
        self._batch_first_order: dict[int, ca.Function] = {}
        self.compiled_plan = self._compiled_plan(q_derivatives) if single else None
        """A :class:`~qmpc.compiled.CompiledPlan` of ``objective`` and ``plan_derivatives`` for one
        state where every part of the plan has a compiled form (Q's closed form, a learned MLP
        model, learned cost and termination heads, no model parameters) and numba is installed; else None."""

    def _compiled_plan(self, q_derivatives: Callable | None) -> CompiledPlan | None:
        spec = self.spec
        q, model = pack_of(q_derivatives, "picnn"), pack_of(spec.dynamics_derivatives, "mlp")
        cost = pack_of(spec.stage_cost_derivatives, "cost_head")
        term = pack_of(spec.termination_derivatives, "termination_head")
        if self.dynamics_params or None in (q, model, cost) or (spec.termination is not None and term is None):
            return None
        return CompiledPlan(q, model, cost, term if spec.termination is not None else None, self.discount, self.nu)

    def _graph(self, w: ca.MX, x0: ca.MX, theta: ca.MX) -> tuple[list, list, list, ca.MX, ca.MX, ca.MX | None]:
        """``(us, xs, params, J_stage, g, alive)``: the actions and states of the plan in ``w`` (single
        shooting: the states rolled out through the model), each step's model parameters, the
        discounted (and survival-weighted) stage costs, the dynamics constraints and the probability
        ``s_N`` of being alive at ``x_N`` (None without a ``termination``)."""
        nx, nu, N, n_q, n_p = self.nx, self.nu, self.N, self.n_theta_q, self.dynamics_params
        dynamics, stage_cost, single = self.spec.dynamics, self.spec.stage_cost, self.shooting == "single"
        us = [w[k * nu : (k + 1) * nu] for k in range(N + 1)]
        params = [[theta[n_q + k * n_p : n_q + (k + 1) * n_p]] if n_p else [] for k in range(N)]
        if single:  # the states are the model rolled out from x0
            xs = [x0]
            for k in range(N):
                xs.append(dynamics(xs[k], us[k], *params[k]))
        else:
            xs = [x0] + [w[(N + 1) * nu + k * nx : (N + 1) * nu + (k + 1) * nx] for k in range(N)]
        termination = self.spec.termination if N else None
        J_stage = ca.MX(0)
        alive = None if termination is None else ca.MX(1)
        g = []
        for k in range(N):
            c_k = stage_cost(*[xs[k], us[k], xs[k + 1]][: stage_cost.n_in()])
            if alive is None:
                J_stage += self.discount**k * c_k
            else:
                J_stage += self.discount**k * alive * c_k
                alive = alive * (1.0 - termination(xs[k], us[k], xs[k + 1]))
            if not single:
                g.append(dynamics(xs[k], us[k], *params[k]) - xs[k + 1])
        g = ca.vertcat(*g) if g else ca.MX(0, 1)
        return us, xs, params, J_stage, g, alive

    def _condensed_hessian(self, w, x0, theta, lam_g, us, xs, params, q_function, q_derivatives) -> ca.Function:
        """Single shooting: the exact Hessian of ``J(u_0..u_N)`` as ``nlpsol``'s ``hess_lag``. The
        stage cost's, the termination's and Q's derivatives come from their closed forms where the
        spec has them (computed inside the callback), else from CasADi inside this graph."""
        nx, nu, N, n_q, n_p, gamma = self.nx, self.nu, self.N, self.n_theta_q, self.dynamics_params, self.discount
        spec = self.spec
        derivs = spec.dynamics_derivatives or CasadiStageDerivatives(spec.dynamics, N, n_p)
        survival = spec.termination is not None
        closed = ClosedForms(q_derivatives, spec.stage_cost_derivatives, spec.termination_derivatives)
        self._condensed = _CondensedHessian(nx, nu, N, n_p, derivs, gamma, closed, survival)  # kept alive
        n3 = 2 * nx + nu
        stage_points = [ca.vertcat(xs[k], us[k], xs[k + 1]) for k in range(N)]
        zeros = [ca.DM.zeros(1, N), ca.DM.zeros(n3, N), ca.DM.zeros(n3, n3 * N)]
        if closed.cost is None:
            V, Gc, Hc = _stage_derivatives(spec.stage_cost, n3, nx, nu, stage_points, gamma ** np.arange(N))
        else:
            V, Gc, Hc = zeros
        if q_derivatives is None:  # Q's value, gradient and Hessian at (x_N, u_N) by CasADi
            zs = ca.MX.sym("zq", nx + nu)
            q_e = gamma**N * q_function.call([zs[:nx], zs[nx:], theta[:n_q]], True, False)[0]
            q_h, q_g = ca.hessian(q_e, zs)
            q_d = ca.Function("q_derivatives", [zs, theta], [q_e, ca.densify(q_g), ca.densify(q_h)])
            vq, gq, Hq = q_d(ca.vertcat(xs[N], us[N]), theta)
        else:  # computed by the callback
            vq, gq, Hq = 0.0, ca.DM.zeros(nx + nu), ca.DM.zeros(nx + nu, nx + nu)
        extra = []
        if survival:
            if closed.termination is None:
                term = _stage_derivatives(spec.termination, n3, nx, nu, stage_points, np.ones(N))
            else:
                term = zeros
            extra = [V, vq, *term]
        P = ca.horzcat(*[pk[0] for pk in params]) if n_p else ca.MX(0, N)
        lam_f = ca.MX.sym("lam_f")
        H = self._condensed(ca.horzcat(*xs), ca.horzcat(*us), Gc, Hc, gq, Hq, P, lam_f, *extra)
        return ca.Function("hess_lag", [w, ca.vertcat(x0, theta), lam_f, lam_g], [H], *_HESS_LAG_NAMES)

    def _x_adjoint(self, w, x0, theta, lam_g, J_stage, g) -> ca.Function:
        a, b, vbar = ca.MX.sym("a", self.n_w), ca.MX.sym("b", self.n_g), ca.MX.sym("vbar")
        L_c = J_stage + (ca.dot(lam_g, g) if self.n_g else 0)
        phi = vbar * L_c - ca.dot(a, ca.gradient(L_c, w)) - (ca.dot(b, g) if self.n_g else 0)
        return ca.Function(
            "x_adjoint",
            [w, x0, theta, lam_g, a, b, vbar],
            [ca.densify(ca.gradient(phi, x0))],
            ["w", "x0", "theta", "lam_g", "a", "b", "vbar"],
            ["xbar"],
        )

    def _cold_start(self, theta: ca.MX, params: list) -> ca.Function:
        """Zero actions and (multiple shooting) the model rolled out with them."""
        xc = ca.MX.sym("x0", self.nx)
        roll, xk = [], xc
        for k in range(0 if self.shooting == "single" else self.N):
            xk = self.spec.dynamics(xk, ca.DM.zeros(self.nu), *params[k])
            roll.append(xk)
        w0 = ca.vertcat(ca.DM.zeros((self.N + 1) * self.nu), *roll)
        return ca.Function("cold_start", [xc, theta], [w0], ["x0", "theta"], ["w0"])

    @classmethod
    def of_network(cls, q, spec: MPCSpec, bake_weights: bool = False, newton_path: bool = False) -> ControlProblem:
        """The problem of a :class:`~qmpc.networks.QNetwork`'s CasADi twin as it is now (read by
        duck typing: this module never imports torch). ``bake_weights``: the weights are constants
        of the twin (and, for single shooting, Q's closed-form derivatives are used where the
        network has them); ``newton_path``: give the problem the vectorised twin (``q_batch``) for
        the batched Newton. What the layer, the planner and each Ray actor build."""
        kw = {}
        if newton_path:
            kw["q_batch"] = q.casadi_batch_function
        if bake_weights and spec.shooting == "single" and hasattr(q, "numpy_derivatives"):
            kw["q_derivatives"] = q.numpy_derivatives()  # the weights are constants here too
        return cls(q.casadi_function(baked=bake_weights), spec, **kw)

    @property
    def plan_newton(self) -> bool:
        """Whether the plan is a box-constrained problem in the actions alone (single shooting,
        horizon > 1), which the batched projected Newton solves on the problem's own derivatives
        (:meth:`qmpc.solver.BatchedSolver.solve`)."""
        return self.shooting == "single" and self.N > 0

    @property
    def batched(self) -> bool:
        """Whether :meth:`batch_first_order` is available (horizon 1 with a ``q_batch``)."""
        return self._q_batch is not None

    def batch_first_order(self, batch: int) -> ca.Function | None:
        """Horizon 1 with a ``q_batch``: ``Function(u (nu × B), x0 (nx × B), theta) -> (q (1 × B),
        grad (nu × B))``, ``J = Q`` and its gradient in ``u`` for ``B = batch`` samples in one call
        (built once per batch size); ``None`` without a ``q_batch``."""
        if self._q_batch is None:
            return None
        if batch not in self._batch_first_order:
            u = ca.MX.sym("u", self.nu * batch)
            x0, theta = ca.MX.sym("x0", self.nx, batch), ca.MX.sym("theta", self.n_theta)
            q = self._q_batch(batch)(x0, ca.reshape(u, self.nu, batch), theta)
            grad = ca.reshape(ca.gradient(ca.sum2(q), u), self.nu, batch)
            self._batch_first_order[batch] = ca.Function(
                "batch_first_order", [u, x0, theta], [q, grad], ["u", "x0", "theta"], ["q", "grad"]
            )
        return self._batch_first_order[batch]

    # -- layout ------------------------------------------------------------------------
    def model_step(self, x: np.ndarray, u: np.ndarray, k: int, theta: ca.DM | np.ndarray) -> np.ndarray:
        """``x_{k+1} (nx,)``: the plan's model at step ``k`` from ``x (nx,)`` under ``u (nu,)``, with
        the parameters of step ``k`` in ``theta`` (one step: rolling a plan by calls of
        :attr:`states` would cost ``O(H²)``)."""
        n_q, n_p = self.n_theta_q, self.dynamics_params
        params = [ca.DM(theta)[n_q + k * n_p : n_q + (k + 1) * n_p]] if n_p else []
        return np.asarray(self.spec.dynamics(x, u, *params), dtype=np.float64).reshape(-1)

    def u_slice(self, k: int) -> slice:
        """Where action ``u_k`` lives in ``w``."""
        return slice(k * self.nu, (k + 1) * self.nu)

    def x_slice(self, k: int) -> slice:
        """Where predicted state ``x_k`` (``1 ≤ k ≤ N``) lives in ``w`` (multiple shooting; with
        single shooting the states are not in ``w``: see :attr:`states`)."""
        if self.shooting == "single":
            raise InputError("expected shooting='multiple' for states in w, got 'single' (use problem.states)")
        if not 1 <= k <= self.N:
            raise IndexError(f"expected 1 <= k <= {self.N}, got {k}")
        o = (self.N + 1) * self.nu
        return slice(o + (k - 1) * self.nx, o + k * self.nx)

    def bounds(self, low: np.ndarray, high: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Bounds on ``w`` from action bounds ``low, high (nu,)``: states are free."""
        n_x = self.n_w - (self.N + 1) * self.nu
        lbw = np.concatenate([np.tile(low, self.N + 1), np.full(n_x, -np.inf)])
        ubw = np.concatenate([np.tile(high, self.N + 1), np.full(n_x, np.inf)])
        return lbw, ubw
