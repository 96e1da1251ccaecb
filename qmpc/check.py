"""Sensitivity checks: ``qmpc check`` runs a quick version of these on the user's installation.

Every check returns :class:`CheckRow` values (a measured error against a tolerance); the test
suite asserts on the same measurements with the full set of cases. The references are
independent of the bridge: central finite differences of the whole solve, closed forms (a
diagonal quadratic with a box, LQR with a Riccati terminal cost), the torch network itself
(for the twin), and golden values stored with the package.
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from typing import Literal

import casadi as ca
import numpy as np
import torch
from torch.func import functional_call

from qmpc.bridge import ArgminLayer
from qmpc.dynamics import DynamicsModel
from qmpc.errors import InputError
from qmpc.lqr import dare, lqr_q_matrix
from qmpc.networks import ARCHITECTURES, REGISTRY, QNetwork, QuadraticQ

__all__ = [
    "CheckRow",
    "clip_closed_form",
    "envelope_identity",
    "fd_cases",
    "fd_errors",
    "format_table",
    "golden_cases",
    "golden_errors",
    "linear_model",
    "lqr_closed_form",
    "make_network",
    "make_scenario",
    "mlp_model",
    "run_checks",
    "spread_layer_norms",
    "twin_errors",
]

Bounds = Literal["inactive", "active", "mixed"]


@dataclass
class CheckRow:
    """One measured error against its tolerance."""

    name: str
    error: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return bool(np.isfinite(self.error) and self.error <= self.tolerance)


def make_network(arch: str, nx: int, nu: int, seed: int, hidden=(8, 8), layer_norm: bool = False) -> QNetwork:
    """A small float64 network of a given architecture, seeded; ``layer_norm`` (PICNN): with layer
    norms whose scales and shifts are drawn away from their initial 1 and 0."""
    torch.manual_seed(seed)
    kw = {"action_curvature": 0.5} if "action_curvature" in REGISTRY[arch].options else {}
    if layer_norm:
        kw["layer_norm"] = True
    return spread_layer_norms(ARCHITECTURES[arch](nx, nu, hidden=hidden, **kw).double())


def spread_layer_norms(q: QNetwork) -> QNetwork:
    """``q`` with its layer norms' scales drawn from U(0.3, 2) and shifts from U(−0.5, 0.5) (torch's
    generator), away from their initial 1 and 0, so that checks of them see both; a network without
    layer norms is returned unchanged."""
    with torch.no_grad():
        for norm in getattr(q, "x_norm", []):
            norm.weight.uniform_(0.3, 2.0)
            norm.bias.uniform_(-0.5, 0.5)
    return q


def linear_model(nx: int, nu: int, seed: int = 0) -> tuple[ca.Function, ca.Function, np.ndarray, np.ndarray]:
    """A random stable-ish linear model ``x⁺ = A x + B u`` and a quadratic stage cost."""
    rng = np.random.default_rng(seed)
    A = np.eye(nx) + 0.1 * rng.normal(size=(nx, nx))
    B = 0.3 * rng.normal(size=(nx, nu))
    x, u = ca.SX.sym("x", nx), ca.SX.sym("u", nu)
    f = ca.Function("f", [x, u], [ca.mtimes(A, x) + ca.mtimes(B, u)], ["x", "u"], ["x_next"])
    c = ca.Function("c", [x, u], [ca.sumsqr(x) + 0.1 * ca.sumsqr(u)], ["x", "u"], ["c"])
    return f, c, A, B


def mlp_model(nx: int, nu: int, seed: int = 0, n_p: int = 0) -> tuple[ca.Function, ca.Function]:
    """A seeded learned model (:class:`~qmpc.dynamics.DynamicsModel`, silu, 8×8, normalisation
    fitted on random transitions) and a nonconvex stage cost that reads the state after the step,
    ``c(x, u, x⁺)``. With ``n_p = 2·nx`` the model is time-varying: ``x⁺ = f(x, u) ⊙ (1 + p[:nx]) +
    p[nx:]`` (``dynamics(x, u, p)``)."""
    if n_p not in (0, 2 * nx):
        raise ValueError(f"expected n_p in (0, {2 * nx}), got {n_p}")
    torch.manual_seed(seed)
    m = DynamicsModel(nx, nu, (8, 8)).double()
    xs = torch.randn(200, nx, dtype=torch.float64)
    m.fit_normalization(xs, 0.9 * xs + 0.1 * torch.randn(200, nx, dtype=torch.float64))
    x, u, p = ca.MX.sym("x", nx), ca.MX.sym("u", nu), ca.MX.sym("p", n_p)
    fx = m.casadi_function()(x, u)
    if n_p:
        f = ca.Function("f", [x, u, p], [fx * (1 + p[:nx]) + p[nx:]], ["x", "u", "p"], ["x_next"])
    else:
        f = ca.Function("f", [x, u], [fx], ["x", "u"], ["x_next"])
    xn = ca.MX.sym("x_next", nx)
    c = ca.sumsqr(xn) + 0.1 * ca.sumsqr(u) + 0.1 * ca.sin(x[0]) * xn[1] + 0.02 * ca.cos(x[1]) * u[0] ** 2
    return f, ca.Function("c", [x, u, xn], [c], ["x", "u", "x_next"], ["c"])


Model = Literal["linear", "mlp", "mlp-tv"]

_REFERENCES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""Each scenario layer's twin solved with sqpmethod at tol=1e-13 (the reference of :func:`fd_errors`)."""


def make_scenario(
    arch: str,
    bounds: Bounds,
    horizon: int,
    plugin: str = "sqpmethod",
    seed: int = 0,
    batch: int = 3,
    tol: float = 1e-13,
    nx: int = 4,
    nu: int = 2,
    model: Model = "linear",
    workers: int = 1,
    layer_norm: bool = False,
) -> tuple[ArgminLayer, torch.Tensor]:
    """A layer and a batch of states whose solutions have the requested bound activity.

    Bounds are chosen from the solution with wide bounds (solved with sqpmethod at tol=1e-13, so
    every plugin and tolerance gets the same box): ``inactive`` keeps every action strictly
    inside, ``active`` puts a narrow box away from every unconstrained optimum, ``mixed`` does
    that for the first action dimension only. Components are never weakly active (the caller can
    verify with :func:`activity`).

    ``model`` (horizon > 1): ``linear`` (:func:`linear_model`), ``mlp`` (:func:`mlp_model`, a
    stage cost reading ``x⁺``) or ``mlp-tv`` (the same, time-varying: random ``model_params``).
    The layer solves with ``plugin`` at ``tol``; its twin at sqpmethod/1e-13 on the same network
    is what :func:`fd_errors` differentiates by central differences. ``layer_norm``: the network's
    (:func:`make_network`).
    """
    q = make_network(arch, nx, nu, seed, layer_norm=layer_norm)
    n_p = 2 * nx if model == "mlp-tv" else 0
    f, c = linear_model(nx, nu, seed)[:2] if model == "linear" else mlp_model(nx, nu, seed, n_p)
    kw = dict(horizon=horizon, dynamics=f, stage_cost=c, discount=0.9, dynamics_params=n_p)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, nx, generator=g, dtype=torch.float64)
    p = 0.1 * np.random.default_rng(seed).normal(size=(horizon - 1) * n_p)
    wide = ArgminLayer(q, -1e3, 1e3, tol=1e-13, **kw)
    wide.model_params = p
    wide(x, grad_mode="none")
    acts = wide.plan()["actions"].reshape(-1, nu)  # every action of every sample
    lo, hi = acts.min(0), acts.max(0)
    if bounds == "inactive":
        low, high = lo - 0.5, hi + 0.5
    else:
        mid = np.median(acts, axis=0)
        # a narrow box centred away from every unconstrained optimum
        span = hi - lo
        low, high = mid - 0.02 * span - 0.01, mid + 0.02 * span + 0.01
        if bounds == "mixed":
            low[1:], high[1:] = lo[1:] - 0.5, hi[1:] + 0.5
    # "newton": the batched projected Newton of horizon 1 (PICNN), sqpmethod for what fails it
    solver = {"solver": "sqpmethod", "newton": True} if plugin == "newton" else {"solver": plugin, "newton": False}
    layer = ArgminLayer(q, low, high, tol=tol, workers=workers, **solver, **kw)
    ref = ArgminLayer(q, low, high, tol=1e-13, workers=1, newton=False, **kw)
    layer.model_params, ref.model_params = p.copy(), p.copy()
    _REFERENCES[layer] = ref
    return layer, x


def activity(layer: ArgminLayer, x: torch.Tensor) -> tuple[int, int, int]:
    """``(active, weakly active, free)`` action components of the solutions for ``x``."""
    layer(x, grad_mode="none")
    r = layer.last_result
    fixed, weak = layer.solver.at_bounds(r.plan, r.lam_x, layer.lbw, layer.ubw)
    n_act = (layer.problem.N + 1) * layer.problem.nu
    fixed, weak = fixed[:, :n_act], weak[:, :n_act]
    return int((fixed & ~weak).sum()), int(weak.sum()), int((~fixed).sum())


def fd_errors(
    layer: ArgminLayer,
    x: torch.Tensor,
    n_dirs: int = 3,
    eps: float = 1e-5,
    seed: int = 0,
    reference: ArgminLayer | None = None,
) -> dict[str, float]:
    """Bridge gradients against central finite differences of the whole solve.

    For random output weights ``c_u (B, nu)`` and ``c_v (B,)`` and random directions in ``θ``
    and ``x``, compares the directional derivatives of ``⟨c_u, u*⟩`` and ``⟨c_v, V⟩``.
    Returns the largest relative error ``|analytic − fd| / (1 + |fd|)`` for ``du*/dθ``,
    ``du*/dx``, ``dV/dθ`` and ``dV/dx``.

    The differences solve with ``reference`` (a layer on the same network; default: the
    sqpmethod/1e-13 twin of a :func:`make_scenario` layer, else ``layer`` itself): the
    derivative of the exact solution map. Differences of a loose solve (``tol=1e-6``) are noisy
    by its error over ``eps`` (measured up to 4e-4), not the bridge's error.
    """
    q = layer.q
    reference = reference or _REFERENCES.get(layer, layer)
    if reference.q is not q:
        raise ValueError("expected a reference layer on the same network as layer, got another network")
    rng = np.random.default_rng(seed)
    B, nu = x.shape[0], q.act_dim
    cu = torch.as_tensor(rng.normal(size=(B, nu)))
    cv = torch.as_tensor(rng.normal(size=B))
    theta0 = q.flat_parameters()
    out: dict[str, float] = {}
    for name, weight in (("u*", lambda u, v: (cu * u).sum()), ("V", lambda u, v: (cv * v).sum())):
        xg = x.detach().clone().requires_grad_(True)
        q.zero_grad()
        u, v = layer(xg, grad_mode="implicit")
        weight(u, v).backward()
        gth = torch.cat([p.grad.reshape(-1) for p in q.parameters()]).numpy()
        gx = xg.grad.numpy()

        def obj(th, xx, weight=weight):
            q.load_flat_parameters(th)
            with torch.no_grad():
                uu, vv = reference(torch.as_tensor(xx), grad_mode="none")
            return float(weight(uu, vv))

        e_th = e_x = 0.0
        for _ in range(n_dirs):
            d = rng.normal(size=theta0.shape)
            d /= np.linalg.norm(d)
            fd = (obj(theta0 + eps * d, x.numpy()) - obj(theta0 - eps * d, x.numpy())) / (2 * eps)
            e_th = max(e_th, abs(gth @ d - fd) / (1 + abs(fd)))
            dx = rng.normal(size=x.shape)
            dx /= np.linalg.norm(dx)
            fd = (obj(theta0, x.numpy() + eps * dx) - obj(theta0, x.numpy() - eps * dx)) / (2 * eps)
            e_x = max(e_x, abs((gx * dx).sum() - fd) / (1 + abs(fd)))
        q.load_flat_parameters(theta0)
        out[f"d{name}/dtheta"], out[f"d{name}/dx"] = e_th, e_x
    return out


def twin_errors(q: QNetwork, batch: int = 4, seed: int = 0) -> dict[str, float]:
    """Torch network vs its CasADi twin in float64: value, gradient and Hessian in (x, u), and
    the gradient in θ; returns the max absolute errors."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(batch, q.obs_dim, generator=g, dtype=torch.float64)
    U = torch.randn(batch, q.act_dim, generator=g, dtype=torch.float64)
    f = q.casadi_function()
    z = ca.MX.sym("z", q.obs_dim + q.act_dim)
    th = ca.MX.sym("th", q.num_parameters)
    qz = f(z[: q.obs_dim], z[q.obs_dim :], th)
    derivs = ca.Function("d", [z, th], [qz, ca.gradient(qz, z), ca.hessian(qz, z)[0], ca.gradient(qz, th)])
    theta = q.flat_parameters()
    names = [n for n, _ in q.named_parameters()]
    errs = dict.fromkeys(("value", "grad_xu", "hess_xu", "grad_theta"), 0.0)
    for b in range(batch):
        zb = torch.cat([X[b], U[b]]).requires_grad_(True)

        def fz(zz):
            return q(zz[None, : q.obs_dim], zz[None, q.obs_dim :])[0]

        val = fz(zb)
        (gz,) = torch.autograd.grad(val, zb)
        hz = torch.autograd.functional.hessian(fz, zb.detach())
        params = dict(q.named_parameters())
        gth = torch.autograd.grad(fz(zb.detach()), [params[n] for n in names])
        gth = torch.cat([t.reshape(-1) for t in gth])
        cv, cg, ch, cth = (np.asarray(o) for o in derivs(zb.detach().numpy(), theta))
        errs["value"] = max(errs["value"], abs(float(cv.ravel()[0]) - val.item()))
        errs["grad_xu"] = max(errs["grad_xu"], np.abs(cg.ravel() - gz.numpy()).max())
        errs["hess_xu"] = max(errs["hess_xu"], np.abs(ch - hz.numpy()).max())
        errs["grad_theta"] = max(errs["grad_theta"], np.abs(cth.ravel() - gth.numpy()).max())
    return errs


def envelope_identity(layer: ArgminLayer, x: torch.Tensor) -> dict[str, float]:
    """The full chain rule of ``V(θ) = Q_θ(x, u*(θ))`` against the envelope gradient.

    Returns ``chain_vs_envelope`` (max |∂Q/∂θ + ∂Q/∂u·∂u*/∂θ − ∂V/∂θ|), ``cross_term`` (max
    |∂Q/∂u·∂u*/∂θ|, zero at an exact solution: ``∂Q/∂u = 0`` where a bound is inactive and
    ``∂u*/∂θ = 0`` where it is active), ``du_dtheta`` (max |∂⟨1, u*⟩/∂θ|, which is not zero) and
    ``dq_du`` (max |∂Q/∂u| at u*: the right-hand side of the adjoint; with it ~0, as with every
    bound inactive, the identity holds whatever ∂u*/∂θ is).
    """
    q = layer.q
    params = list(q.parameters())
    u, _ = layer(x, grad_mode="implicit")
    chain = torch.autograd.grad(q(x, u).sum(), params, retain_graph=True)
    frozen = {n: p.detach() for n, p in q.named_parameters()}
    cross = torch.autograd.grad(functional_call(q, frozen, (x, u)).sum(), params, retain_graph=True, allow_unused=True)
    du = torch.autograd.grad(u.sum(), params, allow_unused=True)
    ud = u.detach().requires_grad_(True)
    (dq_du,) = torch.autograd.grad(q(x, ud).sum(), ud)
    _, v = layer(x, grad_mode="envelope")
    env = torch.autograd.grad(v.sum(), params)

    def mx(ts):
        return max(float(t.abs().max()) if t is not None else 0.0 for t in ts)

    return {
        "chain_vs_envelope": mx([a - b for a, b in zip(chain, env, strict=True)]),
        "cross_term": mx(cross),
        "du_dtheta": mx(du),
        "dq_du": float(dq_du.abs().max()),
    }


def clip_closed_form(seed: int = 0, batch: int = 6) -> dict[str, float]:
    """Diagonal quadratic Q with a box: ``u* = clip(μ(x), low, high)`` with ``μ = W x + b``,
    ``∂u*_i/∂b_i = 1`` and ``∂u*_i/∂x = W_i`` where the bound is inactive, zero where active."""
    torch.manual_seed(seed)
    nx, nu = 3, 4
    q = QuadraticQ(nx, nu, hidden=(), diagonal=True, state_dependent_curvature=False).double()
    with torch.no_grad():
        q.l_const.copy_(torch.linspace(-1.0, 1.0, nu))
    low, high = -0.3 * torch.ones(nu, dtype=torch.float64), 0.4 * torch.ones(nu, dtype=torch.float64)
    layer = ArgminLayer(q, low, high, tol=1e-13)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, nx, generator=g, dtype=torch.float64).requires_grad_(True)
    with torch.no_grad():
        mu = q.mu(x)
    u, _ = layer(x)
    free = ((mu > low) & (mu < high)).double()
    errs = {"u*": float((u.detach() - mu.clamp(low, high)).abs().max())}
    jb, jx = [], []
    for i in range(nu):
        gb, gx = torch.autograd.grad(u[:, i].sum(), [q.mu.bias, x], retain_graph=True)
        jb.append(gb)
        jx.append(gx)
    jb = torch.stack(jb)  # (nu, nu): d Σ_b u[b,i] / d b_j
    errs["du*/dbias"] = float((jb - torch.diag(free.sum(0))).abs().max())
    expect_x = torch.stack([free[:, i : i + 1] * q.mu.weight[i].detach() for i in range(nu)])
    errs["du*/dx"] = float((torch.stack(jx) - expect_x).abs().max())
    return errs


def lqr_closed_form(horizon: int, batch: int = 4, seed: int = 0) -> dict[str, float]:
    """Point mass (double integrator) LQR: with the exact Riccati Q as cost-to-go, the plan of any
    horizon gives ``u* = −K x``, ``V = xᵀ P x`` and ``∂u*/∂x = −K``."""
    dt, gamma = 0.1, 0.95
    A = np.block([[np.eye(2), dt * np.eye(2)], [np.zeros((2, 2)), np.eye(2)]])
    Bm = np.vstack([0.5 * dt**2 * np.eye(2), dt * np.eye(2)])
    Qc, R = np.diag([1.0, 2.0, 0.1, 0.1]), 0.05 * np.eye(2)
    P, K = dare(A, Bm, Qc, R, gamma)
    q = QuadraticQ.from_quadratic(lqr_q_matrix(A, Bm, Qc, R, gamma), 4)
    xs, us = ca.SX.sym("x", 4), ca.SX.sym("u", 2)
    f = ca.Function("f", [xs, us], [ca.mtimes(A, xs) + ca.mtimes(Bm, us)])
    c = ca.Function("c", [xs, us], [ca.bilin(Qc, xs, xs) + ca.bilin(R, us, us)])
    layer = ArgminLayer(q, -np.inf, np.inf, horizon=horizon, dynamics=f, stage_cost=c, discount=gamma, tol=1e-13)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, generator=g, dtype=torch.float64).requires_grad_(True)
    u, v = layer(x)
    xn = x.detach().numpy()
    jac = np.stack([torch.autograd.grad(u[:, i].sum(), x, retain_graph=True)[0].numpy() for i in range(2)], 1)
    (gv,) = torch.autograd.grad(v.sum(), x)
    return {
        "u*": float(np.abs(u.detach().numpy() + xn @ K.T).max()),
        "V": float(np.abs(v.detach().numpy() - np.einsum("bi,ij,bj->b", xn, P, xn)).max()),
        "du*/dx": float(np.abs(jac + K[None]).max()),
        "dV/dx": float(np.abs(gv.numpy() - 2 * xn @ P).max()),
    }


GOLDEN_FILE = resources.files("qmpc").joinpath("data/golden.json")
"""The golden cases stored with the package."""

_GOLDEN_KEYS = ("name", "arch", "obs_dim", "act_dim", "hidden", "theta", "horizon", "low", "high", "x", "expected")


def golden_cases(path=None) -> list[dict]:
    """Seeded cases with stored solutions and gradients (``qmpc/data/golden.json``, or ``path``).
    A file that is missing, truncated or not a list of cases is an :class:`InputError` naming it."""
    path = GOLDEN_FILE if path is None else path
    try:
        cases = json.loads(path.read_text())["cases"]
        if not isinstance(cases, list) or not cases:
            raise TypeError("no list of cases")
        for case in cases:
            missing = [k for k in _GOLDEN_KEYS if k not in case]
            if missing:
                raise KeyError(missing[0])
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        what = f"no key {e}" if isinstance(e, KeyError) else str(e)
        raise InputError(f"expected the golden cases of qmpc check in {path}, got: {what} (reinstall qmpc)") from None
    return cases


def _golden_layer(case: dict) -> tuple[ArgminLayer, torch.Tensor]:
    nx, nu = case["obs_dim"], case["act_dim"]
    torch.manual_seed(0)
    kw = {"action_curvature": case["action_curvature"]} if "action_curvature" in REGISTRY[case["arch"]].options else {}
    q = ARCHITECTURES[case["arch"]](nx, nu, hidden=tuple(case["hidden"]), **kw).double()
    q.load_flat_parameters(np.array(case["theta"]))
    model = {}
    if case["horizon"] > 1:
        f, c, _, _ = linear_model(nx, nu, case["model_seed"])
        model = dict(dynamics=f, stage_cost=c, discount=case["discount"])
    layer = ArgminLayer(q, np.array(case["low"]), np.array(case["high"]), horizon=case["horizon"], tol=1e-13, **model)
    return layer, torch.tensor(case["x"], dtype=torch.float64)


def golden_outputs(layer: ArgminLayer, x: torch.Tensor) -> dict[str, list]:
    """The quantities stored for a golden case: ``u*``, ``V`` and the gradients in ``θ`` of
    ``Σ u*`` and ``Σ V``."""
    params = list(layer.q.parameters())
    u, v = layer(x)
    gu = torch.autograd.grad(u.sum(), params, retain_graph=True)
    gv = torch.autograd.grad(v.sum(), params)
    flat = lambda gs: torch.cat([g.reshape(-1) for g in gs]).tolist()  # noqa: E731
    return {"u_star": u.tolist(), "value": v.tolist(), "grad_u_theta": flat(gu), "grad_v_theta": flat(gv)}


def golden_errors(case: dict) -> float:
    """Max absolute difference between a golden case and this installation."""
    layer, x = _golden_layer(case)
    got = golden_outputs(layer, x)
    return max(float(np.abs(np.array(got[k]) - np.array(case["expected"][k])).max()) for k in got)


def fd_cases(quick: bool) -> list[tuple[str, str, int, str, float, str]]:
    """``(arch, bounds, horizon, plugin, tol, model)`` of the finite-difference rows."""
    archs, plugins = list(ARCHITECTURES), ("sqpmethod", "ipopt")
    if quick:
        cases = [(a, "mixed", h, "sqpmethod", 1e-13, "linear") for a in archs for h in (1, 3)]
        ipopt = [("PICNN", "mixed", 1, "ipopt", 1e-8, "linear"), ("PICNN", "mixed", 3, "ipopt", 1e-8, "mlp-tv")]
        return [*cases, *ipopt, ("PICNN", "mixed", 1, "newton", 1e-8, "linear")]
    bounds = ("inactive", "active", "mixed")
    # the batched Newton of the TD target (horizon 1, PICNN), at every tolerance
    newton = [("PICNN", b, 1, "newton", t, "linear") for b in bounds for t in (1e-13, 1e-8, 1e-6)]
    cases = [(a, b, h, p, 1e-13, "linear") for a in archs for b in bounds for h in (1, 3) for p in plugins]
    # the tolerance of the configs (1e-8) and the controller (1e-6 for H > 1), where IPOPT stops
    # inside active bounds
    cases += [
        (a, b, h, p, t, "linear")
        for a in archs
        for b in ("active", "mixed")
        for h in (1, 3)
        for p in plugins
        for t in (1e-8, 1e-6)
    ]
    # through a learned MLP model (time-varying too), a stage cost reading x⁺
    cases += [(a, "mixed", h, p, 1e-8, m) for a in archs for h in (3, 5) for m in ("mlp", "mlp-tv") for p in plugins]
    return cases + newton


def run_checks(quick: bool = True) -> Iterator[CheckRow]:
    """Yield the checks of ``qmpc check``: ``quick`` runs one case per family. The golden file is
    read first: a damaged one is an :class:`InputError` before any check runs."""
    golden = golden_cases()
    for arch in ARCHITECTURES:
        e = twin_errors(make_network(arch, 4, 2, 0))
        yield CheckRow(f"twin {arch}: value/grad/Hessian", max(e.values()), 1e-10)
    e = twin_errors(make_network("PICNN", 4, 2, 0, layer_norm=True))
    yield CheckRow("twin PICNN layer_norm: value/grad/Hessian", max(e.values()), 1e-10)
    for arch, bounds, h, plugin, tol, model in fd_cases(quick):
        batch = 8 if plugin == "newton" else 3  # the batched Newton takes batches of 8 and more
        layer, x = make_scenario(arch, bounds, h, plugin, tol=tol, model=model, batch=batch)
        e = fd_errors(layer, x, n_dirs=1 if quick or tol > 1e-13 else 3)
        where = "" if model == "linear" else f" model={model}"
        yield CheckRow(f"FD {arch} H={h} bounds={bounds}{where} {plugin} tol={tol:.0e}", max(e.values()), 1e-6)
    layer, x = make_scenario("PICNN", "mixed", 1, "newton", tol=1e-8, batch=8, layer_norm=True)
    e = fd_errors(layer, x, n_dirs=1)
    yield CheckRow("FD PICNN layer_norm H=1 bounds=mixed newton tol=1e-08", max(e.values()), 1e-6)
    e = clip_closed_form()
    yield CheckRow("closed form: diagonal quadratic, u*=clip(mu)", max(e.values()), 1e-9)
    for h in (1, 3):
        e = lqr_closed_form(h)
        yield CheckRow(f"closed form: LQR, Riccati terminal cost, H={h}", max(e.values()), 1e-8)
    layer, x = make_scenario("PICNN", "mixed", 1)
    e = envelope_identity(layer, x)
    yield CheckRow("envelope identity: dQ/du . du*/dtheta = 0", max(e["chain_vs_envelope"], e["cross_term"]), 1e-8)
    for case in golden:
        yield CheckRow(f"golden {case['name']}", golden_errors(case), 1e-7)


def format_table(rows: list[CheckRow]) -> str:
    """A plain-text pass/fail table."""
    w = max(len(r.name) for r in rows)
    lines = [f"{'check':<{w}}  {'error':>10}  {'tolerance':>9}  result", "-" * (w + 32)]
    for r in rows:
        lines.append(f"{r.name:<{w}}  {r.error:>10.2e}  {r.tolerance:>9.0e}  {'PASS' if r.passed else 'FAIL'}")
    return "\n".join(lines)
