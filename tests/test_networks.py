"""Layer 1 of the suite: every network agrees with its CasADi twin to 1e-10 in float64."""

import casadi as ca
import numpy as np
import pytest
import torch
from torch import nn

import qmpc
from qmpc.check import spread_layer_norms, twin_errors
from qmpc.networks import ThetaView, sequential_twin

CONFIGS = [
    (qmpc.QuadraticQ, {}),
    (qmpc.QuadraticQ, {"diagonal": True, "activation": "softplus"}),
    (qmpc.QuadraticQ, {"hidden": (), "state_dependent_curvature": False}),
    (qmpc.PICNN, {}),
    (qmpc.PICNN, {"hidden": (16, 8, 4), "activation": "tanh"}),
    (qmpc.PICNN, {"activation": "silu", "layer_norm": True}),
    (qmpc.MLPQ, {}),
    (qmpc.MLPQ, {"activation": "silu", "action_curvature": 0.3}),
    (qmpc.MLPQ, {"activation": "sigmoid"}),
]


@pytest.mark.parametrize("cls,kw", CONFIGS, ids=lambda v: getattr(v, "__name__", str(v)))
def test_twin_value_gradient_hessian(cls, kw):
    kw = {"hidden": (16, 16), **kw}
    q = cls(5, 3, **kw).double()
    errs = twin_errors(q, batch=3)
    assert max(errs.values()) <= 1e-10, errs


@pytest.mark.parametrize("cls,kw", CONFIGS, ids=lambda v: getattr(v, "__name__", str(v)))
def test_baked_twin_is_the_symbolic_twin(cls, kw):
    """The controller's twin with the weights as constants: same value, gradient and Hessian."""
    torch.manual_seed(0)
    q = cls(5, 3, **{"hidden": (16, 16), **kw}).double()
    sym, baked = q.casadi_function(), q.casadi_function(baked=True)
    assert baked.size_in(2) == (0, 1)
    x, u = ca.MX.sym("x", 5), ca.MX.sym("u", 3)
    z = ca.vertcat(x, u)
    outs = []
    for f, th in ((sym, ca.DM(q.flat_parameters())), (baked, ca.DM(0, 1))):
        e = f(x, u, th)
        H, g = ca.hessian(e, z)
        outs.append(ca.Function("d", [x, u], [e, g, H]))
    rng = np.random.default_rng(0)
    for _ in range(3):
        a = [rng.normal(size=5), rng.normal(size=3)]
        for r1, r2 in zip(outs[0](*a), outs[1](*a), strict=True):
            np.testing.assert_allclose(np.array(r2), np.array(r1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "kw",
    [
        {"hidden": (16, 16)},
        {"hidden": (16, 8, 4), "activation": "tanh"},
        {"hidden": (8,), "activation": "silu"},
        {"hidden": (16, 8, 4), "activation": "tanh", "layer_norm": True},
        {"hidden": (8,), "activation": "softplus", "layer_norm": True},
    ],
)
def test_picnn_numpy_derivatives_match_the_twin(kw):
    """The closed-form value, gradient and Hessian the controller uses, against CasADi's AD of the
    twin (with an input normalisation, and layer norms with scales and shifts away from 1 and 0)
    and central differences of the gradient."""
    torch.manual_seed(0)
    q = qmpc.PICNN(5, 3, **kw).double()
    with torch.no_grad():
        q.obs_shift.copy_(torch.randn(5))
        q.obs_transform.copy_(torch.eye(5) + 0.2 * torch.randn(5, 5))
    spread_layer_norms(q)
    d = q.numpy_derivatives()
    f = q.casadi_function(baked=True)
    z = ca.MX.sym("z", 8)
    e = f(z[:5], z[5:], ca.DM(0, 1))
    H, g = ca.hessian(e, z)
    ref = ca.Function("ref", [z], [e, g, H])
    rng = np.random.default_rng(1)
    for _ in range(3):
        v = 2.0 * rng.normal(size=8)
        qv, gv, Hv = d(v[:5], v[5:])
        q2, g2, H2 = (np.array(a) for a in ref(v))
        assert abs(qv - q2.item()) <= 1e-12 * max(1.0, abs(qv))
        np.testing.assert_allclose(gv, g2.ravel(), atol=1e-12)
        np.testing.assert_allclose(Hv, H2, atol=1e-12)
        e_fd = 1e-6
        fd = np.stack(
            [
                (d(*np.split(v + e_fd * np.eye(8)[j], [5]))[1] - d(*np.split(v - e_fd * np.eye(8)[j], [5]))[1])
                / (2 * e_fd)
                for j in range(8)
            ],
            axis=1,
        )
        np.testing.assert_allclose(Hv, fd, atol=1e-7)


def test_twin_large_preactivations():
    """Softplus is written so that large inputs neither overflow nor lose accuracy in either twin."""
    q = qmpc.PICNN(3, 2, hidden=(8,)).double()
    with torch.no_grad():
        for p in q.parameters():
            p.mul_(40.0)
    assert max(twin_errors(q, batch=2).values()) <= 1e-10 * 1e3  # values are O(1e3) here


def test_flat_parameter_layout_roundtrip():
    q = qmpc.PICNN(4, 2, hidden=(8,))
    theta = q.flat_parameters()
    assert theta.shape == (q.num_parameters,) and theta.dtype == np.float64
    layout = q.parameter_layout()
    names = [n for n, _ in q.named_parameters()]
    assert [n for n, _, _ in layout] == names
    name, _shape, off = layout[1]
    p = dict(q.named_parameters())[name]
    np.testing.assert_array_equal(theta[off : off + p.numel()], p.detach().double().numpy().reshape(-1))
    q2 = qmpc.PICNN(4, 2, hidden=(8,))
    q2.load_flat_parameters(theta)
    np.testing.assert_array_equal(q2.flat_parameters(), theta)
    with pytest.raises(qmpc.InputError, match="expected theta of shape"):
        q2.load_flat_parameters(theta[:-1])


@pytest.mark.parametrize("layer_norm", [False, True])
def test_picnn_is_convex_in_u(layer_norm):
    q = qmpc.PICNN(3, 2, hidden=(16, 16), action_curvature=0.0, layer_norm=layer_norm).double()
    for _ in range(10):
        x = torch.randn(1, 3, dtype=torch.float64)
        u = 3 * torch.randn(2, dtype=torch.float64)
        H = torch.autograd.functional.hessian(lambda uu, x=x: q(x, uu[None])[0], u)
        assert torch.linalg.eigvalsh(H).min() >= -1e-10


def test_from_quadratic_represents_matrix():
    rng = np.random.default_rng(0)
    A = rng.normal(size=(5, 5))
    M = A @ A.T + np.eye(5)
    q = qmpc.QuadraticQ.from_quadratic(M, nx=3)
    z = torch.as_tensor(rng.normal(size=(7, 5)))
    expect = np.einsum("bi,ij,bj->b", z.numpy(), M, z.numpy())
    np.testing.assert_allclose(q(z[:, :3], z[:, 3:]).detach().numpy(), expect, atol=1e-10)


@pytest.mark.parametrize("act", ["relu", "elu", "leaky_relu"])
def test_non_smooth_activation_is_refused(act):
    with pytest.raises(qmpc.UnsupportedLayerError, match=act):
        qmpc.MLPQ(3, 2, activation=act)


def test_unknown_activation_is_refused():
    with pytest.raises(qmpc.UnsupportedLayerError, match="unknown activation 'swishy'"):
        qmpc.PICNN(3, 2, activation="swishy")


@pytest.mark.parametrize(
    "layer,name", [(nn.ReLU(), "ReLU"), (nn.Dropout(0.1), "Dropout"), (nn.LayerNorm(4), "LayerNorm")]
)
def test_sequential_twin_names_unsupported_layer(layer, name):
    seq = nn.Sequential(nn.Linear(3, 4), layer, nn.Linear(4, 1))
    th = ca.MX.sym("th", sum(p.numel() for p in seq.parameters()))
    with pytest.raises(qmpc.UnsupportedLayerError, match=rf"layer 1 \({name}\)"):
        sequential_twin(seq, ca.MX.sym("z", 3), ThetaView(seq, th))


def test_sequential_twin_softplus_threshold_is_exact():
    seq = nn.Sequential(nn.Linear(2, 3), nn.Softplus(beta=2.0, threshold=5.0), nn.Linear(3, 1)).double()
    th = ca.MX.sym("th", sum(p.numel() for p in seq.parameters()))
    z = ca.MX.sym("z", 2)
    f = ca.Function("f", [z, th], [sequential_twin(seq, z, ThetaView(seq, th))])
    theta = torch.cat([p.detach().reshape(-1) for p in seq.parameters()]).numpy()
    for scale in (0.1, 10.0):
        zz = scale * torch.randn(2, dtype=torch.float64)
        assert abs(float(f(zz.numpy(), theta)) - seq(zz).item()) <= 1e-12


def test_network_input_validation():
    with pytest.raises(qmpc.InputError, match="obs_dim"):
        qmpc.PICNN(0, 2)
    q = qmpc.MLPQ(3, 2)
    with pytest.raises(qmpc.InputError, match=r"expected u of shape \(4, 2\)"):
        q(torch.zeros(4, 3), torch.zeros(4, 3))


def test_layer_norm_is_refused_where_the_architecture_has_none():
    from qmpc.networks.registry import build_network

    with pytest.raises(qmpc.InputError, match=r"expected arch in \['PICNN'\] for layer_norm = true, got 'MLPQ'"):
        build_network("MLPQ", 3, 2, (8,), layer_norm=True)
    assert build_network("PICNN", 3, 2, (8,), layer_norm=True).layer_norm
