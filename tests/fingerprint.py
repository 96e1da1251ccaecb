"""Fingerprint of a training run: a SHA-256 of every tensor of its final checkpoint's networks
(Q, target, dynamics model, optimisers) and its evaluation returns, to prove a refactor
bit-identical: run it with the same launch file and overrides on the code before and after the
change (each with its own ``run_dir``) and compare the two JSON files, which must be identical.

Bit for bit only on the same machine: the same code and library versions on two machines of this
project differ in the last digits (TD losses by 2e-7, an evaluation return by 5e-10, relative; not
through numpy's, OpenBLAS's or torch's own SIMD dispatch, which give the same bits here when forced
down to AVX2; probably MKL's kernels inside torch, which follow the CPU: forced to AVX2 they change
the bits here). So the fingerprint also carries per-tensor sums of the final weights
(``weight_sums``) and names the kernels it ran on (``machine``, for the record: MKL's path is not
among them); tests/test_bit_identical.py compares the numbers to a tolerance.

    python tests/fingerprint.py launch/inverted_pendulum.toml [--set key=value ...] --out FP.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from qmpc.checkpoint import load_checkpoint
from qmpc.config import load_config
from qmpc.trainer import read_metrics, train


def digest(obj) -> str:
    """SHA-256 of the raw bytes of every tensor/array in ``obj`` (nested dicts/lists, key order)."""
    h = hashlib.sha256()

    def walk(o, key=""):
        if isinstance(o, dict):
            for k in sorted(o, key=str):
                walk(o[k], f"{key}/{k}")
        elif isinstance(o, list | tuple):
            for i, v in enumerate(o):
                walk(v, f"{key}/{i}")
        elif isinstance(o, torch.Tensor):
            h.update(key.encode())
            h.update(o.detach().cpu().contiguous().numpy().tobytes())
        elif isinstance(o, np.ndarray):
            h.update(key.encode())
            h.update(np.ascontiguousarray(o).tobytes())
        elif isinstance(o, int | float | bool | str) or o is None:
            h.update(f"{key}={o!r}".encode())

    walk(obj)
    return h.hexdigest()


def machine() -> str:
    """The SIMD kernels this process computes with: torch's CPU capability, OpenBLAS's core type
    (numpy's BLAS) and numpy's highest dispatched CPU feature."""
    import threadpoolctl
    from numpy._core._multiarray_umath import __cpu_dispatch__, __cpu_features__

    blas = [i.get("architecture") for i in threadpoolctl.threadpool_info() if i.get("internal_api") == "openblas"]
    npy = [f for f in __cpu_dispatch__ if __cpu_features__.get(f)]
    return f"torch {torch.backends.cpu.get_cpu_capability()}, openblas {blas[0] if blas else None}, numpy {npy[-1:]}"


def weight_sums(obj) -> list[float]:
    """Sum and sum of absolute values of every tensor in ``obj`` (the order of :func:`digest`), in float64."""
    out: list[float] = []

    def walk(o):
        if isinstance(o, dict):
            for k in sorted(o, key=str):
                walk(o[k])
        elif isinstance(o, torch.Tensor) and o.is_floating_point():
            t = o.detach().double()
            out.extend((float(t.sum()), float(t.abs().sum())))

    walk(obj)
    return out


def fingerprint(launch: str, overrides: list[str]) -> dict:
    """Train ``launch`` with ``overrides`` and fingerprint the run."""
    cfg = load_config(launch, overrides)
    s = train(cfg, progress=False)
    return run_fingerprint(s.run_dir)


def run_fingerprint(run_dir: str | Path) -> dict:
    """The fingerprint of the run in ``run_dir`` as it is (its final checkpoint and metrics)."""
    ck = load_checkpoint(Path(run_dir) / "checkpoint.pt")
    m = read_metrics(Path(run_dir) / "metrics.csv")
    out = {
        "eval_steps": [int(v) for v in ck["loop"]["eval_steps"]],
        "eval_returns": [float(v) for v in ck["loop"]["eval_returns"]],
        "q": digest(ck["q"]),
        "q_target": digest(ck["q_target"]),
        "optimizer": digest(ck["optimizer"]["state"]),
        "model": digest(ck["model"]["state"]) if "model" in ck else None,
        "td_loss": [float(v) for v in m["train/td_loss"][1]] if "train/td_loss" in m else [],
        "machine": machine(),
        "weight_sums": weight_sums({"q": ck["q"], "q_target": ck["q_target"]}),
    }
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("launch")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    fp = fingerprint(a.launch, a.set)
    Path(a.out).write_text(json.dumps(fp, indent=1))
    print(json.dumps({k: v for k, v in fp.items() if k != "td_loss"}, indent=1))
