"""Is Q's architecture what holds a run back? Fresh networks fitted to a training run's own TD targets.

    python benchmarks/bench_q_fit.py --checkpoint RUN/checkpoint.pt [--steps 20000]
                                     [--arms PICNN:64,64 PICNN:256,256 MLPQ:256,256]

Reads a training checkpoint (``checkpoint.pt`` of a run directory, which holds the replay buffer)
and freezes the one-step TD targets ``y = c + γ (1 − terminated) max_i Q'_i(x⁺, u*)`` of its
buffer: the run's target networks (the largest, with ``train.critics > 1``) at the argmin the run
last solved at ``x⁺`` (samples without one are left out). Each arm, a fresh network of that
architecture and width with the run's other network options, is then fitted to the targets by Adam
(the run's learning rate, batches of 256) on 90 % of the samples; the table gives the mean squared
error on 20 000 of those and on the held-out 10 % at a quarter, half and all of ``--steps``, next to
the run's own Q on the same targets. Targets are in Q's units (costs × ``train.cost_scale``). A
network that fits far better than the run's architecture points at capacity; arms alike point
elsewhere (the moving target, too few updates).
"""

from __future__ import annotations

import argparse
import time

import torch

from qmpc.checkpoint import load_checkpoint, network_from_checkpoint
from qmpc.networks import build_network


def frozen_targets(ckpt: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x (N, obs_dim), u (N, act_dim), y (N,))``: the buffer's samples with a cached argmin at x⁺."""
    b = ckpt["buffer"]
    n = int(b["size"])
    x, u, c, xn, term, un = (b[k][:n].double() for k in ("obs", "act", "cost", "next_obs", "terminated", "next_argmin"))
    keep = b["has_argmin"][:n].bool()
    targets = [ckpt["q_target"]]
    critics = ckpt.get("critic_targets") or {}
    for i in sorted({int(k.split(".")[0]) for k in critics}):
        targets.append({k.split(".", 1)[1]: v for k, v in critics.items() if k.startswith(f"{i}.")})
    with torch.no_grad():
        v = torch.stack([network(ckpt, t)(xn, un) for t in targets]).max(0).values
        y = c + float(ckpt["gamma"]) * (1.0 - term) * v
    return x[keep].float(), u[keep].float(), y[keep].float()


def network(ckpt: dict, state: dict, dtype: torch.dtype = torch.float64):
    """The checkpoint's Q architecture with the weights ``state``, without an offline run's behaviour
    penalty: the run's TD targets score the argmin on Q itself."""
    return network_from_checkpoint({**{k: v for k, v in ckpt.items() if k != "behaviour"}, "q": state}, dtype)


def fit(q, x, u, y, train, test, steps: int, lr: float) -> list[tuple[int, float, float, float]]:
    """Adam on ``train``'s indices; ``(step, train MSE, held-out MSE, seconds)`` at steps/4, /2, 1."""
    opt, rows, t0 = torch.optim.Adam(q.parameters(), lr), [], time.perf_counter()
    gen = torch.Generator().manual_seed(0)
    for it in range(1, steps + 1):
        i = train[torch.randint(len(train), (256,), generator=gen)]
        loss = ((q(x[i], u[i]) - y[i]) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if it in (steps // 4, steps // 2, steps):
            rows.append((it, mse(q, x, u, y, train[:20000]), mse(q, x, u, y, test), time.perf_counter() - t0))
    return rows


def mse(q, x, u, y, idx) -> float:
    with torch.no_grad():
        return float(((q(x[idx], u[idx]) - y[idx]) ** 2).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="a run's checkpoint.pt (with its replay buffer)")
    ap.add_argument("--steps", type=int, default=20000)
    ap.add_argument("--arms", nargs="+", default=["PICNN:64,64", "PICNN:256,256", "MLPQ:256,256"])
    args = ap.parse_args()
    torch.set_num_threads(1)
    ckpt = load_checkpoint(args.checkpoint)
    if "buffer" not in ckpt:
        raise SystemExit(f"expected a training checkpoint with a replay buffer, got none in {args.checkpoint}")
    x, u, y = frozen_targets(ckpt)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    test, train = perm[: len(y) // 10], perm[len(y) // 10 :]
    own = network(ckpt, ckpt.get("q_train", ckpt["q"]), torch.float32)  # "q" is the average with train.policy_average
    print(f"{args.checkpoint}: {len(y)} targets, mean {y.mean():.3f}, std {y.std():.3f} (Q's units)")
    print(
        f"the run's Q ({ckpt['network']['arch']} {ckpt['network']['hidden']}): "
        f"train {mse(own, x, u, y, train[:20000]):.4f}, held-out {mse(own, x, u, y, test):.4f}"
    )
    print("| arm | parameters | step | train MSE | held-out MSE | s |\n|---|---|---|---|---|---|")
    net = {k: v for k, v in ckpt["network"].items() if k not in ("arch", "hidden")}
    for arm in args.arms:
        arch, widths = arm.split(":")
        torch.manual_seed(0)
        options = {**net, "layer_norm": net.get("layer_norm", False) and arch == "PICNN"}
        q = build_network(arch, x.shape[1], u.shape[1], [int(w) for w in widths.split(",")], **options)
        n_par = sum(p.numel() for p in q.parameters())
        for step, tr, te, s in fit(q, x, u, y, train, test, args.steps, float(ckpt["config"]["train"]["lr"])):
            print(f"| {arm} | {n_par} | {step} | {tr:.4f} | {te:.4f} | {s:.0f} |", flush=True)


if __name__ == "__main__":
    main()
