"""qmpc: model predictive control with a learned Q-function as the cost-to-go.

Conventions: ``Q(x, u)`` is a cost-to-go (stage cost ``c = −reward``) and every controller
minimises it. Shapes are batch first: ``x: (B, obs_dim)``, ``u: (B, act_dim)``.
"""

import ctypes.util as _ctypes_util
import os as _os

# Videos are rendered offscreen by MuJoCo. On a headless machine pick EGL when it is installed;
# this must happen before mujoco is first imported, and never overrides the user's MUJOCO_GL.
if "MUJOCO_GL" not in _os.environ and not _os.environ.get("DISPLAY") and _ctypes_util.find_library("EGL"):
    _os.environ["MUJOCO_GL"] = "egl"

from qmpc.bridge import ArgminLayer, LayerResult
from qmpc.controller import Controller
from qmpc.errors import ConfigError, InputError, QmpcError, SolverError, UnsupportedLayerError
from qmpc.networks import MLPQ, PICNN, QNetwork, QuadraticQ
from qmpc.planner import Planner
from qmpc.problem import ControlProblem, MPCSpec
from qmpc.solver import BatchedSolver, SolveResult, SolverOptions, Status

__version__ = "0.1.0"

__all__ = [
    "MLPQ",
    "PICNN",
    "ArgminLayer",
    "BatchedSolver",
    "ConfigError",
    "ControlProblem",
    "Controller",
    "InputError",
    "LayerResult",
    "MPCSpec",
    "Planner",
    "QNetwork",
    "QmpcError",
    "QuadraticQ",
    "SolveResult",
    "SolverError",
    "SolverOptions",
    "Status",
    "UnsupportedLayerError",
]
