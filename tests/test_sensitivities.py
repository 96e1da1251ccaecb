"""Layers 2 and 3: sensitivities against finite differences, closed forms, CasADi's own nlpsol
sensitivities, golden values, and the envelope identity."""

import casadi as ca
import numpy as np
import pytest
import torch

import qmpc
from qmpc.check import (
    activity,
    clip_closed_form,
    envelope_identity,
    fd_cases,
    fd_errors,
    golden_cases,
    golden_errors,
    lqr_closed_form,
    make_network,
    make_scenario,
    run_checks,
)
from qmpc.networks import ARCHITECTURES
from qmpc.solver import PLUGINS

ARCHS = list(ARCHITECTURES)


TOLS = (1e-13, 1e-8, 1e-6)
"""The plugin tolerances the suite runs at: tight, and those of the configs and the controller."""


@pytest.mark.parametrize("tol", TOLS)
@pytest.mark.parametrize("plugin", PLUGINS)
@pytest.mark.parametrize("horizon", [1, 3])
@pytest.mark.parametrize("bounds", ["inactive", "active", "mixed"])
@pytest.mark.parametrize("arch", ARCHS)
def test_finite_differences_of_the_whole_solve(arch, bounds, horizon, plugin, tol):
    """Against central differences of the exact solution map (make_scenario's sqpmethod/1e-13
    twin): a loose solve's own differences are noisy by its error over the step."""
    layer, x = make_scenario(arch, bounds, horizon, plugin, tol=tol)
    active, weak, free = activity(layer, x)
    assert weak == 0
    if bounds == "inactive":
        assert active == 0
    elif bounds == "active":
        assert active >= free and active > 0
    else:
        assert active > 0 and free > 0
    errs = fd_errors(layer, x, n_dirs=2 if tol == 1e-13 else 1)
    assert max(errs.values()) <= 1e-6, errs
    status = layer.last_result.status
    assert qmpc.Status.ok(status).all()
    if tol == 1e-13 or plugin == "sqpmethod":
        assert (status == qmpc.Status.SOLVED).all()


def test_finite_differences_through_a_learned_model():
    """check.py's learned-model scenario (the full matrix is in test_sensitivities_plugins.py)."""
    layer, x = make_scenario("PICNN", "mixed", 3, "ipopt", tol=1e-8, model="mlp-tv")
    active, weak, free = activity(layer, x)
    assert weak == 0 and active > 0 and free > 0
    assert max(fd_errors(layer, x, n_dirs=1).values()) <= 1e-6


@pytest.mark.parametrize("tol", TOLS)
@pytest.mark.parametrize("bounds", ["inactive", "active", "mixed"])
def test_finite_differences_of_the_newton_path(bounds, tol):
    """The TD target's batched projected Newton (horizon 1, PICNN): every sample solved by it
    (SOLVED, no plugin fallback), its sensitivities against central differences."""
    layer, x = make_scenario("PICNN", bounds, 1, "newton", tol=tol, batch=8)
    assert layer.problem.batched
    errs = fd_errors(layer, x, n_dirs=2)
    assert max(errs.values()) <= 1e-6, errs
    assert (layer.last_result.status == qmpc.Status.SOLVED).all()
    assert (layer.last_result.kkt_residual <= max(tol, 1e-12)).all()


@pytest.mark.parametrize(("plugin", "tol"), [(p, t) for p in PLUGINS for t in TOLS])
@pytest.mark.parametrize("horizon", [1, 2])
def test_one_dimensional_action(horizon, plugin, tol):
    layer, x = make_scenario("PICNN", "mixed", horizon, plugin, nx=3, nu=1, batch=4, tol=tol)
    assert max(fd_errors(layer, x, n_dirs=2).values()) <= 1e-6


def test_closed_form_clip():
    errs = clip_closed_form()
    assert max(errs.values()) <= 1e-9, errs


@pytest.mark.parametrize("horizon", [1, 3, 6])
def test_closed_form_lqr_with_riccati_terminal_cost(horizon):
    errs = lqr_closed_form(horizon)
    assert max(errs.values()) <= 1e-8, errs


@pytest.mark.parametrize(("plugin", "tol"), [(p, t) for p in PLUGINS for t in TOLS])
@pytest.mark.parametrize("bounds", ["inactive", "mixed"])
@pytest.mark.parametrize("arch", ARCHS)
def test_envelope_identity(arch, bounds, plugin, tol):
    layer, x = make_scenario(arch, bounds, 1, plugin, tol=tol)
    e = envelope_identity(layer, x)
    # ∂Q/∂u is the solution's residual where a bound is inactive: the identity holds to it
    slack = 1e-8 + 10 * float(layer.last_result.kkt_residual.max()) * e["du_dtheta"]
    assert e["chain_vs_envelope"] <= slack, e
    assert e["cross_term"] <= slack, e
    assert e["du_dtheta"] >= 1e-3, e  # the argmin does move: the term vanishes because ∂Q/∂u·∂u*/∂θ = 0
    if bounds != "inactive":  # ∂Q/∂u ≠ 0 at the active bounds: the adjoint's right-hand side is not ~0
        assert e["dq_du"] >= 1e-4, e


def test_double_q_term_does_not_vanish():
    """Evaluated by *another* network (double Q), the ∂Q'/∂u·∂u*/∂θ term is not zero."""
    layer, x = make_scenario("PICNN", "inactive", 1)
    other = make_network("PICNN", 4, 2, seed=5)
    u, _ = layer(x)
    (g,) = torch.autograd.grad(other(x, u).sum(), [next(layer.q.parameters())])
    assert g.abs().max() > 1e-3


@pytest.mark.parametrize("bounds", ["inactive", "mixed"])
def test_matches_casadi_own_nlpsol_sensitivities(bounds):
    """CasADi's sqpmethod differentiated by CasADi itself is an independent reference."""
    layer, x = make_scenario("PICNN", bounds, 1)
    q, P = layer.q, layer.problem
    solver = ca.nlpsol(
        "ref",
        "sqpmethod",
        P.nlp,
        {
            "qpsol": "qrqp",
            "print_time": False,
            "print_status": False,
            "print_header": False,
            "print_iteration": False,
            "tol_du": 1e-13,
            "tol_pr": 1e-13,
            "qpsol_options": {"print_iter": False, "print_header": False},
        },
    )
    p = ca.MX.sym("p", P.nx + P.n_theta)
    r = solver(x0=0, p=p, lbx=layer.lbw, ubx=layer.ubw)
    jac = ca.Function("ref_jacobian", [p], [r["x"], ca.jacobian(r["x"], p)])
    theta = q.flat_parameters()
    xg = x.clone().requires_grad_(True)
    u, _ = layer(xg)
    for b in range(x.shape[0]):
        ustar, J = (np.asarray(v) for v in jac(np.r_[x[b].numpy(), theta]))
        np.testing.assert_allclose(u[b].detach().numpy(), ustar.ravel(), atol=1e-9)
        for i in range(P.nu):
            params = list(q.parameters())
            gx, *gth = torch.autograd.grad(u[b, i], [xg, *params], retain_graph=True)
            gth = torch.cat([t.reshape(-1) for t in gth]).numpy()
            np.testing.assert_allclose(gx[b].numpy(), J[i, : P.nx], atol=1e-7)
            np.testing.assert_allclose(gth, J[i, P.nx :], atol=1e-7)


@pytest.mark.parametrize("case", golden_cases(), ids=lambda c: c["name"])
def test_golden_values(case):
    assert golden_errors(case) <= 1e-7


@pytest.mark.parametrize("tol", TOLS)
def test_plugins_agree(tol):
    outs = []
    for plugin in PLUGINS:
        layer, x = make_scenario("MLPQ", "mixed", 3, plugin, tol=tol)
        params = list(layer.q.parameters())
        u, v = layer(x)
        g = torch.autograd.grad(u.sum() + v.sum(), params)
        outs.append((u.detach(), v.detach(), torch.cat([t.reshape(-1) for t in g])))
    for a, b in zip(outs[0], outs[1], strict=True):
        assert (a - b).abs().max() <= 1e-6


def test_grad_modes():
    """``implicit``: the gradient of a loss that reads both u* and V is the finite difference of
    that loss (the u* term is not zero here); ``envelope``: u* is detached and V's gradient is the
    same as in ``implicit``; ``none``: nothing is tracked."""
    layer, x = make_scenario("PICNN", "mixed", 1)
    params = list(layer.q.parameters())
    w = torch.tensor([1.0, -2.0], dtype=torch.float64)

    def loss(mode):
        u, v = layer(x, grad_mode=mode)
        return v.sum() + 10.0 * (u * w).sum()

    gi = torch.autograd.grad(loss("implicit"), params)
    theta = layer.q.flat_parameters()
    d = np.random.default_rng(0).normal(size=theta.shape)
    vals = []
    for s in (1e-6, -1e-6):
        layer.q.load_flat_parameters(theta + s * d)
        with torch.no_grad():
            vals.append(float(loss("none")))
    layer.q.load_flat_parameters(theta)
    fd = (vals[0] - vals[1]) / 2e-6
    gd = float(sum((g.reshape(-1) * torch.as_tensor(dd)).sum() for g, dd in zip(gi, _split(d, params), strict=True)))
    assert abs(gd - fd) <= 1e-5 * (1 + abs(fd)), (gd, fd)
    u_e, v_e = layer(x, grad_mode="envelope")
    assert not u_e.requires_grad and v_e.requires_grad
    ge = torch.autograd.grad(v_e.sum(), params)
    gv = torch.autograd.grad(layer(x, grad_mode="implicit")[1].sum(), params)
    for a, b in zip(gv, ge, strict=True):
        assert (a - b).abs().max() <= 1e-12
    assert max(float((a - b).abs().max()) for a, b in zip(gi, ge, strict=True)) > 1e-3  # the u* term counts
    u_n, v_n = layer(x, grad_mode="none")
    assert not u_n.requires_grad and not v_n.requires_grad
    torch.testing.assert_close(u_n, u_e)


def _split(flat, params):
    out, off = [], 0
    for p in params:
        out.append(flat[off : off + p.numel()])
        off += p.numel()
    return out


def test_float32_network_and_states():
    torch.manual_seed(0)
    q = qmpc.PICNN(4, 2, hidden=(8,))
    layer = qmpc.ArgminLayer(q, -torch.ones(2), torch.ones(2))
    x = torch.randn(5, 4, requires_grad=True)
    u, v = layer(x)
    assert u.dtype == torch.float32 and v.dtype == torch.float32 and u.shape == (5, 2) and v.shape == (5,)
    (u.sum() + v.sum()).backward()
    assert x.grad.dtype == torch.float32 and all(p.grad.dtype == torch.float32 for p in q.parameters())
    assert torch.isfinite(x.grad).all()


def test_warm_start_reproduces_solution():
    """With one SQP iteration and no retry, cold starts fail; a warm start at the solution (the
    previous call's, or a given ``w0``) passes at once. Ignoring the warm start fails this."""
    layer, x = make_scenario("MLPQ", "mixed", 3)
    u1, v1 = layer(x, grad_mode="none")
    plan = torch.as_tensor(layer.last_result.plan)
    one = qmpc.ArgminLayer(layer.q, layer.low, layer.high, max_iter=1, retry=False, **_model_kw(layer))
    one(x, grad_mode="none")
    assert not qmpc.Status.ok(one.last_result.status).all()  # cold: one iteration is not enough
    u3, v3 = one(x, grad_mode="none", w0=plan)
    assert qmpc.Status.ok(one.last_result.status).all()
    assert (u1 - u3).abs().max() <= 1e-9 and (v1 - v3).abs().max() <= 1e-9
    one.warm_start = True  # from the previous call's solution
    u2, v2 = one(x, grad_mode="none")
    assert qmpc.Status.ok(one.last_result.status).all()
    assert (u1 - u2).abs().max() <= 1e-9 and (v1 - v2).abs().max() <= 1e-9


def _model_kw(layer):
    P = layer.spec
    return {k: getattr(P, k) for k in ("horizon", "dynamics", "stage_cost", "discount")}


def test_plan_layout_for_mpc():
    layer, x = make_scenario("QuadraticQ", "inactive", 4)
    u, _ = layer(x, grad_mode="none")
    plan = layer.plan()
    assert plan["actions"].shape == (3, 4, 2) and plan["states"].shape == (3, 3, 4)
    np.testing.assert_allclose(plan["actions"][:, 0], u.numpy())


def test_qmpc_check_rows():
    """``qmpc check --full`` covers IPOPT at the configs' tolerance and H > 1 through a learned
    model; the quick check passes (and has one row of each)."""
    full = fd_cases(quick=False)
    for plugin in PLUGINS:
        for tol in (1e-8, 1e-6):
            assert {(b, h) for _, b, h, p, t, m in full if p == plugin and t == tol and m == "linear"} >= {
                (b, h) for b in ("active", "mixed") for h in (1, 3)
            }
        assert {(h, m) for _, _, h, p, _, m in full if p == plugin and m != "linear"} == {
            (h, m) for h in (3, 5) for m in ("mlp", "mlp-tv")
        }
    rows = list(run_checks(quick=True))
    assert all(r.passed for r in rows), [r for r in rows if not r.passed]
    assert any("ipopt tol=1e-08" in r.name for r in rows) and any("model=mlp" in r.name for r in rows)


@pytest.mark.parametrize(
    ("horizon", "plugin", "bounds"),
    [(1, "newton", "mixed"), (1, "newton", "active"), (1, "sqpmethod", "mixed"), (3, "sqpmethod", "mixed")],
)
def test_finite_differences_through_a_layer_normed_picnn(horizon, plugin, bounds):
    """``network.layer_norm``: the argmin's and the value's sensitivities in the state and in every
    weight (the layer norms' scales and shifts among them) against central differences."""
    layer, x = make_scenario("PICNN", bounds, horizon, plugin, tol=1e-10, batch=8, layer_norm=True)
    assert any(n.startswith("x_norm.") for n, _ in layer.q.named_parameters())
    errs = fd_errors(layer, x, n_dirs=2)
    assert max(errs.values()) <= 1e-6, errs
