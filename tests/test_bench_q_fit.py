"""``benchmarks/bench_q_fit.py``: fresh networks fitted to a run's frozen TD targets (a tiny budget)."""

import subprocess
import sys
from pathlib import Path

import torch
from test_resume_exact import TINY

from qmpc.checkpoint import load_checkpoint, network_from_checkpoint
from qmpc.config import load_config
from qmpc.trainer import train

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_q_fit  # noqa: E402


def test_frozen_targets_bootstrap_from_the_largest_target_critic_at_the_cached_argmin(tmp_path):
    cfg = load_config(ROOT / "launch" / "inverted_pendulum.toml", [f"run_dir={tmp_path}", *TINY, "train.critics=2"])
    train(cfg, progress=False)
    ck = load_checkpoint(tmp_path / "checkpoint.pt")
    x, _, y = bench_q_fit.frozen_targets(ck)
    # an offline run's behaviour penalty is not part of its targets (this one is not even loadable)
    torch.testing.assert_close(bench_q_fit.frozen_targets({**ck, "behaviour": {"weight": 1.0}})[2], y, rtol=0, atol=0)
    b = ck["buffer"]
    keep = b["has_argmin"][: b["size"]].bool()
    assert 0 < len(y) == int(keep.sum()) and torch.isfinite(y).all()
    torch.testing.assert_close(x, b["obs"][: b["size"]][keep])
    # with the first target network alone the targets are no larger, and smaller somewhere: the max is taken
    xn, un = b["next_obs"][: b["size"]][keep].double(), b["next_argmin"][: b["size"]][keep]
    c, term = b["cost"][: b["size"]][keep].double(), b["terminated"][: b["size"]][keep].double()
    with torch.no_grad():
        one = c + ck["gamma"] * (1 - term) * network_from_checkpoint({**ck, "q": ck["q_target"]})(xn, un)
    assert (y.double() >= one.float().double() - 1e-5).all() and (y.double() > one + 1e-4).any()

    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_q_fit.py"), "--checkpoint", str(tmp_path / "checkpoint.pt"),
         "--steps", "8", "--arms", "PICNN:8,8", "MLPQ:8"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert f": {len(y)} targets," in out.stdout and "the run's Q (PICNN [" in out.stdout
    assert sum(line.startswith(("| PICNN:8,8 |", "| MLPQ:8 |")) for line in out.stdout.splitlines()) == 6
    refused = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_q_fit.py"), "--checkpoint", str(tmp_path / "policy.pt")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert refused.returncode != 0 and "expected a training checkpoint with a replay buffer" in refused.stderr
