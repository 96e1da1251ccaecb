"""Checkpoints: written atomically, read with clear errors.

A checkpoint is a ``torch.save`` dict with at least ``format``, ``spec`` (task id, sizes and
action bounds), ``network`` (architecture options) and ``q`` (the network's state dict). Training
checkpoints add the optimiser, target network, replay buffer, RNG and environment states.

Integrity: torch checks none of the zip's CRC-32s, so a flipped bit in a weight loaded silently.
:func:`save_checkpoint` ends the file with a SHA-256 of every byte before it, stored as the zip's
comment (``qmpc-sha256:<hex>``; the file stays a plain torch zip), and :func:`load_checkpoint`
verifies it; a file written before (no comment, e.g. ``models/*.pt``) is verified by its members'
CRC-32s. The pickle is then read without running it (:mod:`qmpc.pickle_scan`): nothing it
declares may exceed what the file holds, before ``torch.load`` allocates anything.
"""

from __future__ import annotations

import errno
import hashlib
import io
import math
import pickle
import re
import struct
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qmpc.data import atomic_write
from qmpc.dynamics import DynamicsModel, OutcomeModel
from qmpc.errors import InputError, OutputError, QmpcError
from qmpc.networks import QNetwork, build_network
from qmpc.networks.behaviour import BehaviourPolicy, BehaviourRegularizedQ
from qmpc.pickle_scan import Disallowed, Malformed, Oversized, scan_pickle

__all__ = [
    "FORMAT",
    "CheckpointError",
    "dynamics_from_checkpoint",
    "load_checkpoint",
    "network_from_checkpoint",
    "outcome_from_checkpoint",
    "save_checkpoint",
]

FORMAT = "qmpc-checkpoint-1"


class CheckpointError(QmpcError):
    """A checkpoint is missing, truncated, corrupted, or does not fit what it is used for."""


_TAG = b"qmpc-sha256:"
_TRAILER = len(_TAG) + 64  # the zip comment: the tag and the hex digest
_END = b"PK\x05\x06"  # the zip's end-of-central-directory record: 22 bytes, then the comment


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` atomically (a kill mid-write leaves the previous checkpoint intact), with
    its SHA-256 checksum. A write the OS refuses (disk full, quota, file size limit) is an
    :class:`~qmpc.errors.OutputError` naming the file and the reason; the previous file stays."""
    path = Path(path)
    payload = {k: v for k, v in payload.items() if k != "format"}
    buf = io.BytesIO()
    torch.save({"format": FORMAT, **payload}, buf)
    pieces = _with_checksum(buf.getbuffer())
    try:
        atomic_write(path, lambda tmp: _write(tmp, pieces))
    except OutputError:
        raise
    except OSError as e:
        full = " (disk full)" if e.errno in (errno.ENOSPC, errno.EDQUOT) else ""
        raise OutputError(
            f"could not write checkpoint {path}: {e.strerror or e}{full}; the previous checkpoint there, if any, "
            "is intact"
        ) from None


def _with_checksum(raw: memoryview) -> list:
    """The zip ``raw`` (comment-less, as torch writes it) with the SHA-256 of all its bytes before
    the comment (its length field included) as its comment, in pieces (no copy of ``raw``)."""
    if len(raw) < 22 or bytes(raw[-22:-18]) != _END or bytes(raw[-2:]) != b"\x00\x00":
        raise CheckpointError("expected torch.save to write a zip without a comment, got something else")
    length = struct.pack("<H", _TRAILER)
    digest = hashlib.sha256(raw[:-2])
    digest.update(length)
    return [raw[:-2], length, _TAG + digest.hexdigest().encode()]


def _write(tmp: str, pieces: list) -> None:
    with open(tmp, "wb") as f:
        for p in pieces:
            f.write(p)


def _verify(path: Path, data: bytes) -> None:
    """The checksum of a file :func:`save_checkpoint` wrote; the members' CRC-32s of one written
    before checksums (torch's own zip: no comment). Anything else is damaged."""
    end = data[-_TRAILER - 22 : -_TRAILER]
    if len(data) >= _TRAILER + 22 and end[:4] == _END and end[-2:] == struct.pack("<H", _TRAILER):
        if data[-_TRAILER:] != _TAG + hashlib.sha256(memoryview(data)[:-_TRAILER]).hexdigest().encode():
            raise CheckpointError(
                f"checkpoint {path} is damaged: its contents do not match its SHA-256 checksum (a changed byte?)"
            )
        return
    if data[-22:-18] != _END or data[-2:] != b"\x00\x00":
        raise CheckpointError(f"checkpoint {path} is damaged: its zip end record or its checksum is altered")
    try:
        bad = zipfile.ZipFile(io.BytesIO(data)).testzip()
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint {path} is damaged: {_one_line(e)}") from None
    if bad is not None:
        raise CheckpointError(f"checkpoint {path} is damaged: {bad} does not match its CRC-32 (a changed byte?)")


def _scan(path: Path, data: bytes) -> None:
    """Every member stored whole within the file, then the pickle read without running it: only
    the calls a checkpoint makes, nothing larger than the file (:mod:`qmpc.pickle_scan`)."""
    try:
        infos = zipfile.ZipFile(io.BytesIO(data)).infolist()
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} is damaged: {_one_line(e)}") from None
    for i in infos:
        if i.compress_type != zipfile.ZIP_STORED or i.file_size != i.compress_size or i.file_size > len(data):
            raise CheckpointError(
                f"refusing checkpoint {path}: its member {i.filename} declares {i.file_size} bytes "
                f"({i.compress_size} stored) in a file of {len(data)} (crafted or corrupted?)"
            )
    prefix = infos[0].filename.split("/", 1)[0] + "/" if infos else ""
    pkl = [i for i in infos if i.filename == f"{prefix}data.pkl"]
    if not pkl:
        raise CheckpointError(f"expected {prefix}data.pkl in checkpoint {path}, got {[i.filename for i in infos][:5]}")
    records = {i.filename[len(prefix) + 5 :]: i.file_size for i in infos if i.filename.startswith(f"{prefix}data/")}
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        body = z.read(pkl[0])
    try:
        scan_pickle(body, records, len(data))
    except Disallowed as e:
        raise CheckpointError(_disallowed(path, f" ({e})")) from None
    except Oversized as e:
        raise CheckpointError(
            f"refusing checkpoint {path}: it declares {e}, in a file of {len(data)} bytes (crafted or corrupted?)"
        ) from None
    except Malformed as e:
        raise CheckpointError(f"expected a readable checkpoint at {path}, got a damaged pickle: {e}") from None


def _disallowed(path: Path, detail: str) -> str:
    return (
        f"refusing checkpoint {path}: it contains disallowed objects{detail}; a qmpc checkpoint holds "
        "only tensors and plain values (loading it could run code)"
    )


def _legacy_numpy_globals() -> list:
    """What checkpoints written before weights-only loading pickled besides tensors: float32 and
    float64 numpy arrays (replay buffer, MuJoCo state, the loop's state). Nothing that runs code."""
    from numpy._core.multiarray import _reconstruct

    return [np.ndarray, np.dtype, np.dtypes.Float32DType, np.dtypes.Float64DType, _reconstruct, bytes]


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint with ``torch.load(weights_only=True)``: tensors, plain Python values and
    float numpy arrays only, so a crafted file cannot run code; its checksum (or CRC-32s) verified
    and what it declares bounded by its size first; then check its structure, its ``spec`` and
    that every number in it is finite."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"expected a checkpoint file, got nothing at {path}")
    data = path.read_bytes()
    if not _is_zip(data):
        raise CheckpointError(
            f"expected a torch checkpoint at {path}, got {len(data)} bytes that are not one (truncated or corrupted?)"
        )
    _verify(path, data)
    _scan(path, data)
    ckpt = _read(path, data)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        got = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"expected a {FORMAT} checkpoint at {path}, got format {got!r}")
    for key, tp in (("spec", dict), ("network", dict), ("q", dict)):
        if not isinstance(ckpt.get(key), tp):
            raise CheckpointError(f"expected key {key!r} (a dict) in checkpoint {path}, got {sorted(ckpt)}")
    check_spec(ckpt["spec"], path)
    bad = _non_finite({k: v for k, v in ckpt.items() if k != "spec"})
    if bad:
        raise CheckpointError(f"expected finite numbers in checkpoint {path}, got NaN/Inf in {bad[:3]}")
    return ckpt


def _is_zip(data: bytes) -> bool:
    try:  # zipfile raises on some damaged end records instead of answering False
        return zipfile.is_zipfile(io.BytesIO(data))
    except (zipfile.BadZipFile, OSError, ValueError):
        return False


def _read(path: Path, data: bytes) -> Any:
    try:
        with torch.serialization.safe_globals(_legacy_numpy_globals()):
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e):
            what = re.search(r"(?:but got|GLOBAL) ([^\s]+)", str(e))
            detail = f" ({what.group(1).strip('<>')})" if what else ""
            raise CheckpointError(_disallowed(path, detail)) from None
        raise CheckpointError(f"expected a readable checkpoint at {path}, got: {_one_line(e)}") from None
    except Exception as e:  # torch raises several types for damaged archives
        raise CheckpointError(f"expected a readable checkpoint at {path}, got: {_one_line(e)}") from None


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: " + " ".join(str(e).split())[:300]


def _non_finite(obj: Any, where: str = "") -> list[str]:
    """Where ``obj`` (nested dicts, lists, tensors, arrays, numbers) holds NaN or Inf."""
    if isinstance(obj, dict):
        return [b for k, v in obj.items() for b in _non_finite(v, f"{where}.{k}" if where else str(k))]
    if isinstance(obj, list | tuple):
        return [b for i, v in enumerate(obj) for b in _non_finite(v, f"{where}[{i}]")]
    if isinstance(obj, torch.Tensor):
        ok = not (obj.is_floating_point() or obj.is_complex()) or bool(torch.isfinite(obj).all())
    elif isinstance(obj, np.ndarray):
        ok = obj.dtype.kind not in "fc" or bool(np.isfinite(obj).all())
    elif isinstance(obj, float):
        ok = math.isfinite(obj)
    else:
        ok = True
    return [] if ok else [where]


def check_spec(spec: dict, path: str | Path = "") -> None:
    """A checkpoint's ``spec``: ``env_id`` (str), ``obs_dim`` and ``act_dim`` (int >= 1), ``low`` and
    ``high`` (``act_dim`` numbers each, ``low <= high``, no NaN, no infinite bound equal to the other)."""
    where = f" in checkpoint {path}" if path else ""
    for key, tp in (("env_id", str), ("obs_dim", int), ("act_dim", int), ("low", list | tuple), ("high", list | tuple)):
        v = spec.get(key)
        if not isinstance(v, tp) or isinstance(v, bool) or (tp is int and v < 1):
            raise CheckpointError(f"expected spec.{key} to be {_KIND[key]}{where}, got {v!r}")
    for key in ("low", "high"):
        v = spec[key]
        if len(v) != spec["act_dim"] or not all(isinstance(b, int | float) and not isinstance(b, bool) for b in v):
            raise CheckpointError(f"expected spec.{key} to be {spec['act_dim']} numbers{where}, got {v!r}")
    try:
        check_bounds(np.asarray(spec["low"], float), np.asarray(spec["high"], float))
    except InputError as e:
        raise CheckpointError(f"{e}{where}") from None


_KIND = {
    "env_id": "a task id (string)",
    "obs_dim": "an integer >= 1",
    "act_dim": "an integer >= 1",
    "low": "a list of numbers",
    "high": "a list of numbers",
}


def check_bounds(low: np.ndarray, high: np.ndarray) -> None:
    """Action bounds a controller can work with: no NaN, ``low <= high``, and no component whose
    bounds are both the same infinity (``low = high = +inf`` fixes the action at infinity)."""
    if np.isnan(low).any() or np.isnan(high).any():
        raise InputError(f"expected action bounds without NaN, got low={low}, high={high}")
    if (low > high).any():
        raise InputError(f"expected action bounds low <= high, got low={low}, high={high}")
    if ((low == high) & ~np.isfinite(low)).any():
        raise InputError(f"expected finite action bounds where low = high, got low={low}, high={high}")


POLICY_KEYS = ("config", "spec", "network", "gamma", "cost_scale", "q", "model", "outcome", "behaviour")


def policy_of(ckpt: dict[str, Any]) -> dict[str, Any]:
    """The part of a training checkpoint that a controller needs (no optimiser, buffer or RNG
    state), plus where training stood: small enough to ship in ``models/``."""
    out = {k: ckpt[k] for k in POLICY_KEYS if k in ckpt}
    if "loop" in ckpt:
        out["trained_steps"] = ckpt["loop"]["step"]
        out["eval_returns"] = list(zip(ckpt["loop"]["eval_steps"], ckpt["loop"]["eval_returns"], strict=True))
    return out


def network_from_checkpoint(ckpt: dict[str, Any], dtype: torch.dtype = torch.float64) -> QNetwork:
    """Rebuild the Q network of a checkpoint and load its weights (every parameter and buffer
    finite, checked again here for checkpoints built in memory), in ``dtype``. The weights are
    loaded into a float64 network first: float64 weights are kept exactly (they were rounded to
    the float32 of a freshly built network before), float32 ones widened exactly."""
    spec, net = ckpt["spec"], ckpt["network"]
    if not isinstance(net.get("arch"), str):
        raise CheckpointError(f"expected network.arch (a string) in the checkpoint, got {net!r}")
    try:
        with torch.random.fork_rng(devices=[]):  # its initial weights are overwritten: draw nothing
            q = build_network(
                net["arch"], spec["obs_dim"], spec["act_dim"], **{k: v for k, v in net.items() if k != "arch"}
            )
    except (QmpcError, TypeError, ValueError) as e:
        raise CheckpointError(f"expected a buildable network {net}, got: {_one_line(e)}") from None
    q = q.to(torch.float64)
    state = dict(ckpt["q"])
    for name in ("obs_shift", "obs_transform"):  # written before input normalisation existed: identity
        state.setdefault(name, getattr(q, name))
    try:
        q.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as e:
        detail = " ".join(str(e).split())[:300]
        raise CheckpointError(f"expected weights matching {net}, got: {detail}") from None
    check_finite_module(q, "Q network")
    if "behaviour" in ckpt:  # offline, behaviour-regularised: the controller minimises Q̃
        q = _behaviour_regularized(ckpt, q)
    return q.to(dtype)


def _behaviour_regularized(ckpt: dict[str, Any], q: QNetwork) -> QNetwork:
    """``Q`` behind the checkpoint's behaviour penalty (:class:`BehaviourRegularizedQ`)."""
    b, spec = ckpt["behaviour"], ckpt["spec"]
    low, high = spec_arrays(spec)
    try:
        with torch.random.fork_rng(devices=[]):
            policy = BehaviourPolicy(spec["obs_dim"], spec["act_dim"], **b["kwargs"], low=low, high=high)
        policy.load_state_dict(b["state"])
        out = BehaviourRegularizedQ(q, policy.double(), float(b["weight"]))
    except (QmpcError, KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"expected a loadable behaviour policy in the checkpoint, got: {_one_line(e)}") from None
    check_finite_module(out, "behaviour-regularised Q network")
    return out


def check_finite_module(m: torch.nn.Module, what: str) -> None:
    """Every parameter and buffer of ``m`` finite (a NaN input normalisation poisons every step)."""
    bad = [
        n for n, t in (*m.named_parameters(), *m.named_buffers()) if t.is_floating_point() and not t.isfinite().all()
    ]
    if bad:
        raise CheckpointError(f"expected finite weights and buffers in the {what}, got NaN/Inf in {bad[:3]}")


def dynamics_from_checkpoint(ckpt: dict[str, Any]) -> DynamicsModel:
    """The learned dynamics model of a checkpoint (float64), or a clear error if it has none."""
    missing = "expected a checkpoint with a learned dynamics model (train with model.learn = true), got one without"
    return _saved_module(ckpt, "model", DynamicsModel, "dynamics model", missing)


def outcome_from_checkpoint(ckpt: dict[str, Any]) -> OutcomeModel:
    """The learned stage cost and termination heads of a checkpoint (float64), or a clear error if
    it has none (checkpoints written before they existed, or trained without ``model.learn``)."""
    missing = (
        "expected a checkpoint with a learned stage cost and termination (train with model.learn = true), "
        "got one without: use --stage-cost symbolic"
    )
    return _saved_module(ckpt, "outcome", OutcomeModel, "cost and termination heads", missing)


def _saved_module(ckpt: dict[str, Any], key: str, cls: type, what: str, missing: str):
    """``cls.from_state`` of ``ckpt[key] = {'kwargs': dict, 'state': dict}`` (float64, finite), every
    problem a one-line :class:`CheckpointError`."""
    if key not in ckpt:
        raise CheckpointError(missing)
    spec, saved = ckpt["spec"], ckpt[key]
    if (
        not isinstance(saved, dict)
        or not isinstance(saved.get("kwargs"), dict)
        or not isinstance(saved.get("state"), dict)
    ):
        shape = "{'kwargs': dict, 'state': dict}"
        raise CheckpointError(f"expected {key} = {shape} in the checkpoint, got something else")
    try:
        with torch.random.fork_rng(devices=[]):  # loading never moves the caller's torch RNG
            m = cls.from_state(spec["obs_dim"], spec["act_dim"], saved["kwargs"], saved["state"])
    except (QmpcError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(str(e) if isinstance(e, QmpcError) else _one_line(e)) from None
    check_finite_module(m, what)
    return m


def spec_arrays(spec: dict) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(spec["low"], float), np.asarray(spec["high"], float)
