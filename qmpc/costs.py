"""Symbolic stage costs ``c(x, u, x⁺) = −reward`` of the gymnasium tasks qmpc ships launch files
for, written from the observations (gymnasium computes these rewards after the physics step, so
the cost reads ``x⁺``). ``tests/test_models.py`` checks each against the simulator's rewards.

* ``InvertedPendulum-v5``: ``−1`` (the reward is 1 per step alive; termination is Q's business).
* ``InvertedDoublePendulum-v5``: ``−10 + 0.01 x_tip² + (y_tip − 2)² + 10⁻³ ω₁² + 5·10⁻³ ω₂²``,
  the tip from the cart position and the link angles' sines and cosines, link lengths read from
  the MuJoCo model (exact while the pendulum is alive and ``|ω| ≤ 10``, where the observation
  clips).
* ``Reacher-v5``: ``‖fingertip − target‖ + ‖u‖²``, the norm smoothed as ``sqrt(d² + 10⁻⁶)``
  (error ≤ 10⁻³).
* ``HalfCheetah-v5``: ``−Δx/Δt + 0.1 ‖u‖²`` with the forward speed ``Δx/Δt`` approximated by the
  trapezoid ``(v_x + v_x⁺)/2`` (the position is not observed); see the test for the measured error.
* ``qmpc/…`` tasks: their own ``casadi_model()``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import casadi as ca
import gymnasium as gym
import mujoco
import numpy as np

from qmpc import compiled
from qmpc.errors import InputError

__all__ = ["QUADRATIC_STAGE_COSTS", "STAGE_COSTS", "QuadraticStageCost", "stage_cost", "stage_cost_derivatives"]


def _syms(nx: int, nu: int):
    return ca.SX.sym("x", nx), ca.SX.sym("u", nu), ca.SX.sym("x_next", nx)


def _function(name: str, x, u, xn, c) -> ca.Function:
    return ca.Function(name, [x, u, xn], [c], ["x", "u", "x_next"], ["c"])


def _inverted_pendulum(env: gym.Env) -> ca.Function:
    x, u, xn = _syms(4, 1)
    return _function("ip_cost", x, u, xn, ca.SX(-1.0))


def _link_lengths(env: gym.Env) -> tuple[float, float]:
    """Lengths of the two links to the tip site, read from the model's kinematics."""
    m = env.unwrapped.model
    d = mujoco.MjData(m)
    mujoco.mj_forward(m, d)
    total = float(d.site_xpos[0][2])
    d.qpos[2] = np.pi / 2
    mujoco.mj_forward(m, d)
    l2 = float(d.site_xpos[0][0] - d.qpos[0])
    return total - l2, l2


def _inverted_double_pendulum(env: gym.Env) -> ca.Function:
    x, u, xn = _syms(9, 1)
    l1, l2 = _link_lengths(env)
    cart, s1, s2, c1, c2, _, w1, w2 = (xn[i] for i in range(8))
    s12, c12 = s1 * c2 + c1 * s2, c1 * c2 - s1 * s2
    x_tip, y_tip = cart + l1 * s1 + l2 * s12, l1 * c1 + l2 * c12
    c = -10.0 + 0.01 * x_tip**2 + (y_tip - 2.0) ** 2 + 1e-3 * w1**2 + 5e-3 * w2**2
    return _function("idp_cost", x, u, xn, c)


def _reacher(env: gym.Env) -> ca.Function:
    x, u, xn = _syms(10, 2)
    w_dist = float(getattr(env.unwrapped, "_reward_dist_weight", 1.0))
    w_ctrl = float(getattr(env.unwrapped, "_reward_control_weight", 1.0))
    c = w_dist * ca.sqrt(ca.sumsqr(xn[8:10]) + 1e-6) + w_ctrl * ca.sumsqr(u)
    return _function("reacher_cost", x, u, xn, c)


@dataclass(frozen=True)
class QuadraticStageCost:
    """``c(x, u, x⁺) = a·z + Σ_j q_j z_j² + b`` with ``z = (x, u, x⁺)`` (``a``, ``q``: ``(n3,)``,
    ``n3 = 2 nx + nu``): one definition for the CasADi function (:meth:`function`) and its closed-form
    derivatives (:meth:`derivatives`, with a compiled form: :func:`qmpc.compiled.quadratic_layout`)."""

    name: str
    nx: int
    nu: int
    a: np.ndarray
    q: np.ndarray
    b: float = 0.0

    def function(self) -> ca.Function:
        """``Function(x, u, x_next) -> c``."""
        x, u, xn = _syms(self.nx, self.nu)
        z = ca.vertcat(x, u, xn)
        c = ca.dot(ca.DM(self.a), z) + ca.dot(ca.DM(self.q), z**2) + self.b
        return _function(self.name, x, u, xn, c)

    def derivatives(self) -> Callable:
        """``(X, U, Xn) (K, ·) -> (c (K,), ∇c (K, n3), ∇²c (K, n3, n3))`` in closed form
        (:class:`qmpc.problem.ClosedForms`' ``cost``), carrying its compiled layout (a controller
        scales both to Q's units)."""
        a, q, b = self.a, self.q, self.b

        def derivatives(X, U, Xn, hessian: bool = True, directions: np.ndarray | None = None):
            Z = np.concatenate([X, U, Xn], axis=1)
            c, g = Z @ a + (Z * Z) @ q + b, a + 2.0 * q * Z
            if not hessian:
                return c, g, None
            if directions is None:
                return c, g, np.broadcast_to(np.diag(2.0 * q), (Z.shape[0], q.size, q.size)).copy()
            return c, g, np.swapaxes(directions, 1, 2) @ (2.0 * q[None, :, None] * directions)

        derivatives.compiled = ("cost_head", compiled.quadratic_layout(a, q, b))
        return derivatives


def _half_cheetah_quadratic(env: gym.Env) -> QuadraticStageCost:
    nx, nu = 17, 6
    w_fwd = float(getattr(env.unwrapped, "_forward_reward_weight", 1.0))
    w_ctrl = float(getattr(env.unwrapped, "_ctrl_cost_weight", 0.1))
    a, q = np.zeros(2 * nx + nu), np.zeros(2 * nx + nu)
    a[8] = a[nx + nu + 8] = -w_fwd * 0.5  # −(v_x + v_x⁺)/2
    q[nx : nx + nu] = w_ctrl
    return QuadraticStageCost("half_cheetah_cost", nx, nu, a, q)


def _half_cheetah(env: gym.Env) -> ca.Function:
    return _half_cheetah_quadratic(env).function()


QUADRATIC_STAGE_COSTS: dict[str, Callable[[gym.Env], QuadraticStageCost]] = {
    "HalfCheetah-v5": _half_cheetah_quadratic,
}
"""The tasks whose stage cost is a :class:`QuadraticStageCost` (closed-form derivatives: the plan's
Hessian without CasADi's, and a compiled plan where the model and Q have compiled forms too)."""

STAGE_COSTS: dict[str, Callable[[gym.Env], ca.Function]] = {
    "InvertedPendulum-v5": _inverted_pendulum,
    "InvertedDoublePendulum-v5": _inverted_double_pendulum,
    "Reacher-v5": _reacher,
    "HalfCheetah-v5": _half_cheetah,
}


def stage_cost(env: gym.Env) -> ca.Function:
    """``Function(x, u, x_next) -> c`` (``c = −reward``) for ``env``'s task, or
    ``Function(x, u) -> c`` for a qmpc task; raises :class:`InputError` for a task without one."""
    u = env.unwrapped
    if hasattr(u, "casadi_model"):
        return u.casadi_model()[1]
    env_id = env.spec.id if env.spec is not None else type(u).__name__
    if env_id not in STAGE_COSTS:
        raise InputError(
            f"expected a task with a symbolic stage cost ({sorted(STAGE_COSTS)} or a qmpc/… task), got {env_id}"
        )
    f = STAGE_COSTS[env_id](env)
    _check_sizes(env, env_id, f.size1_in(0), f.size1_in(1))
    return f


def _check_sizes(env: gym.Env, env_id: str, nx: int, nu: int) -> None:
    """Raise unless ``env``'s observations and actions have the sizes ``nx`` and ``nu`` its cost reads."""
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    if (nx, nu) != (obs_dim, act_dim):
        raise InputError(
            f"expected {env_id} with observations ({nx},) and actions ({nu},) as in its "
            f"default configuration, got ({obs_dim},) and ({act_dim},)"
        )


def stage_cost_derivatives(env: gym.Env) -> Callable | None:
    """The closed-form derivatives of :func:`stage_cost` of ``env``'s task where it is a
    :class:`QuadraticStageCost` (:data:`QUADRATIC_STAGE_COSTS`), else None (CasADi differentiates it)."""
    env_id = env.spec.id if env.spec is not None else ""
    if hasattr(env.unwrapped, "casadi_model") or env_id not in QUADRATIC_STAGE_COSTS:
        return None
    cost = QUADRATIC_STAGE_COSTS[env_id](env)
    _check_sizes(env, env_id, cost.nx, cost.nu)
    return cost.derivatives()
