"""Issue 21 (steps to afford it): the implicit backward of a horizon-1 layer on the batched Newton's
path takes ∇²_u Q from the network's closed-form oracle instead of CasADi's per-sample Hessians.
CasADi's KKT system stays the reference: both give the same gradients."""

import numpy as np
import pytest
import torch

from qmpc.check import make_scenario
from qmpc.errors import InputError


def _grads(layer, x, casadi: bool):
    """``(∂(u*·w)/∂x, ∂(u*·w)/∂θ, ∂V/∂θ)`` of a fixed random seed ``w``, with the closed form or CasADi."""
    if casadi:
        layer.planner.action_hessian = lambda x64: None  # what the layer did before
    xg = x.clone().requires_grad_(True)
    u, v = layer(xg, grad_mode="implicit")
    w = torch.randn(u.shape, generator=torch.Generator().manual_seed(3), dtype=u.dtype)
    params = list(layer.q.parameters())
    gx, *gth = torch.autograd.grad((u * w).sum() + 0.3 * v.sum(), [xg, *params])
    return gx.numpy(), torch.cat([t.reshape(-1) for t in gth]).numpy()


@pytest.mark.parametrize("layer_norm", [False, True])
@pytest.mark.parametrize("bounds", ["inactive", "active", "mixed"])
def test_closed_form_hessian_backward_matches_casadi_kkt(bounds, layer_norm):
    layer, x = make_scenario("PICNN", bounds, 1, "newton", tol=1e-10, batch=16, layer_norm=layer_norm)
    assert layer.problem.batched and layer.planner.action_hessian(x.numpy()) is not None
    fast = _grads(layer, x, casadi=False)
    ref = _grads(layer, x, casadi=True)
    assert np.abs(ref[1]).max() > 1e-3  # the seed reaches the weights
    for a, b in zip(fast, ref, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-11)


def test_a_given_hessian_is_refused_where_the_problem_has_constraints():
    layer, x = make_scenario("PICNN", "mixed", 2, "sqpmethod", batch=2, nx=2, nu=1)
    P, res = layer.problem, layer.planner.solve(x.numpy())[0]
    assert P.n_g > 0
    with pytest.raises(InputError, match="without constraints g"):
        layer.planner.solver.adjoint(
            res,
            x.numpy(),
            layer.planner.problem_theta(),
            P.lbw,
            P.ubw,
            np.ones((2, P.n_w)),
            np.zeros((2, P.n_w, P.n_w)),
        )
