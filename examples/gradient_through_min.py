"""The gradient of a TD loss through ``min_v Q(x⁺, v)``, three ways, on one batch.

    python examples/gradient_through_min.py

Shows that the ``residual`` gradient (through the min) by the envelope theorem equals the full
chain rule ``∂Q/∂θ + ∂Q/∂u · ∂u*/∂θ`` through the implicit ``∂u*/∂θ``, and how large the
``double``-Q gradient that flows through ``u*`` is.
"""

from __future__ import annotations

import argparse

import torch

import qmpc


def main(batch: int = 64) -> dict[str, float]:
    torch.manual_seed(0)
    q = qmpc.PICNN(obs_dim=4, act_dim=2, hidden=(32, 32)).double()
    q_target = qmpc.PICNN(obs_dim=4, act_dim=2, hidden=(32, 32)).double()
    layer = qmpc.ArgminLayer(q, low=-torch.ones(2), high=torch.ones(2))
    x, x_next = torch.randn(batch, 4, dtype=torch.float64), torch.randn(batch, 4, dtype=torch.float64)
    u, cost = 2 * torch.rand(batch, 2, dtype=torch.float64) - 1, torch.rand(batch, dtype=torch.float64)
    params = list(q.parameters())

    def grad(loss):  # the graph through u_star is used twice below: keep it
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params, retain_graph=True)])

    _, v_next = layer(x_next, grad_mode="envelope")  # ∂V/∂θ = ∂Q/∂θ at u*
    g_envelope = grad((q(x, u) - (cost + 0.99 * v_next)).pow(2).mean())
    u_star, _ = layer(x_next, grad_mode="implicit")  # ∂u*/∂θ from the KKT system
    g_chain = grad((q(x, u) - (cost + 0.99 * q(x_next, u_star))).pow(2).mean())  # full chain rule
    g_double = grad((q(x, u) - (cost + 0.99 * q_target(x_next, u_star))).pow(2).mean())
    res = {
        "|residual grad| (envelope)": float(g_envelope.norm()),
        "|chain rule - envelope|": float((g_chain - g_envelope).norm()),
        "|double-Q grad|": float(g_double.norm()),
        "failed solves": layer.last_result.num_failed,
    }
    for k, v in res.items():
        print(f"{k:<28} {v:.3e}")
    return res


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    main(ap.parse_args().batch)
