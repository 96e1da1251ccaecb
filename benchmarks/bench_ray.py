"""Per-batch cost of the Ray backend against threads, side by side in one process.

    pip install -e ".[ray]"
    python benchmarks/bench_ray.py [--reps 10] [--address HOST:PORT]

For each problem (a batch of ``argmin_u Q`` solves with their backward, as in a TD loss) and each
backend × worker count, the median wall time of one forward + backward over ``--reps`` calls
(after two warm-up calls that start the actors and send the weights). The weights change
before every call, as in training, so each call also pays for sending them. Without
``--address`` Ray runs locally with this machine's cores; with it, on that cluster, e.g. two
nodes on one machine::

    ray start --head --num-cpus 1 --port 6380
    ray start --address 127.0.0.1:6380 --num-cpus 1
    python benchmarks/bench_ray.py --address 127.0.0.1:6380
    ray stop

The table also says on how many Ray nodes the actors ran.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from qmpc.bridge import ArgminLayer
from qmpc.check import linear_model
from qmpc.distributed import connect
from qmpc.networks import PICNN

PROBLEMS = {
    # name: (obs_dim, act_dim, hidden, horizon, batch, newton)
    "IP-size H=1, plugin, B=256": (4, 1, [64, 64], 1, 256, False),
    "HC-size H=1, Newton, B=256": (17, 6, [128, 128], 1, 256, True),
    "IP-size H=3, plugin, B=64": (4, 1, [64, 64], 3, 64, False),
}


def time_layer(layer: ArgminLayer, x: torch.Tensor, reps: int) -> float:
    """Median ms of forward + backward, the weights nudged before each call."""
    times = []
    for k in range(reps + 2):
        with torch.no_grad():
            for p in layer.q.parameters():
                p.add_(1e-4 * torch.randn_like(p))
        layer.q.zero_grad()
        t0 = time.perf_counter()
        u, v = layer(x)
        (u.sum() + v.sum()).backward()
        if k >= 2:
            times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--address", default=None, help="a running Ray cluster (default: a local Ray)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()
    torch.set_num_threads(1)
    ray = connect(args.address)
    nodes = [n for n in ray.nodes() if n["Alive"]]
    print(f"Ray: {len(nodes)} node(s), {ray.cluster_resources().get('CPU', 0):g} CPUs; median of {args.reps} calls")
    head = f"{'problem':<28} {'workers':>7} {'threads ms':>11} {'ray ms':>9} {'ray − threads':>14}"
    head += f" {'ratio':>6} {'nodes':>6}"
    print(head + "\n" + "-" * len(head))
    for name, (nx, nu, hidden, H, B, newton) in PROBLEMS.items():
        torch.manual_seed(0)
        q = PICNN(nx, nu, hidden).double()
        f, c = linear_model(nx, nu, 0)[:2]
        kw = dict(horizon=H, dynamics=f, stage_cost=c, discount=0.9, newton=newton)
        x = torch.randn(B, nx, dtype=torch.float64)
        for w in args.workers:
            threads = ArgminLayer(q, -1.0, 1.0, workers=w, **kw)
            on_ray = ArgminLayer(q, -1.0, 1.0, workers=w, backend="ray", **kw)
            t_threads = time_layer(threads, x, args.reps)
            t_ray = time_layer(on_ray, x, args.reps)
            used = len({ray.get(a.node_id.remote()) for a in on_ray.solver.runner._actors})
            print(
                f"{name:<28} {w:>7} {t_threads:>11.1f} {t_ray:>9.1f} {t_ray - t_threads:>+14.1f} "
                f"{t_ray / t_threads:>6.2f} {used:>6}",
                flush=True,
            )
            on_ray.planner.close()


if __name__ == "__main__":
    main()
