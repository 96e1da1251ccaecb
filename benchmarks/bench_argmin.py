"""Cost of the differentiable argmin, side by side in one process.

    python benchmarks/bench_argmin.py [--batch 256] [--repeats 5] [--hidden 64 64]

A HalfCheetah-sized ``PICNN(17, 6, hidden=(64, 64))``, bounds ±1, a batch of random states.
Rows: forward solve and backward of ``ArgminLayer`` in ``implicit`` and ``envelope`` mode (cold
start), ``implicit`` again with CasADi's per-sample Hessians in the backward (what the closed-form
Hessians of the network's oracle replaced), the same solve warm-started from the previous
solution, CasADi's own nlpsol reverse sensitivities with respect to all weights (the alternative
the tilt trick replaces), and a plain torch forward+backward of ``q`` on the same batch, which every ratio divides by.
Times are medians over ``--repeats`` runs, in milliseconds.
"""

from __future__ import annotations

import argparse
import statistics
import time

import casadi as ca
import numpy as np
import torch

import qmpc


def median_ms(fn, repeats: int) -> float:
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--hidden", type=int, nargs="+", default=[64, 64])
    ap.add_argument("--obs-dim", type=int, default=17)
    ap.add_argument("--act-dim", type=int, default=6)
    ap.add_argument("--casadi-reverse-samples", type=int, default=64, help="samples for the slow CasADi row")
    args = ap.parse_args()
    torch.manual_seed(0)
    B, nx, nu = args.batch, args.obs_dim, args.act_dim
    q = qmpc.PICNN(nx, nu, hidden=tuple(args.hidden))
    x = torch.randn(B, nx)
    low, high = -torch.ones(nu), torch.ones(nu)
    print(f"PICNN({nx}, {nu}, hidden={tuple(args.hidden)}): {q.num_parameters} weights; batch {B}; bounds ±1")
    print(f"casadi {ca.__version__}, torch {torch.__version__}, torch threads {torch.get_num_threads()}")

    rows: list[tuple[str, float]] = []

    # plain torch forward+backward of q on the same batch (the unit of every ratio)
    u0 = torch.rand(B, nu) * 2 - 1

    def torch_fb():
        q.zero_grad()
        q(x, u0).sum().backward()

    torch_fb()
    t_torch = median_ms(torch_fb, max(args.repeats, 20))

    layer = qmpc.ArgminLayer(q, low, high)
    layer(x, grad_mode="none")  # builds the batch maps (once per batch size) outside the timings

    # the implicit backward with CasADi's per-sample Hessians of the Lagrangian (before issue 21:
    # the closed-form ∇²_u Q of the network's oracle is the default), on another layer of the same q
    casadi_hessians = qmpc.ArgminLayer(q, low, high)
    casadi_hessians.planner.action_hessian = lambda x64: None
    casadi_hessians(x, grad_mode="none")
    for mode, lay in (("implicit", layer), ("envelope", layer), ("implicit, CasADi Hessians", casadi_hessians)):
        fwd, bwd = [], []
        for _ in range(args.repeats):
            xg = x.clone().requires_grad_(True)
            q.zero_grad()
            t0 = time.perf_counter()
            u, v = lay(xg, grad_mode=mode.split(",")[0])
            t1 = time.perf_counter()
            loss = v.sum() + (u.sum() if mode.startswith("implicit") else 0.0)
            loss.backward()
            t2 = time.perf_counter()
            fwd.append((t1 - t0) * 1e3)
            bwd.append((t2 - t1) * 1e3)
        fail = lay.last_result.num_failed
        rows.append((f"{mode}: forward (cold solve)", statistics.median(fwd)))
        rows.append((f"{mode}: backward", statistics.median(bwd)))
        rows.append((f"{mode}: forward + backward", statistics.median(fwd) + statistics.median(bwd)))
        if fail:
            print(f"warning: {fail} failed solves in {mode} mode")

    # warm start: repeated solves of the same batch from the previous solution
    warm = qmpc.ArgminLayer(q, low, high, warm_start=True)
    warm(x, grad_mode="none")
    rows.append(("warm-started forward (same batch)", median_ms(lambda: warm(x, grad_mode="none"), args.repeats)))
    cold = qmpc.ArgminLayer(q, low, high)
    cold(x, grad_mode="none")
    rows.append(("cold forward, same layer settings", median_ms(lambda: cold(x, grad_mode="none"), args.repeats)))

    # CasADi's own nlpsol reverse sensitivities with respect to all weights
    P, S = layer.problem, layer.solver
    xs, th = ca.MX.sym("x", nx), ca.MX.sym("theta", P.n_theta)
    su, sv = ca.MX.sym("su", nu), ca.MX.sym("sv")
    r = S.nlpsol(x0=0, p=ca.vertcat(xs, th), lbx=layer.lbw, ubx=layer.ubw)
    obj = ca.dot(su, r["x"][:nu]) + sv * r["f"]
    grad = ca.Function("casadi_reverse", [xs, th, su, sv], [ca.gradient(obj, ca.vertcat(xs, th))])
    n_rev = min(B, args.casadi_reverse_samples)
    mapped = grad.map("casadi_reverse_map", "serial", n_rev, [1], [])
    theta = ca.DM(q.flat_parameters())
    xn, sun, svn = x[:n_rev].double().numpy().T, np.ones((nu, n_rev)), np.ones((1, n_rev))
    mapped(xn, theta, sun, svn)
    t_rev = median_ms(lambda: mapped(xn, theta, sun, svn), max(1, args.repeats // 2)) * B / n_rev
    note = "" if n_rev == B else f", {n_rev} samples scaled to {B}"
    rows.append((f"CasADi nlpsol reverse, all weights (solve + sens; 1 thread{note})", t_rev))
    rows.append(("torch forward + backward of q (baseline)", t_torch))

    w = max(len(n) for n, _ in rows)
    print(f"\n{'':<{w}}  {'ms':>9}  {'× torch f+b':>11}  {'µs/sample':>9}")
    for name, ms in rows:
        print(f"{name:<{w}}  {ms:>9.2f}  {ms / t_torch:>11.1f}  {1e3 * ms / B:>9.1f}")
    fb = dict(rows)["implicit: forward + backward"]
    wr = dict(rows)["cold forward, same layer settings"] / dict(rows)["warm-started forward (same batch)"]
    print(f"\nimplicit forward+backward = {fb / t_torch:.0f}× torch forward+backward (issue 10 target ≤ 50×)")
    print(f"warm start speed-up on a repeated batch: {wr:.2f}×")


if __name__ == "__main__":
    main()
