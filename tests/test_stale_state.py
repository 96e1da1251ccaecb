"""The layer and the controller act on the network as it is now, however its values were changed,
and the backward has no side effects and never drops a gradient silently (issue 9, item 4)."""

import numpy as np
import pytest
import torch
from torch import nn

import qmpc


def _quadratic(center=(0.3, -0.2), dtype=torch.float64) -> qmpc.QuadraticQ:
    """Q(x, u) = ½ (u − μ)ᵀ D (u − μ) + …, μ = x̃ + mu.bias: at x = 0 the argmin is
    ``clip(mu.bias − obs_shift)``."""
    q = qmpc.QuadraticQ(2, 2, hidden=(), diagonal=True, state_dependent_curvature=False).to(dtype)
    with torch.no_grad():
        q.mu.weight.copy_(torch.eye(2))
        q.mu.bias.copy_(torch.tensor(center))
    return q


X = torch.zeros(3, 2, dtype=torch.float64)


def _fresh_argmin(q) -> np.ndarray:
    u, _ = qmpc.ArgminLayer(q, -1.0, 1.0, grad_mode="none")(X)
    return u.numpy()


def _changes():
    """Ways users change a network's values that do not all bump torch's version counters."""

    def data_copy(q):  # how a Polyak update is often written
        q.mu.bias.data.copy_(torch.tensor([-0.5, 0.6], dtype=q.mu.bias.dtype))

    def data_setitem(q):
        q.mu.bias.data[...] = torch.tensor([-0.5, 0.6])

    def replace_parameter(q):
        q.mu.bias = nn.Parameter(torch.tensor([-0.5, 0.6], dtype=q.mu.weight.dtype))

    def load_state_dict(q):
        sd = q.state_dict()
        sd["mu.bias"] = torch.tensor([-0.5, 0.6])
        q.load_state_dict(sd)

    def normalization_buffer(q):  # x̃ = T (x − shift)
        q.set_input_normalization(np.array([0.5, -0.6]), np.eye(2))

    def buffer_data_copy(q):
        q.obs_shift.data.copy_(torch.tensor([0.5, -0.6]))

    return [data_copy, data_setitem, replace_parameter, load_state_dict, normalization_buffer, buffer_data_copy]


@pytest.mark.parametrize("bake", [False, True], ids=["theta", "baked"])
@pytest.mark.parametrize("change", _changes(), ids=lambda f: f.__name__)
def test_layer_follows_every_change_of_the_network(change, bake):
    q = _quadratic()
    kw = {"grad_mode": "none", "bake_weights": True} if bake else {}
    layer = qmpc.ArgminLayer(q, -1.0, 1.0, **kw)
    u0, _ = layer(X)
    np.testing.assert_allclose(u0.detach().numpy(), [[0.3, -0.2]] * 3, atol=1e-8)
    change(q)
    u1, _ = layer(X)
    expected = _fresh_argmin(q)
    assert np.abs(expected[0] - [0.3, -0.2]).max() > 0.1  # the change moved the argmin
    np.testing.assert_allclose(u1.detach().numpy(), expected, atol=1e-8)


@pytest.mark.parametrize("change", _changes(), ids=lambda f: f.__name__)
def test_controller_follows_every_change_of_the_network(change):
    q = _quadratic()
    ctrl = qmpc.Controller(q, -np.ones(2), np.ones(2))
    np.testing.assert_allclose(ctrl.act(np.zeros(2))[0], [0.3, -0.2], atol=1e-8)
    change(q)
    np.testing.assert_allclose(ctrl.act(np.zeros(2))[0], _fresh_argmin(q)[0], atol=1e-8)
    assert np.abs(_fresh_argmin(q)[0] - [0.3, -0.2]).max() > 0.1


def test_gradients_use_the_replaced_parameter():
    q = _quadratic()
    layer = qmpc.ArgminLayer(q, -1.0, 1.0)
    layer(X)
    q.mu.bias = nn.Parameter(torch.tensor([0.1, 0.2], dtype=torch.float64))
    u, _ = layer(X)
    (g,) = torch.autograd.grad(u.sum(), [q.mu.bias])  # ∂ clip(μ) / ∂μ = 1 inside the box, per row
    np.testing.assert_allclose(g.numpy(), [3.0, 3.0], atol=1e-8)


def test_a_changed_shape_is_a_clear_error():
    q = _quadratic()
    layer = qmpc.ArgminLayer(q, -1.0, 1.0)
    q.mu.bias = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    with pytest.raises(qmpc.InputError, match="parameter shapes"):
        layer(X)


def test_nan_buffer_is_refused():
    q = _quadratic()
    layer = qmpc.ArgminLayer(q, -1.0, 1.0)
    q.obs_transform.data[0, 0] = float("nan")
    with pytest.raises(qmpc.InputError, match="obs_transform"):
        layer(X)


def test_controller_leaves_the_callers_network_alone():
    q = _quadratic(dtype=torch.float32)
    opt = torch.optim.Adam(q.parameters(), lr=1e-2)
    ctrl = qmpc.Controller(q, -np.ones(2), np.ones(2))
    assert all(p.dtype == torch.float32 for p in q.parameters())
    assert all(b.dtype == torch.float32 for b in q.buffers())
    np.testing.assert_allclose(ctrl.act(np.zeros(2))[0], [0.3, -0.2], atol=1e-6)
    loss = q(torch.zeros(1, 2), torch.ones(1, 2)).sum()  # float32 training still works
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert all(p.dtype == torch.float32 for p in opt.param_groups[0]["params"])


def _picnn_batch():
    torch.manual_seed(0)
    q = qmpc.PICNN(3, 2, hidden=(8, 8)).double()
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    return q, x


def test_backward_leaves_the_result_alone_and_repeats():
    """A singular KKT system (Q does not depend on u) is reported by the backward in
    ``last_adjoint`` and the counters; the solve's statuses, shared with ``last_result``, stay."""
    q = qmpc.MLPQ(3, 2, hidden=(4,)).double()
    with torch.no_grad():
        q.net[0].weight[:, 3:] = 0.0
    x = torch.randn(2, 3, dtype=torch.float64)
    layer = qmpc.ArgminLayer(q, -1.0, 1.0)
    u, v = layer(x)
    status = layer.last_result.status.copy()
    params = list(q.parameters())
    g1 = torch.autograd.grad(u.sum() + v.sum(), params, retain_graph=True)
    g2 = torch.autograd.grad(u.sum() + v.sum(), params)
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    np.testing.assert_array_equal(layer.last_result.status, status)
    assert layer.last_adjoint.singular.all() and layer.counters["singular"] == 4


def test_nan_in_the_incoming_gradient_is_not_dropped():
    """A NaN cotangent on one row propagates to that row (as through any torch op); the other
    rows keep their implicit gradient. ``bool(gu.abs().sum() > 0)`` was False on NaN and dropped
    the implicit gradient of the whole batch."""
    torch.manual_seed(0)
    q = qmpc.QuadraticQ(3, 2, hidden=(8,)).double()  # an interior argmin that moves with x
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    layer = qmpc.ArgminLayer(q, -5.0, 5.0)
    u, _ = layer(x)
    seed = torch.ones_like(u)
    (ref,) = torch.autograd.grad(u, [x], grad_outputs=seed * torch.tensor([[0.0], [1], [1], [1]]), retain_graph=True)
    assert ref[1:].abs().sum() > 1e-3  # the implicit gradient is not zero here
    seed[0, 0] = float("nan")
    (g,) = torch.autograd.grad(u, [x], grad_outputs=seed, retain_graph=True)
    assert torch.isnan(g[0]).all()
    torch.testing.assert_close(g[1:], ref[1:])
    gp = torch.autograd.grad(u, list(q.parameters()), grad_outputs=seed)
    assert any(torch.isnan(t).any() for t in gp)


def test_inplace_change_between_forward_and_backward_is_an_error():
    q, x = _picnn_batch()
    layer = qmpc.ArgminLayer(q, -0.2, 0.2)
    u, _ = layer(x)
    with torch.no_grad():
        next(q.parameters()).add_(1.0)
    with pytest.raises(RuntimeError, match="inplace"):
        u.sum().backward()


def test_meta_device_x_is_a_clear_error():
    q, _ = _picnn_batch()
    with pytest.raises(qmpc.InputError, match="meta"):
        qmpc.ArgminLayer(q, -1.0, 1.0)(torch.zeros(2, 3, device="meta"))
