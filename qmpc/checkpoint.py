"""Checkpoints: written atomically, read with clear errors.

A checkpoint is a ``torch.save`` dict with at least ``format``, ``spec`` (task id, sizes and
action bounds), ``network`` (architecture options) and ``q`` (the network's state dict). Training
checkpoints add the optimiser, target network, replay buffer, RNG and environment states.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qmpc.data import atomic_write
from qmpc.dynamics import DynamicsModel
from qmpc.errors import InputError, QmpcError
from qmpc.networks import QNetwork, build_network

__all__ = [
    "FORMAT",
    "CheckpointError",
    "dynamics_from_checkpoint",
    "load_checkpoint",
    "network_from_checkpoint",
    "save_checkpoint",
]

FORMAT = "qmpc-checkpoint-1"


class CheckpointError(QmpcError):
    """A checkpoint is missing, truncated, corrupted, or does not fit what it is used for."""


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` atomically (a kill mid-write leaves the previous checkpoint intact)."""
    payload = {k: v for k, v in payload.items() if k != "format"}
    atomic_write(path, lambda tmp: torch.save({"format": FORMAT, **payload}, tmp))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"expected a checkpoint file, got nothing at {path}")
    data = path.read_bytes()
    if not zipfile.is_zipfile(io.BytesIO(data)):
        raise CheckpointError(
            f"expected a torch checkpoint at {path}, got {len(data)} bytes that are not one (truncated or corrupted?)"
        )
    try:
        ckpt = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises several types for damaged archives
        raise CheckpointError(f"expected a readable checkpoint at {path}, got: {e}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        got = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"expected a {FORMAT} checkpoint at {path}, got format {got!r}")
    for key in ("spec", "network", "q"):
        if key not in ckpt:
            raise CheckpointError(f"expected key {key!r} in checkpoint {path}, got {sorted(ckpt)}")
    return ckpt


POLICY_KEYS = ("config", "spec", "network", "gamma", "q", "model")


def policy_of(ckpt: dict[str, Any]) -> dict[str, Any]:
    """The part of a training checkpoint that a controller needs (no optimiser, buffer or RNG
    state), plus where training stood: small enough to ship in ``models/``."""
    out = {k: ckpt[k] for k in POLICY_KEYS if k in ckpt}
    if "loop" in ckpt:
        out["trained_steps"] = ckpt["loop"]["step"]
        out["eval_returns"] = list(zip(ckpt["loop"]["eval_steps"], ckpt["loop"]["eval_returns"], strict=True))
    return out


def network_from_checkpoint(ckpt: dict[str, Any], dtype: torch.dtype = torch.float64) -> QNetwork:
    """Rebuild the Q network of a checkpoint and load its weights."""
    spec = ckpt["spec"]
    q = build_network(
        ckpt["network"]["arch"],
        spec["obs_dim"],
        spec["act_dim"],
        **{k: v for k, v in ckpt["network"].items() if k != "arch"},
    )
    state = dict(ckpt["q"])
    for name in ("obs_shift", "obs_transform"):  # written before input normalisation existed: identity
        state.setdefault(name, getattr(q, name))
    try:
        q.load_state_dict(state)
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:300]
        raise CheckpointError(f"expected weights matching {ckpt['network']}, got: {detail}") from None
    q = q.to(dtype)
    bad = [n for n, p in q.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise CheckpointError(f"expected finite weights, got NaN/Inf in {bad[:3]}")
    return q


def dynamics_from_checkpoint(ckpt: dict[str, Any]) -> DynamicsModel:
    """The learned dynamics model of a checkpoint (float64), or a clear error if it has none."""
    if "model" not in ckpt:
        raise CheckpointError(
            "expected a checkpoint with a learned dynamics model (train with model.learn = true), got one without"
        )
    spec = ckpt["spec"]
    try:
        return DynamicsModel.from_state(
            spec["obs_dim"], spec["act_dim"], ckpt["model"]["kwargs"], ckpt["model"]["state"]
        )
    except InputError as e:
        raise CheckpointError(str(e)) from None


def spec_arrays(spec: dict) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(spec["low"], float), np.asarray(spec["high"], float)
