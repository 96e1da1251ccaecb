"""Q networks ``Q_θ(x, u)`` (torch) with exact CasADi twins.

Every network is a ``torch.nn.Module`` called as ``q(x, u) -> (B,)`` with ``x: (B, obs_dim)``
and ``u: (B, act_dim)``. ``Q`` is a *cost-to-go* (``c = -reward``): controllers minimise it.

The CasADi twin is a function of ``(x, u, theta)`` where ``theta`` is the flat vector of
``q.parameters()`` in their iteration order, each tensor flattened row-major (torch's
``flatten``). :meth:`QNetwork.flat_parameters` produces exactly that vector and
:meth:`QNetwork.parameter_layout` names its slices. Twins agree with the torch forward to
round-off in float64 (the test suite checks value, gradient and Hessian to 1e-10).

Three architectures, each in its own module with all its forms (torch, CasADi, numpy):

* :class:`QuadraticQ` (:mod:`~qmpc.networks.quadratic`) — NAF-style
  ``V(x) + ½ (u-μ(x))ᵀ P(x) (u-μ(x))``, ``P ≻ 0``: convex in u.
* :class:`PICNN` (:mod:`~qmpc.networks.picnn`) — partially input-convex network (Amos, Xu & Kolter
  2017): convex in u for every x, by construction (non-negative weights on the convex path, convex
  non-decreasing activations), plus ``½ m ‖u‖²`` so that the minimiser is unique; with its
  closed-form numpy derivatives and the batched oracle :class:`PICNNActionOracle`.
* :class:`MLPQ` (:mod:`~qmpc.networks.mlp`) — a plain MLP on ``[x, u]``: not convex, so the solver
  may return a local minimum; the bridge differentiates the local minimum it is given.

:mod:`~qmpc.networks.base` holds what they share (:class:`QNetwork`, the activations and their
twins, :class:`ThetaView`); :mod:`~qmpc.networks.registry` names them (:func:`build_network`).
"""

from qmpc.networks.base import ACTIVATIONS, QNetwork, ThetaView, np64, np_activation, np_softplus, sequential_twin
from qmpc.networks.mlp import MLPQ
from qmpc.networks.picnn import PICNN, PICNNActionOracle
from qmpc.networks.quadratic import QuadraticQ
from qmpc.networks.registry import ARCH_NAMES, ARCHITECTURES, REGISTRY, Architecture, build_network

__all__ = [
    "ACTIVATIONS",
    "ARCHITECTURES",
    "ARCH_NAMES",
    "MLPQ",
    "PICNN",
    "REGISTRY",
    "Architecture",
    "PICNNActionOracle",
    "QNetwork",
    "QuadraticQ",
    "ThetaView",
    "build_network",
    "np64",
    "np_activation",
    "np_softplus",
    "sequential_twin",
]
