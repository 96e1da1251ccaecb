"""MuJoCo's own linearisation of a qmpc task, along the previous plan, as a time-varying model.

At every control step the nominal trajectory is MuJoCo's rollout from the current state of
the previous plan's actions (shifted by one step; zeros at the start). Each step is linearised
there with ``mujoco.mjd_transitionFD``:

    x_{k+1} ≈ x̄_{k+1} + A_k (x_k − x̄_k) + B_k (u_k − ū_k)

and the ``N`` steps' ``(x̄_k, ū_k, x̄_{k+1}, A_k, B_k)`` become the parameters of
``dynamics(x, u, p)`` (see ``ControlProblem(dynamics_params=…)``), so the NLP is built once and
only its parameters change.

A qmpc task exposes ``model`` (``MjModel``), ``mujoco_state_index`` (the observation's entries
in MuJoCo's tangent state ``[dq; qvel; act]``), ``set_mujoco_state(data, x)`` and
``observe(data)``.
"""

from __future__ import annotations

import casadi as ca
import mujoco
import numpy as np

from qmpc.errors import InputError

__all__ = ["MujocoLinearization"]


class MujocoLinearization:
    """Time-varying linear model of a qmpc task from ``mjd_transitionFD``.

    Args:
        env: a qmpc task (``qmpc/…``) or its unwrapped environment.
        eps: finite-difference step of ``mjd_transitionFD``.
        centered: central (True) or forward differences.

    Attributes:
        dynamics: ``Function(x, u, p) -> x⁺``, the affine model of one step.
        n_p: size of ``p`` per step.
    """

    def __init__(self, env, eps: float = 1e-6, centered: bool = True):
        u = getattr(env, "unwrapped", env)
        for attr in ("model", "mujoco_state_index", "set_mujoco_state", "observe"):
            if not hasattr(u, attr):
                raise InputError(
                    f"expected a qmpc task with {attr!r} for MuJoCo's linearisation, got {type(u).__name__}"
                )
        self.task, self.model = u, u.model
        self.data = mujoco.MjData(self.model)
        self.index = np.asarray(u.mujoco_state_index)
        self.nx, self.nu = self.index.size, self.model.nu
        self.eps, self.centered = float(eps), bool(centered)
        nx, nu = self.nx, self.nu
        self.n_p = 2 * nx + nu + nx * nx + nx * nu
        x, uu, p = ca.SX.sym("x", nx), ca.SX.sym("u", nu), ca.SX.sym("p", self.n_p)
        xb, ub, xn = p[:nx], p[nx : nx + nu], p[nx + nu : 2 * nx + nu]
        o = 2 * nx + nu
        A = ca.reshape(p[o : o + nx * nx], nx, nx)
        B = ca.reshape(p[o + nx * nx :], nx, nu)
        self.dynamics = ca.Function(
            "mujoco_linearization", [x, uu, p], [xn + A @ (x - xb) + B @ (uu - ub)], ["x", "u", "p"], ["x_next"]
        )
        ns = 2 * self.model.nv + self.model.na
        self._A = np.zeros((ns, ns))
        self._B = np.zeros((ns, nu))

    def step(self, x: np.ndarray, u: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(x⁺, A, B)``: MuJoCo's step from ``(x, u)`` and its Jacobians in the observation's
        coordinates, ``(nx,)``, ``(nx, nx)``, ``(nx, nu)``."""
        d = self.data
        mujoco.mj_resetData(self.model, d)
        self.task.set_mujoco_state(d, x)
        d.ctrl[:] = u
        mujoco.mjd_transitionFD(self.model, d, self.eps, self.centered, self._A, self._B, None, None)
        mujoco.mj_step(self.model, d)
        x_next = self.task.observe(d)
        i = self.index
        return x_next, self._A[np.ix_(i, i)].copy(), self._B[i].copy()

    def params(self, x0: np.ndarray, actions: np.ndarray) -> np.ndarray:
        """``(N · n_p,)`` parameters along MuJoCo's rollout of ``actions (N, nu)`` from ``x0``."""
        out, x = [], np.asarray(x0, dtype=np.float64)
        for u in np.asarray(actions, dtype=np.float64).reshape(-1, self.nu):
            x_next, A, B = self.step(x, u)
            out.append(np.concatenate([x, u, x_next, A.ravel(order="F"), B.ravel(order="F")]))
            x = x_next
        return np.concatenate(out) if out else np.zeros(0)
