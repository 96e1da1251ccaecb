"""The one registry of Q-network architectures: :data:`REGISTRY` maps the name of each (the
``network.arch`` of a launch file, stored in every checkpoint) to its class and the options of
:func:`build_network` it takes. :func:`build_network`, :data:`ARCHITECTURES`, the allowed values
of ``network.arch`` (:class:`~qmpc.config.NetworkConfig`) and the architectures ``qmpc check``
covers are all read from it: an architecture is added here, and only here."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from qmpc.errors import InputError
from qmpc.networks.base import QNetwork
from qmpc.networks.mlp import MLPQ
from qmpc.networks.picnn import PICNN
from qmpc.networks.quadratic import QuadraticQ

__all__ = ["ARCHITECTURES", "ARCH_NAMES", "REGISTRY", "Architecture", "build_network"]


@dataclass(frozen=True)
class Architecture:
    """An entry of :data:`REGISTRY`: a network class and the options of :func:`build_network` it takes."""

    cls: type[QNetwork]
    """The class, built as ``cls(obs_dim, act_dim, hidden, **{option: value for option in options})``."""
    options: tuple[str, ...]
    """The keyword options of :func:`build_network` (fields of ``NetworkConfig``) that apply to this
    architecture; the others are ignored for it."""


REGISTRY: dict[str, Architecture] = {
    "QuadraticQ": Architecture(QuadraticQ, ("activation", "state_dependent_curvature")),
    "PICNN": Architecture(PICNN, ("activation", "action_curvature", "layer_norm")),
    "MLPQ": Architecture(MLPQ, ("activation", "action_curvature")),
}
"""Every architecture, by the name that launch files and checkpoints use (never rename one: the
checkpoints that store it would no longer load)."""

ARCH_NAMES: tuple[str, ...] = tuple(REGISTRY)
"""The architecture names, in the order of :data:`REGISTRY`."""

ARCHITECTURES: dict[str, type[QNetwork]] = {name: entry.cls for name, entry in REGISTRY.items()}
"""Name -> class, read from :data:`REGISTRY`."""


def build_network(
    arch: str,
    obs_dim: int,
    act_dim: int,
    hidden: Sequence[int] = (64, 64),
    activation: str = "tanh",
    action_curvature: float = 0.01,
    state_dependent_curvature: bool = True,
    layer_norm: bool = False,
) -> QNetwork:
    """A Q network by architecture name, taking the options that apply to it (:attr:`Architecture.options`)."""
    if arch not in REGISTRY:
        raise InputError(f"expected arch in {sorted(REGISTRY)}, got {arch!r}")
    given = {
        "activation": activation,
        "action_curvature": action_curvature,
        "state_dependent_curvature": state_dependent_curvature,
        "layer_norm": layer_norm,
    }
    entry = REGISTRY[arch]
    if layer_norm and "layer_norm" not in entry.options:  # asked for explicitly: not silently dropped
        with_it = sorted(name for name, e in REGISTRY.items() if "layer_norm" in e.options)
        raise InputError(f"expected arch in {with_it} for layer_norm = true, got {arch!r}")
    return entry.cls(obs_dim, act_dim, hidden, **{option: given[option] for option in entry.options})
