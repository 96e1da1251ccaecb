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

``horizon=1`` (``N = 0``) is exactly ``min_u Q_θ(x0, u)``: no states, no constraints, the
same code. The optimal value is ``V(x0, θ) = J(w*; x0, θ)``.

This module never imports torch. Every CasADi function is built once, in the constructor.
"""

from __future__ import annotations

import casadi as ca
import numpy as np

from qmpc.errors import InputError

__all__ = ["ControlProblem"]


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


class ControlProblem:
    """The NLP of one control step and its derivative functions, all built once.

    Args:
        q_function: ``Function(x (nx), u (nu), theta (n_theta)) -> q (1)``, the CasADi twin of Q.
        horizon: number of actions ``H ≥ 1`` in the plan.
        dynamics: ``Function(x, u) -> x⁺``; required when ``horizon > 1``.
        stage_cost: ``Function(x, u) -> c`` or ``Function(x, u, x_next) -> c`` (a cost, i.e.
            ``−reward``); required when ``horizon > 1``.
        discount: ``γ`` in ``(0, 1]``.
        dynamics_params: ``n_p > 0`` makes the model time-varying: ``dynamics`` is then
            ``Function(x, u, p) -> x⁺`` and the parameters ``p_0 … p_{N−1}`` of the ``N`` steps
            are stacked after the network weights in ``theta`` (e.g. a linearisation along the
            previous plan, :mod:`qmpc.linearize`). Nothing is differentiated with respect to them.

    Attributes:
        nx, nu, n_theta, n_w, n_g: sizes of the state, action, parameters (``n_theta_q`` of the
            network, then ``N · dynamics_params`` of the model), decision vector and equality
            constraints.
        nlp: the dict handed to ``casadi.nlpsol`` (``p = [x0; theta]``).
        first_order: ``(w, x0, theta, lam_g) -> (grad_L (n_w), g (n_g))``.
        second_order: ``(w, x0, theta, lam_g) -> (hess_L (n_w × n_w), jac_g (n_g × n_w))``.
        x_adjoint: ``(w, x0, theta, lam_g, a, b, vbar) -> xbar``: the part of ``x̄`` that comes from
            the stage costs and the dynamics (everything but Q): ``vbar · ∂(J_c + λᵀg)/∂x0 −
            ∂(aᵀ ∇_w (J_c + λᵀg) + bᵀ g)/∂x0``. Zero when ``horizon = 1``.
        cold_start: ``(x0, theta) -> w0``: zero actions (clipped later to the bounds) and the
            states of the model rolled out with them.
    """

    def __init__(
        self,
        q_function: ca.Function,
        horizon: int = 1,
        dynamics: ca.Function | None = None,
        stage_cost: ca.Function | None = None,
        discount: float = 1.0,
        dynamics_params: int = 0,
    ):
        if not isinstance(horizon, int | np.integer) or isinstance(horizon, bool) or horizon < 1:
            raise InputError(f"expected horizon to be an int >= 1, got {horizon!r}")
        if not (0.0 < float(discount) <= 1.0):
            raise InputError(f"expected discount in (0, 1], got {discount}")
        nx, nu, n_q = q_function.size1_in(0), q_function.size1_in(1), q_function.size1_in(2)
        _check_function(q_function, "q_function", [(nx, 1), (nu, 1), (n_q, 1)], [(1, 1)])
        if not isinstance(dynamics_params, int | np.integer) or dynamics_params < 0:
            raise InputError(f"expected dynamics_params to be an int >= 0, got {dynamics_params!r}")
        n_p = int(dynamics_params)
        N = int(horizon) - 1
        if N > 0:
            if dynamics is None or stage_cost is None:
                raise InputError(f"expected dynamics and stage_cost for horizon={horizon} > 1, got None")
            _check_function(dynamics, "dynamics", [(nx, 1), (nu, 1), (n_p, 1)][: 3 if n_p else 2], [(nx, 1)])
            n_c = stage_cost.n_in() if isinstance(stage_cost, ca.Function) else 2
            _check_function(stage_cost, "stage_cost", [(nx, 1), (nu, 1), (nx, 1)][: max(2, min(3, n_c))], [(1, 1)])
        n_theta = n_q + N * n_p
        self.nx, self.nu, self.n_theta, self.n_theta_q, self.dynamics_params, self.N = nx, nu, n_theta, n_q, n_p, N
        self.horizon = N + 1
        self.discount = float(discount)
        self.n_w = (N + 1) * nu + N * nx
        self.n_g = N * nx

        w = ca.MX.sym("w", self.n_w)
        x0 = ca.MX.sym("x0", nx)
        theta = ca.MX.sym("theta", n_theta)
        lam_g = ca.MX.sym("lam_g", self.n_g)
        us = [w[k * nu : (k + 1) * nu] for k in range(N + 1)]
        params = [[theta[n_q + k * n_p : n_q + (k + 1) * n_p]] if n_p else [] for k in range(N)]
        xs = [x0] + [w[(N + 1) * nu + k * nx : (N + 1) * nu + (k + 1) * nx] for k in range(N)]
        gamma = self.discount
        J_stage = ca.MX(0)
        g = []
        for k in range(N):
            J_stage += gamma**k * stage_cost(*[xs[k], us[k], xs[k + 1]][: stage_cost.n_in()])
            g.append(dynamics(xs[k], us[k], *params[k]) - xs[k + 1])
        g = ca.vertcat(*g) if g else ca.MX(0, 1)
        # inlined, not a call node: MX derivatives through a call node cost ~10x more here
        J_q = gamma**N * q_function.call([xs[N], us[N], theta[:n_q]], True, False)[0]
        J = J_stage + J_q
        L = J + ca.dot(lam_g, g) if self.n_g else J

        self.nlp = {"x": w, "p": ca.vertcat(x0, theta), "f": J, "g": g}
        names = ["w", "x0", "theta", "lam_g"]
        grad_L = ca.gradient(L, w)
        self.first_order = ca.Function("first_order", [w, x0, theta, lam_g], [grad_L, g], names, ["grad_L", "g"])
        hess_L = ca.hessian(L, w)[0]
        jac_g = ca.jacobian(g, w) if self.n_g else ca.MX(0, self.n_w)
        self.second_order = ca.Function(
            "second_order", [w, x0, theta, lam_g], [ca.densify(hess_L), ca.densify(jac_g)], names, ["hess_L", "jac_g"]
        )

        a = ca.MX.sym("a", self.n_w)
        b = ca.MX.sym("b", self.n_g)
        vbar = ca.MX.sym("vbar")
        L_c = J_stage + (ca.dot(lam_g, g) if self.n_g else 0)
        phi = vbar * L_c - ca.dot(a, ca.gradient(L_c, w)) - (ca.dot(b, g) if self.n_g else 0)
        self.x_adjoint = ca.Function(
            "x_adjoint",
            [w, x0, theta, lam_g, a, b, vbar],
            [ca.densify(ca.gradient(phi, x0))],
            ["w", "x0", "theta", "lam_g", "a", "b", "vbar"],
            ["xbar"],
        )

        # Cold start: zero actions and the model rolled out with them.
        xc = ca.MX.sym("x0", nx)
        roll, xk = [], xc
        for k in range(N):
            xk = dynamics(xk, ca.DM.zeros(nu), *params[k])
            roll.append(xk)
        self.cold_start = ca.Function(
            "cold_start", [xc, theta], [ca.vertcat(ca.DM.zeros((N + 1) * nu), *roll)], ["x0", "theta"], ["w0"]
        )

    # -- layout ------------------------------------------------------------------------
    def u_slice(self, k: int) -> slice:
        """Where action ``u_k`` lives in ``w``."""
        return slice(k * self.nu, (k + 1) * self.nu)

    def x_slice(self, k: int) -> slice:
        """Where predicted state ``x_k`` (``1 ≤ k ≤ N``) lives in ``w``."""
        if not 1 <= k <= self.N:
            raise IndexError(f"expected 1 <= k <= {self.N}, got {k}")
        o = (self.N + 1) * self.nu
        return slice(o + (k - 1) * self.nx, o + k * self.nx)

    def bounds(self, low: np.ndarray, high: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Bounds on ``w`` from action bounds ``low, high (nu,)``: states are free."""
        lbw = np.concatenate([np.tile(low, self.N + 1), np.full(self.N * self.nx, -np.inf)])
        ubw = np.concatenate([np.tile(high, self.N + 1), np.full(self.N * self.nx, np.inf)])
        return lbw, ubw
