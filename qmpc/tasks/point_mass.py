"""``qmpc/PointMass-v0``: a planar point mass (double integrator) in MuJoCo.

No gravity, damping or friction and MuJoCo's semi-implicit Euler step, so one step is exactly

    v⁺ = v + dt · F / m,    p⁺ = p + dt · v⁺        (x = [p; v], u = F)

a linear system ``x⁺ = A x + B u``. The stage cost is quadratic, ``c = xᵀ Qc x + uᵀ R u``
(reward ``−c``), so the optimal Q-function is known from the discrete Riccati equation
(:func:`qmpc.lqr.lqr_q_matrix`). The test suite checks the simulator against ``A, B``.
"""

from __future__ import annotations

from pathlib import Path

import casadi as ca
import gymnasium as gym
import mujoco
import numpy as np

__all__ = ["MODEL_PATH", "PointMassEnv"]

MODEL_PATH = Path(__file__).resolve().parents[2] / "models" / "point_mass.xml"


class PointMassEnv(gym.Env):
    """Drive a unit point mass to the origin. Observation ``[x, y, vx, vy]``, action the force
    ``[fx, fy]`` in newtons, bounded by the actuators' ``ctrlrange``.

    Args:
        render_mode: ``"rgb_array"`` or None.
        state_cost: diagonal of ``Qc`` for ``[x, y, vx, vy]``.
        action_cost: ``R = action_cost · I``.
        init_scale: initial positions uniform in ``±init_scale`` (m), velocities in half that.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 20}  # noqa: RUF012

    def __init__(
        self,
        render_mode: str | None = None,
        state_cost: tuple[float, ...] = (1.0, 1.0, 0.1, 0.1),
        action_cost: float = 1.0,
        init_scale: float = 1.0,
    ):
        self.model = mujoco.MjModel.from_xml_path(str(MODEL_PATH))
        self.data = mujoco.MjData(self.model)
        self._qpos = [self.model.joint(n).qposadr[0] for n in ("x", "y")]
        self._qvel = [self.model.joint(n).dofadr[0] for n in ("x", "y")]
        ctrl = np.array([self.model.actuator(n).ctrlrange for n in ("fx", "fy")])
        self.action_space = gym.spaces.Box(ctrl[:, 0].astype(np.float32), ctrl[:, 1].astype(np.float32))
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (4,), np.float64)
        self.Qc = np.diag(np.asarray(state_cost, dtype=float))
        self.R = float(action_cost) * np.eye(2)
        self.init_scale = float(init_scale)
        self.render_mode = render_mode
        self._renderer = None

    # -- state by name ------------------------------------------------------------------
    def observe(self, data: mujoco.MjData) -> np.ndarray:
        """The observation ``[x, y, vx, vy]`` of a MuJoCo state of this model."""
        return np.concatenate([data.qpos[self._qpos], data.qvel[self._qvel]]).astype(np.float64)

    def set_mujoco_state(self, data: mujoco.MjData, obs: np.ndarray) -> None:
        """Write an observation into a MuJoCo state of this model (the inverse of :meth:`observe`)."""
        data.qpos[self._qpos], data.qvel[self._qvel] = obs[:2], obs[2:]
        mujoco.mj_forward(self.model, data)

    @property
    def dt(self) -> float:
        """Control period in seconds (one MuJoCo step)."""
        return float(self.model.opt.timestep)

    @property
    def mujoco_state_index(self) -> np.ndarray:
        """Where the observation's entries sit in MuJoCo's tangent state ``[dq; qvel; act]``
        (the layout of ``mjd_transitionFD``'s Jacobians)."""
        nv = self.model.nv
        return np.array([*self._qvel, *(nv + np.array(self._qvel))])

    def _obs(self) -> np.ndarray:
        return self.observe(self.data)

    def cost(self, obs: np.ndarray, action: np.ndarray) -> float:
        """Stage cost ``xᵀ Qc x + uᵀ R u`` (the reward is its negative)."""
        return float(obs @ self.Qc @ obs + action @ self.R @ action)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        mujoco.mj_resetData(self.model, self.data)
        s = self.init_scale
        self.data.qpos[self._qpos] = self.np_random.uniform(-s, s, 2)
        self.data.qvel[self._qvel] = self.np_random.uniform(-s / 2, s / 2, 2)
        mujoco.mj_forward(self.model, self.data)
        return self._obs(), {}

    def step(self, action):
        a = np.clip(np.asarray(action, dtype=np.float64), self.action_space.low, self.action_space.high)
        obs = self._obs()
        c = self.cost(obs, a)
        self.data.ctrl[:] = a
        mujoco.mj_step(self.model, self.data)
        return self._obs(), -c, False, False, {"cost": c}

    def render(self):
        if self.render_mode != "rgb_array":
            return None
        if self._renderer is None:
            # gymnasium's renderer picks its OpenGL backend (MUJOCO_GL) when it first renders;
            # mujoco.Renderer's is fixed when mujoco is imported
            from gymnasium.envs.mujoco.mujoco_rendering import MujocoRenderer

            cam = mujoco.MjvCamera()
            mujoco.mjv_defaultFreeCamera(self.model, cam)  # the whole plane, centred on the target
            view = {"lookat": np.array(cam.lookat), "distance": cam.distance}
            view |= {"azimuth": cam.azimuth, "elevation": cam.elevation}
            self._renderer = MujocoRenderer(self.model, self.data, default_cam_config=view, width=320, height=240)
        return self._renderer.render("rgb_array")

    def close(self):
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None

    # -- theory -------------------------------------------------------------------------
    def linear_dynamics(self) -> tuple[np.ndarray, np.ndarray]:
        """``(A, B)`` of ``x⁺ = A x + B u``, from the model's timestep and mass."""
        dt = float(self.model.opt.timestep)
        m = float(self.model.body("mass").mass[0])
        I2 = np.eye(2)
        A = np.block([[I2, dt * I2], [np.zeros((2, 2)), I2]])
        B = np.vstack([dt**2 / m * I2, dt / m * I2])
        return A, B

    def casadi_model(self) -> tuple[ca.Function, ca.Function]:
        """CasADi ``f(x, u) -> x⁺`` and stage cost ``c(x, u)``."""
        A, B = self.linear_dynamics()
        x, u = ca.SX.sym("x", 4), ca.SX.sym("u", 2)
        f = ca.Function("point_mass_f", [x, u], [ca.mtimes(A, x) + ca.mtimes(B, u)], ["x", "u"], ["x_next"])
        c = ca.Function("point_mass_c", [x, u], [ca.bilin(self.Qc, x, x) + ca.bilin(self.R, u, u)], ["x", "u"], ["c"])
        return f, c
