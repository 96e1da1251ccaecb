"""qmpc: model predictive control with a learned Q-function as the cost-to-go.

Conventions: ``Q(x, u)`` is a cost-to-go (stage cost ``c = −reward``) and every controller
minimises it. Shapes are batch first: ``x: (B, obs_dim)``, ``u: (B, act_dim)``.
"""

from qmpc.bridge import ArgminLayer, LayerResult
from qmpc.controller import Controller
from qmpc.errors import ConfigError, InputError, MujocoWarning, QmpcError, SolverError, UnsupportedLayerError
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
    "MujocoWarning",
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
