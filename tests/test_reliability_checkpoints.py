"""Issue 20 (reliability, round 2), items 1-3: a checkpoint carries a SHA-256 checksum (a flipped
bit anywhere is refused), declares no more memory than it holds, loads float64 weights exactly, and
a full disk when writing one is a one-line error that leaves the previous checkpoint intact."""

import errno
import io
import os
import resource
import signal
import struct
import subprocess
import sys
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import qmpc
from qmpc.checkpoint import (
    FORMAT,
    CheckpointError,
    dynamics_from_checkpoint,
    load_checkpoint,
    network_from_checkpoint,
    save_checkpoint,
)
from qmpc.dynamics import DynamicsModel
from qmpc.errors import OutputError
from qmpc.networks import build_network

ROOT = Path(__file__).resolve().parents[1]
SPEC = {"env_id": "qmpc/PointMass-v0", "obs_dim": 4, "act_dim": 2, "low": [-2.0, -2.0], "high": [2.0, 2.0]}
NET = {"arch": "QuadraticQ", "hidden": [8], "activation": "tanh"}


def _policy(dtype=torch.float32, seed=0) -> dict:
    """A small valid policy checkpoint (as a dict) whose weights are random numbers of ``dtype``."""
    torch.manual_seed(seed)
    q = build_network("QuadraticQ", 4, 2, hidden=[8], activation="tanh").to(dtype)
    with torch.no_grad():
        for p in q.parameters():
            p.copy_(torch.randn(p.shape, dtype=torch.float64))
    rng = np.random.default_rng(seed)
    q.set_input_normalization(rng.normal(size=4), np.diag(rng.uniform(0.5, 2.0, 4)))
    return {"spec": dict(SPEC), "network": dict(NET), "gamma": 0.9, "q": q.state_dict()}


def _one_line(e: pytest.ExceptionInfo, path) -> str:
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg, msg
    return msg


# ---------------------------------------------------------------------------------------
# Item 1: integrity (a flipped bit anywhere) and declared sizes
# ---------------------------------------------------------------------------------------


def _regions(raw: bytes) -> dict[str, range]:
    """Byte ranges of a checkpoint: each member's data (by name), the central directory, the end."""
    out: dict[str, range] = {}
    for info in zipfile.ZipFile(io.BytesIO(raw)).infolist():
        n, m = struct.unpack("<HH", raw[info.header_offset + 26 : info.header_offset + 30])
        start = info.header_offset + 30 + n + m
        out[info.filename.split("/", 1)[1]] = range(start, start + info.compress_size)
    end = raw.rfind(b"PK\x05\x06")
    out["central directory"] = range(raw.find(b"PK\x01\x02"), end)
    out["end record and checksum"] = range(end, len(raw))
    return out


def test_a_flipped_bit_anywhere_is_a_checkpoint_error(tmp_path):
    """torch checks no CRC: a flipped bit in a weight, the pickle or the zip directory loaded
    silently (one bit of a normalisation entry turned a return of −47 into −963)."""
    path = tmp_path / "p.pt"
    save_checkpoint(path, _policy())
    raw = path.read_bytes()
    regions = _regions(raw)
    tensor = [r for name, r in regions.items() if name.startswith("data/")]
    assert tensor and len(regions["data.pkl"]) > 100 and len(regions["central directory"]) > 100
    loaded = []
    for i in range(len(raw)):
        b = bytearray(raw)
        b[i] ^= 1 << (i % 8)
        path.write_bytes(bytes(b))
        try:
            load_checkpoint(path)
            loaded.append(i)
        except CheckpointError as e:
            assert "\n" not in str(e) and str(path) in str(e), str(e)
    where = {name: [i for i in loaded if i in r] for name, r in regions.items()}
    assert not loaded, {k: v[:5] for k, v in where.items() if v}
    path.write_bytes(raw)
    network_from_checkpoint(load_checkpoint(path))  # the intact file still loads


def test_checkpoints_without_a_checksum_are_checked_by_their_crcs(tmp_path):
    """Files written before the checksum (plain ``torch.save``, like ``models/*.pt``) still load;
    a flipped bit in their tensor data or pickle is caught by the zip's CRC-32s."""
    path = tmp_path / "old.pt"
    torch.save({"format": FORMAT, **_policy()}, path)
    raw = path.read_bytes()
    network_from_checkpoint(load_checkpoint(path))
    regions = _regions(raw)
    positions = [i for name, r in regions.items() if name == "data.pkl" or name.startswith("data/") for i in r]
    cd_start = raw.find(b"PK\x01\x02")
    positions += [cd_start + 16 + k for k in range(4)]  # the first member's CRC in the directory
    assert len(positions) > 300 and zipfile.ZipFile(io.BytesIO(raw)).testzip() is None
    for i in positions:
        b = bytearray(raw)
        b[i] ^= 1 << (i % 8)
        path.write_bytes(bytes(b))
        with pytest.raises(CheckpointError) as e:
            load_checkpoint(path)
        _one_line(e, path)


@pytest.mark.parametrize("path", sorted((ROOT / "models").glob("*.pt")), ids=lambda p: p.name)
def test_shipped_models_still_load(path):
    ckpt = load_checkpoint(path)
    network_from_checkpoint(ckpt)


def _long1(n: int) -> bytes:
    b = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(b)]) + b


def _unicode(s: str) -> bytes:
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


SENTINEL = "qmpc-test-sentinel-value"
N = 2**26  # 512 MiB of float64, 64 MiB of bytes
CRAFTED = {
    # np.ndarray(shape, dtype) called directly: numpy allocates (uninitialised) memory
    "ndarray": b"cnumpy\nndarray\n" + _long1(N) + b"\x85cnumpy\ndtype\n" + _unicode("f8") + b"\x89\x88\x87R\x86R",
    "ndarray-93GiB": b"cnumpy\nndarray\n"
    + _long1(12_500_000_000)
    + b"\x85cnumpy\ndtype\n"
    + _unicode("f8")
    + b"\x89\x88\x87R\x86R",
    # numpy's own constructor with a huge shape
    "reconstruct": b"cnumpy._core.multiarray\n_reconstruct\ncnumpy\nndarray\n"
    + _long1(N)
    + b"\x85c_codecs\nencode\n"
    + _unicode("d")
    + _unicode("latin1")
    + b"\x86R\x87R",
    # bytes(n): n zero bytes
    "bytes": b"c__builtin__\nbytes\n" + _long1(8 * N) + b"\x85R",
    "bytearray": b"c__builtin__\nbytearray\n" + _long1(8 * N) + b"\x85R",
    # a storage called with a size: torch allocates it
    "storage": b"ctorch.storage\nUntypedStorage\n" + _long1(8 * N) + b"\x85R",
}


def _crafted(tmp_path: Path, ops: bytes) -> Path:
    """A valid checkpoint (CRCs right, no checksum) whose extra key's value is the pickle ``ops``."""
    buf = io.BytesIO()
    torch.save({"format": FORMAT, **_policy(), "extra": SENTINEL}, buf)
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    out = tmp_path / "crafted.pt"
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        for info in src.infolist():
            body = src.read(info.filename)
            if info.filename.endswith("data.pkl"):
                assert body.count(_unicode(SENTINEL)) == 1
                body = body.replace(_unicode(SENTINEL), ops)
            z.writestr(info.filename, body)
    assert out.stat().st_size < 20_000
    return out


@pytest.mark.parametrize("kind", sorted(CRAFTED))
def test_a_small_file_declaring_a_huge_array_is_refused_before_allocating(tmp_path, kind):
    """A 5 KB checkpoint declaring a 93 GiB array raised numpy's _ArrayMemoryError; a smaller
    declaration was allocated (and filled by the finiteness check) before anything refused it."""
    path = _crafted(tmp_path, CRAFTED[kind])
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError) as e:
            load_checkpoint(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 32 * 2**20, f"{peak / 2**20:.0f} MiB allocated while loading"
    _one_line(e, path)


def test_a_crafted_object_array_cannot_crash_the_loader(tmp_path):
    """numpy's own constructor (allowed for older checkpoints) given an object dtype and a short
    list for 2**26 elements: a segmentation fault inside ``torch.load(weights_only=True)``."""
    ops = (
        b"cnumpy._core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85c_codecs\nencode\n"
        + _unicode("b")
        + _unicode("latin1")
        + b"\x86R\x87R(K\x01"
        + _long1(N)
        + b"\x85cnumpy\ndtype\n"
        + _unicode("O")
        + b"\x89\x88\x87R\x89]G?\xf0\x00\x00\x00\x00\x00\x00atb"
    )
    path = _crafted(tmp_path, ops)
    code = (
        "import sys\nfrom qmpc.checkpoint import CheckpointError, load_checkpoint\n"
        f"try:\n    load_checkpoint({str(path)!r})\nexcept CheckpointError as e:\n    print(e)\n    sys.exit(3)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(qmpc.__file__).parents[1])}  # the qmpc under test
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 3, (run.returncode, run.stderr[-500:])
    assert str(path) in run.stdout and run.stdout.count("\n") == 1, run.stdout


def test_a_tensor_declaring_more_elements_than_its_storage_is_refused(tmp_path):
    """A stride-0 tensor of 2**26 elements on a storage of one (a 1 KB file): its finiteness check
    alone allocated 64 MiB."""
    path = tmp_path / "expanded.pt"
    save_checkpoint(path, {**_policy(), "extra": torch.zeros(1).expand(N)})
    assert path.stat().st_size < 20_000
    with pytest.raises(CheckpointError, match="elements") as e:
        load_checkpoint(path)
    _one_line(e, path)


def test_a_storage_declaring_more_than_its_record_is_refused(tmp_path):
    """A storage's declared size is checked against its member's real size (torch checks it too)."""
    buf = io.BytesIO()
    torch.save({"format": FORMAT, **_policy()}, buf)
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    pkl = src.read("archive/data.pkl")
    j = pkl.index(_unicode("cpu")) + len(_unicode("cpu"))
    j += {ord("q"): 2, ord("r"): 5}.get(pkl[j], 0)  # its memo entry
    width = {ord("K"): 2, ord("M"): 3, ord("J"): 5}[pkl[j]]  # the storage's size: BININT1/2/BININT
    pkl = pkl[:j] + _long1(N) + pkl[j + width :]
    out = tmp_path / "storage.pt"
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        for info in src.infolist():
            z.writestr(info.filename, pkl if info.filename.endswith("data.pkl") else src.read(info.filename))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(out)
    _one_line(e, out)


def test_legitimate_contents_still_load(tmp_path):
    """Numpy arrays (older checkpoints), parameters, nested containers, empty and large tensors."""
    ckpt = {
        **_policy(),
        "buffer": {"obs": np.arange(12, dtype=np.float32).reshape(3, 4), "cost": np.ones(3), "empty": np.zeros(0)},
        "param": torch.nn.Parameter(torch.ones(3)),
        "big": torch.arange(50_000, dtype=torch.float64),
        "ints": torch.arange(5),
        "flags": torch.zeros(4, dtype=torch.bool),
        "view": torch.arange(10.0)[2:7],
        "rng": torch.get_rng_state(),
        "nested": [(1, 2.5, "x", None, True), {"k": b""}],
    }
    path = tmp_path / "ok.pt"
    save_checkpoint(path, ckpt)
    got = load_checkpoint(path)
    np.testing.assert_array_equal(got["buffer"]["obs"], ckpt["buffer"]["obs"])
    assert torch.equal(got["big"], ckpt["big"]) and torch.equal(got["view"], ckpt["view"])
    assert got["nested"] == ckpt["nested"]


# ---------------------------------------------------------------------------------------
# Item 2: float64 checkpoints stay float64
# ---------------------------------------------------------------------------------------


def test_float64_weights_load_exactly(tmp_path):
    """They were rounded to float32 on the way (up to 1.7e-7), so ``qmpc run`` did not use them."""
    ckpt = _policy(torch.float64)
    assert any((v != v.float().double()).any() for v in ckpt["q"].values())
    model = DynamicsModel(4, 2, hidden=(8,)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, dtype=torch.float64))
    ckpt["model"] = {"kwargs": model.kwargs(), "state": model.state_dict()}
    path = tmp_path / "f64.pt"
    save_checkpoint(path, ckpt)
    loaded = load_checkpoint(path)
    q = network_from_checkpoint(loaded)
    for k, v in ckpt["q"].items():
        assert q.state_dict()[k].dtype == torch.float64 and torch.equal(q.state_dict()[k], v), k
    m = dynamics_from_checkpoint(loaded)
    for k, v in model.state_dict().items():
        assert torch.equal(m.state_dict()[k], v), k
    ctrl = qmpc.Controller.from_checkpoint(path)
    for k, v in ckpt["q"].items():
        assert torch.equal(ctrl.q.state_dict()[k], v), k


def test_float32_checkpoints_load_as_before():
    """A float32 checkpoint gives the same float64 network as before (exact widening)."""
    ckpt = _policy(torch.float32)
    q = network_from_checkpoint(ckpt)
    for k, v in ckpt["q"].items():
        assert torch.equal(q.state_dict()[k], v.double()), k
    assert network_from_checkpoint(ckpt, dtype=torch.float32).obs_shift.dtype == torch.float32


# ---------------------------------------------------------------------------------------
# Item 3: a full disk at a checkpoint
# ---------------------------------------------------------------------------------------


@pytest.fixture
def previous(tmp_path):
    path = tmp_path / "run" / "checkpoint.pt"
    save_checkpoint(path, _policy(seed=1))
    return path, path.read_bytes()


def _intact(path: Path, before: bytes) -> None:
    assert path.read_bytes() == before
    load_checkpoint(path)
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temporary file left


def test_a_write_that_fails_mid_file_is_a_one_line_output_error(previous):
    """The write hits the OS limit mid-file (here RLIMIT_FSIZE, EFBIG; a full disk is ENOSPC): a
    raw ``RuntimeError: [enforce fail at inline_container.cc…]`` before."""
    path, before = previous
    big = {**_policy(), "buffer": {"obs": torch.randn(100_000, 4)}}
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, hard))
    try:
        with pytest.raises(OutputError) as e:
            save_checkpoint(path, big)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)
    msg = _one_line(e, path)
    assert "could not write" in msg and os.strerror(errno.EFBIG) in msg, msg
    _intact(path, before)


def test_disk_full_at_fsync_is_a_one_line_output_error(previous, monkeypatch):
    """ENOSPC reported when the data is flushed (delayed allocation): a raw OSError before."""
    path, before = previous

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OutputError) as e:
        save_checkpoint(path, _policy())
    monkeypatch.undo()
    msg = _one_line(e, path)
    assert "disk full" in msg and "No space left on device" in msg, msg
    _intact(path, before)
