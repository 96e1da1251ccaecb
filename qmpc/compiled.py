"""Compiled closed forms (numba) of the controller's two per-step problems, one state at a time:
the greedy action ``argmin_u Q(x, u)`` in the bounds (:class:`GreedyNewton`) and the value,
gradient and exact Hessian of a single-shooting plan through a learned model with learned heads
(:class:`CompiledPlan`). Framework-free (numpy arrays in and out; never torch).

The formulas are those of the numpy closed forms they stand in for, which stay the reference
(the tests hold the two together): :meth:`qmpc.networks.PICNN.numpy_batch_derivatives` and
:class:`~qmpc.networks.PICNNActionOracle` (Q), :class:`qmpc.dynamics.MLPStageDerivatives` (the
model), :meth:`qmpc.dynamics.OutcomeModel.cost_derivatives` and ``termination_derivatives`` (the
heads) and :class:`qmpc.plan_batch.PlanBatchOracle` (the plan). What changes is where the time
goes: a controller's plan at H = 3 with 64-wide networks is ~1 MFLOP of arithmetic, on which numpy
spends ~500 Python-level calls (~1 ms a Hessian); compiled, one call does it.

A closed form is *packable* when it carries a ``compiled`` attribute ``(kind, layout)`` (set where
it is built): ``"picnn"``, ``"mlp"`` (a residual model ``x⁺ = x + MLP(x, u)``), ``"cost_head"`` (an
MLP, or a quadratic form: :func:`quadratic_layout`), ``"termination_head"``. The weights of
everything one solve reads travel in one flat buffer with a table of offsets and shapes
(:class:`_Buffer`): numba unboxes two arrays per call, where a tuple of ~40 weight arrays cost
~60 µs a call. Without numba (:data:`AVAILABLE` False) nothing here is used
and the controller keeps its numpy and CasADi paths. Kernels are compiled at their first call and
cached on disk (``cache=True``: 89 s the first time on the benchmark machine, then 0.5 s to load).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from qmpc.boxsqp import FLOOR, LAZY_RESIDUAL

try:  # an optional accelerator: the package works without it
    from numba import njit

    AVAILABLE = True
except ImportError:  # pragma: no cover - exercised only where numba is missing
    AVAILABLE = False

    def njit(*args, **kwargs):  # a no-op decorator, so that the module imports
        if args and callable(args[0]):
            return args[0]
        return lambda f: f


__all__ = ["ACTIVATION_CODES", "AVAILABLE", "CompiledPlan", "GreedyNewton", "pack_of"]

ACTIVATION_CODES = {"tanh": 0, "softplus": 1, "sigmoid": 2, "silu": 3}
"""The activations of :data:`qmpc.networks.base.ACTIVATIONS` as the kernels' integer codes."""

_FAST = {"reassoc", "contract"}  # sums in any order (vectorised); no assumption about NaN or Inf


def pack_of(closed_form: Any, kind: str) -> dict | None:
    """The layout a closed form carries for the kernels (its ``compiled`` attribute) if it is of
    ``kind`` and numba is available, else None."""
    pack = getattr(closed_form, "compiled", None)
    if not AVAILABLE or pack is None or pack[0] != kind:
        return None
    return pack[1]


# --------------------------------------------------------------------------------------------
# Small dense products (loops: numba's BLAS needs SciPy, and these products are small)
# --------------------------------------------------------------------------------------------


@njit(cache=True, fastmath=_FAST)
def _dot(a, b):
    s = 0.0
    for i in range(a.shape[0]):
        s += a[i] * b[i]
    return s


@njit(cache=True, fastmath=_FAST)
def _mv(A, x):
    """``A @ x``."""
    n, m = A.shape
    y = np.empty(n)
    for i in range(n):
        s = 0.0
        for j in range(m):
            s += A[i, j] * x[j]
        y[i] = s
    return y


@njit(cache=True, fastmath=_FAST)
def _tv(A, x):
    """``Aᵀ @ x``."""
    n, m = A.shape
    y = np.zeros(m)
    for i in range(n):
        a = x[i]
        for j in range(m):
            y[j] += A[i, j] * a
    return y


@njit(cache=True, fastmath=_FAST)
def _mt(A, B):
    """``A @ Bᵀ`` (rows against rows: every inner loop runs along a contiguous row)."""
    n, k2, m = A.shape[0], A.shape[1], B.shape[0]
    C = np.empty((n, m))
    for i in range(n):
        for j in range(m):
            s = 0.0
            for k in range(k2):
                s += A[i, k] * B[j, k]
            C[i, j] = s
    return C


@njit(cache=True)
def _quad(JT, w):
    """``Jᵀ diag(w) J`` from ``Jᵀ (n, d)``: the Jacobians are kept transposed, directions first."""
    return _mt(JT * w, JT)


@njit(cache=True)
def _cross(JaT, w, JbT):
    """``Jaᵀ diag(w) Jb + Jbᵀ diag(w) Ja`` from the transposed Jacobians."""
    C = _mt(JaT * w, JbT)
    return C + C.T


@njit(cache=True, fastmath=_FAST)
def _row_sums(JT):
    out = np.zeros(JT.shape[0])
    for i in range(JT.shape[0]):
        s = 0.0
        for k in range(JT.shape[1]):
            s += JT[i, k]
        out[i] = s
    return out


# --------------------------------------------------------------------------------------------
# Elementwise activations (one or two transcendental functions an element)
# --------------------------------------------------------------------------------------------


@njit(cache=True)
def _act(code, a):
    """``σ(a), σ'(a), σ''(a)`` of a vector (the functions of :func:`qmpc.networks.base.np_activation`;
    the logistic sigmoid from one ``exp``, equal to numpy's ``tanh`` form to rounding)."""
    n = a.shape[0]
    s, d1, d2 = np.empty(n), np.empty(n), np.empty(n)
    for i in range(n):
        x = a[i]
        if code == 0:
            t = np.tanh(x)
            d = 1.0 - t * t
            s[i], d1[i], d2[i] = t, d, -2.0 * t * d
            continue
        e = np.exp(-abs(x))
        sg = 1.0 / (1.0 + e) if x >= 0.0 else e / (1.0 + e)
        ds = sg * (1.0 - sg)
        if code == 1:
            s[i], d1[i], d2[i] = max(x, 0.0) + np.log1p(e), sg, ds
        elif code == 2:
            s[i], d1[i], d2[i] = sg, ds, ds * (1.0 - 2.0 * sg)
        else:
            s[i], d1[i], d2[i] = x * sg, sg + x * ds, ds * (2.0 + x * (1.0 - 2.0 * sg))
    return s, d1, d2


@njit(cache=True)
def _act_value(code, a):
    """``σ(a)`` alone."""
    n = a.shape[0]
    s = np.empty(n)
    for i in range(n):
        x = a[i]
        if code == 0:
            s[i] = np.tanh(x)
            continue
        e = np.exp(-abs(x))
        if code == 1:
            s[i] = max(x, 0.0) + np.log1p(e)
        else:
            sg = 1.0 / (1.0 + e) if x >= 0.0 else e / (1.0 + e)
            s[i] = sg if code == 2 else x * sg
    return s


# --------------------------------------------------------------------------------------------
# The weights: one flat buffer, a table of (offset, rows, columns)
# --------------------------------------------------------------------------------------------


@njit(cache=True)
def _m(buf, meta, i):
    o, r, c = meta[i, 0], meta[i, 1], meta[i, 2]
    return buf[o : o + r * c].reshape((r, c))


@njit(cache=True)
def _v(buf, meta, i):
    o, r, c = meta[i, 0], meta[i, 1], meta[i, 2]
    return buf[o : o + r * c]


# --------------------------------------------------------------------------------------------
# An MLP y = W_L h_{L-1} + b_L, h_l = σ(W_l h_{l-1} + b_l), at table entries b … (W_0 … W_L, b_0 … b_L)
# --------------------------------------------------------------------------------------------


@njit(cache=True)
def _mlp_forward(buf, meta, base, nl, code, z, DT, Ja, d1s, d2s):
    """The last hidden layer at ``z (nz,)``; appends to the tape lists each hidden layer's
    ``J_lᵀ = (∂a_l/∂(directions))ᵀ (n, width)`` along the directions ``Dᵀ (n, nz)``, ``σ'(a_l)`` and ``σ''(a_l)``."""
    h = z
    JT = DT
    for layer in range(nl):
        W = _m(buf, meta, base + layer)
        JlT = _mt(JT, W)
        h, d1, d2 = _act(code, _mv(W, h) + _v(buf, meta, base + nl + 1 + layer))
        Ja.append(JlT)
        d1s.append(d1)
        d2s.append(d2)
        JT = JlT * d1
    return h


@njit(cache=True)
def _mlp_reverse(buf, meta, base, nl, Ja, d1s, d2s, at, g):
    """From ``g``, the adjoint of the last hidden layer, with the tape entries ``at … at + nl − 1``:
    the adjoint of the input ``(nz,)`` and the Hessian of the scalar along the tape's directions,
    ``Σ_l J_lᵀ diag(ḡ_l ∘ σ''(a_l)) J_l (n, n)``."""
    n = Ja[at].shape[0]
    H = np.zeros((n, n))
    for layer in range(nl - 1, -1, -1):
        H += _quad(Ja[at + layer], g * d2s[at + layer])
        g = _tv(_m(buf, meta, base + layer), g * d1s[at + layer])
    return g, H


@njit(cache=True)
def _mlp_value(buf, meta, base, nl, code, z):
    h = z
    for layer in range(nl):
        h = _act_value(code, _mv(_m(buf, meta, base + layer), h) + _v(buf, meta, base + nl + 1 + layer))
    return _mv(_m(buf, meta, base + nl), h) + _v(buf, meta, base + 2 * nl + 1)


@njit(cache=True)
def _head(buf, meta, base, nl, code, shift, scale, sigmoid, z, DT):
    """A scalar head ``c = shift + scale · y`` (or ``p = sigmoid(y)``) at ``z (n3,)``: the value, its
    gradient in ``z`` and its Hessian along the directions ``Dᵀ (n, n3)``. ``nl < 0``: a quadratic
    cost (:func:`quadratic_layout`), never a sigmoid."""
    if nl < 0:
        a, q = _v(buf, meta, base), _v(buf, meta, base + 1)
        y = _dot(a, z) + _dot(q, z * z) + _v(buf, meta, base + 2)[0]
        return shift + scale * y, scale * (a + 2.0 * q * z), _quad(DT, 2.0 * scale * q)
    Ja, d1s, d2s = [DT], [z], [z]  # typed by their first entries, emptied here
    Ja.pop(), d1s.pop(), d2s.pop()
    h = _mlp_forward(buf, meta, base, nl, code, z, DT, Ja, d1s, d2s)
    w = _m(buf, meta, base + nl)[0].copy()
    y = _dot(w, h) + _v(buf, meta, base + 2 * nl + 1)[0]
    g, H = _mlp_reverse(buf, meta, base, nl, Ja, d1s, d2s, 0, w)
    if not sigmoid:
        return shift + scale * y, scale * g, scale * H
    p, d1, d2 = _act(2, np.array([y]))
    gd = _mv(DT, g)
    return p[0], d1[0] * g, d2[0] * np.outer(gd, gd) + d1[0] * H


@njit(cache=True)
def _head_value(buf, meta, base, nl, code, shift, scale, sigmoid, z):
    if nl < 0:
        a, q = _v(buf, meta, base), _v(buf, meta, base + 1)
        return shift + scale * (_dot(a, z) + _dot(q, z * z) + _v(buf, meta, base + 2)[0])
    y = _mlp_value(buf, meta, base, nl, code, z)[0]
    if sigmoid:
        return _act_value(2, np.array([y]))[0]
    return shift + scale * y


# --------------------------------------------------------------------------------------------
# The PICNN: value, gradient in (x, u) and Hessian along directions
# --------------------------------------------------------------------------------------------
# Table entries from its base b: T, shift; per layer k of the convex path (L of them) at b + 2 + 8k:
# Wyx, byx, Wy, Wx, bx, Wzx, bzx, Wz (zeros at layer 0); per state-path layer k at b + 2 + 8L + 4k:
# W, b, the layer norm's scale and shift (ones and zeros without).


@njit(cache=True)
def _layer_norm(pre, JpreT, eps):
    d = pre.shape[0]
    c = pre - pre.mean()
    s = np.sqrt((c * c).mean() + eps)
    n = c / s
    JnT = (JpreT - _row_sums(JpreT).reshape(-1, 1) / d - np.outer(_mv(JpreT, n), n) / d) / s
    return n, s, JnT


@njit(cache=True)
def _layer_norm_reverse(H, g, n, s, JT, hessian):
    """As :func:`qmpc.networks.picnn._layer_norm_reverse`, for one sample, from ``Jᵀ (n, d)`` (adds
    to ``H`` in place)."""
    d = n.shape[0]
    alpha = _dot(n, g)
    r = g - g.mean() - alpha * n / d
    if hessian:
        a, b = _mv(JT, r), _mv(JT, n)
        one = _row_sums(JT)
        ab = np.outer(a, b)
        JPJ = _mt(JT, JT) - (np.outer(one, one) + np.outer(b, b)) / d
        H -= (ab + ab.T + alpha * JPJ) / (d * s * s)
    return r / s


@njit(cache=True)
def _picnn_forward(buf, meta, b, L, code, ln, eps, x, u, DxT, DuT):
    """The forward pass of :func:`_picnn`: the last layer's output and the tape (per layer ``v1``
    and its Jacobian; from layer 1 on the z-entries; for layers 0 … L − 2 the state path's)."""
    n = DxT.shape[0]
    P = b + 2 + 8 * L
    xt = _mv(_m(buf, meta, b), x - _v(buf, meta, b + 1))
    Jxt = _mt(DxT, _m(buf, meta, b))
    one2, one1 = np.zeros((n, 1)), np.zeros(1)
    # the tape: per layer (v1, Jv1), from layer 1 on the z-entries, for layers 0 … L − 2 the state path's
    v1s, zs, gates, dgs, d2gs, dzs, d2zs = [one1], [one1], [one1], [one1], [one1], [one1], [one1]
    das, d2as, lnn, lnsd = [one1], [one1], [one1], [one1]
    Jv1s, Jzs, Jgpres, Jgates, Jouts, Jpres, lnJ = [one2], [one2], [one2], [one2], [one2], [one2], [one2]
    for lst in (v1s, zs, gates, dgs, d2gs, dzs, d2zs, das, d2as, lnn, lnsd):
        lst.pop()
    for lst2 in (Jv1s, Jzs, Jgpres, Jgates, Jouts, Jpres, lnJ):
        lst2.pop()
    z, Jz, out = one1, one2, one1
    for k in range(L):
        e = b + 2 + 8 * k
        Wyx, Wy, Wx = _m(buf, meta, e), _m(buf, meta, e + 2), _m(buf, meta, e + 3)
        v1 = _mv(Wyx, xt) + _v(buf, meta, e + 1)
        Jv1 = _mt(Jxt, Wyx)
        Jp1 = Jv1 * u + DuT * v1
        out = _mv(Wy, u * v1) + _mv(Wx, xt) + _v(buf, meta, e + 4)
        Jout = _mt(Jp1, Wy) + _mt(Jxt, Wx)
        v1s.append(v1)
        Jv1s.append(Jv1)
        if k > 0:
            Wzx, Wz = _m(buf, meta, e + 5), _m(buf, meta, e + 7)
            gate, dg, d2g = _act(1, _mv(Wzx, xt) + _v(buf, meta, e + 6))
            Jgpre = _mt(Jxt, Wzx)
            Jgate = Jgpre * dg
            out = out + _mv(Wz, z * gate)
            Jout = Jout + _mt(Jz * gate + Jgate * z, Wz)
            zs.append(z)
            Jzs.append(Jz)
            gates.append(gate)
            dgs.append(dg)
            d2gs.append(d2g)
            Jgpres.append(Jgpre)
            Jgates.append(Jgate)
        if k < L - 1:
            z, dz, d2z = _act(1, out)
            dzs.append(dz)
            d2zs.append(d2z)
            Jouts.append(Jout)
            Jz = Jout * dz
            W = _m(buf, meta, P + 4 * k)
            pre = _mv(W, xt) + _v(buf, meta, P + 4 * k + 1)
            Jpre = _mt(Jxt, W)
            if ln:
                nrm, s_, Jn = _layer_norm(pre, Jpre, eps)
                lnn.append(nrm)
                lnsd.append(np.array([s_]))
                lnJ.append(Jpre)
                scale = _v(buf, meta, P + 4 * k + 2)
                pre = scale * nrm + _v(buf, meta, P + 4 * k + 3)
                Jpre = Jn * scale
            xt, da, d2a = _act(code, pre)
            das.append(da)
            d2as.append(d2a)
            Jpres.append(Jpre)
            Jxt = Jpre * da
    vec = (v1s, zs, gates, dgs, d2gs, dzs, d2zs, das, d2as, lnn, lnsd)
    return out, vec, (Jv1s, Jzs, Jgpres, Jgates, Jouts, Jpres, lnJ)


@njit(cache=True)
def _picnn(buf, meta, b, L, code, ln, m, eps, x, u, DxT, DuT, hessian):
    """``(Q, ∇_x Q (nx,), ∇_u Q (nu,), ∇²Q along the directions (n, n))`` at ``(x, u)``, the
    directions' seeds ``Dxᵀ (n, nx)`` (of ``x``) and ``Duᵀ (n, nu)`` (of ``u``); ``hessian`` False:
    a zero Hessian (pass one zero direction: nothing else reads them). The reverse pass gives the
    gradient and the second-order terms of every nonlinear node."""
    n = DxT.shape[0]
    P = b + 2 + 8 * L
    out, vec, mat = _picnn_forward(buf, meta, b, L, code, ln, eps, x, u, DxT, DuT)
    v1s, zs, gates, dgs, d2gs, dzs, d2zs, das, d2as, lnn, lnsd = vec
    Jv1s, Jzs, Jgpres, Jgates, Jouts, Jpres, lnJ = mat
    q = out[0] + 0.5 * m * _dot(u, u)
    H = np.zeros((n, n))
    if hessian:
        H += m * _mt(DuT, DuT)
    g_out = np.ones(1)
    g_u = m * u
    g_xt_next = np.zeros(1)
    for k in range(L - 1, -1, -1):
        e = b + 2 + 8 * k
        g_xt = _tv(_m(buf, meta, e + 3), g_out)
        g_p1 = _tv(_m(buf, meta, e + 2), g_out)
        g_u = g_u + v1s[k] * g_p1
        if hessian:
            H += _cross(DuT, g_p1, Jv1s[k])
        g_xt += _tv(_m(buf, meta, e), u * g_p1)
        if k < L - 1:  # xt_{k+1} = act(W xt_k + b), or act(LN(W xt_k + b))
            g_pre = g_xt_next * das[k]
            if hessian:
                H += _quad(Jpres[k], g_xt_next * d2as[k])
            if ln:
                g_ln = _v(buf, meta, P + 4 * k + 2) * g_pre
                g_pre = _layer_norm_reverse(H, g_ln, lnn[k], lnsd[k][0], lnJ[k], hessian)
            g_xt += _tv(_m(buf, meta, P + 4 * k), g_pre)
        if k > 0:
            j = k - 1  # this layer's entry of the z-tapes, and the previous layer's activation
            g_p2 = _tv(_m(buf, meta, e + 7), g_out)
            if hessian:
                H += _cross(Jzs[j], g_p2, Jgates[j])
            g_gate = zs[j] * g_p2
            if hessian:
                H += _quad(Jgpres[j], g_gate * d2gs[j])
            g_xt += _tv(_m(buf, meta, e + 5), g_gate * dgs[j])
            g_z = gates[j] * g_p2
            if hessian:
                H += _quad(Jouts[j], g_z * d2zs[j])
            g_out = g_z * dzs[j]
        g_xt_next = g_xt
    return q, _tv(_m(buf, meta, b), g_xt_next), g_u, H


@njit(cache=True)
def _picnn_constants(buf, meta, b, L, code, ln, eps, x):
    """The state path's constants of ``Q(x, ·)`` for a fixed ``x`` (as :class:`~qmpc.networks.PICNNActionOracle`):
    per layer ``v_k (nu,)`` (rows of ``V``), ``c_k`` and the gates ``s_k`` (rows of ``Cc``, ``S``, zero-padded)."""
    P = b + 2 + 8 * L
    width = 1
    for k in range(L):
        width = max(width, meta[b + 2 + 8 * k + 3, 1])
    nu = meta[b + 2, 1]
    V, Cc, S = np.zeros((L, nu)), np.zeros((L, width)), np.zeros((L, width))
    xt = _mv(_m(buf, meta, b), x - _v(buf, meta, b + 1))
    for k in range(L):
        e = b + 2 + 8 * k
        V[k] = _mv(_m(buf, meta, e), xt) + _v(buf, meta, e + 1)
        c = _mv(_m(buf, meta, e + 3), xt) + _v(buf, meta, e + 4)
        Cc[k, : c.shape[0]] = c
        if k > 0:
            s = _act_value(1, _mv(_m(buf, meta, e + 5), xt) + _v(buf, meta, e + 6))
            S[k, : s.shape[0]] = s
        if k < L - 1:
            pre = _mv(_m(buf, meta, P + 4 * k), xt) + _v(buf, meta, P + 4 * k + 1)
            if ln:
                cen = pre - pre.mean()
                nrm = cen / np.sqrt((cen * cen).mean() + eps)
                pre = _v(buf, meta, P + 4 * k + 2) * nrm + _v(buf, meta, P + 4 * k + 3)
            xt = _act_value(code, pre)
    return V, Cc, S


@njit(cache=True)
def _picnn_u(buf, meta, b, L, m, V, Cc, S, u, derivatives):
    """``Q (x, u)`` at the fixed state of ``V, Cc, S`` (:func:`_picnn_constants`) and, with
    ``derivatives``, ``∇_u Q (nu,)`` and ``∇²_u Q (nu, nu)`` (the convex path alone)."""
    nu = u.shape[0]
    z = np.zeros(1)
    out = np.zeros(1)
    H = m * np.eye(nu)
    Js, dzs, d2zs = [np.zeros((nu, 1))], [z], [z]
    Js.pop(), dzs.pop(), d2zs.pop()
    J = np.zeros((nu, 1))
    for k in range(L):
        e = b + 2 + 8 * k
        Wy = _m(buf, meta, e + 2)
        w = Wy.shape[0]
        out = _mv(Wy, u * V[k]) + Cc[k, :w]
        Jk = np.ascontiguousarray(Wy.T) * V[k].reshape(-1, 1)
        if k > 0:
            Wz = _m(buf, meta, e + 7)
            zs = z * S[k, : z.shape[0]]
            out = out + _mv(Wz, zs)
            if derivatives:
                Jk = Jk + _mt(J * (S[k, : z.shape[0]] * dzs[k - 1]), Wz)
        if k < L - 1:
            if derivatives:
                z, dz, d2z = _act(1, out)
                dzs.append(dz)
                d2zs.append(d2z)
                Js.append(Jk)
            else:
                z = _act_value(1, out)
        J = Jk
    q = out[0] + 0.5 * m * _dot(u, u)
    if not derivatives:
        return q, u, H
    g_out = np.ones(1)
    grad = m * u
    for k in range(L - 1, -1, -1):
        e = b + 2 + 8 * k
        grad += _tv(_m(buf, meta, e + 2), g_out) * V[k]
        if k > 0:
            g_z = _tv(_m(buf, meta, e + 7), g_out) * S[k, : dzs[k - 1].shape[0]]
            H += _quad(Js[k - 1], g_z * d2zs[k - 1])
            g_out = g_z * dzs[k - 1]
    return q, grad, H


@njit(cache=True)
def _solve_spd(H, g):
    """``H⁻¹ g`` for a small symmetric ``H`` by Cholesky, its diagonal raised until it factors
    (Q is strictly convex in u: the first try factors but for rounding)."""
    n = g.shape[0]
    scale = 1.0
    for i in range(n):
        scale = max(scale, abs(H[i, i]))
    shift = 0.0
    Lc = np.zeros((n, n))
    for _ in range(60):
        ok = True
        Lc[:] = 0.0
        for i in range(n):
            for j in range(i + 1):
                s = H[i, j] + (shift if i == j else 0.0)
                for k in range(j):
                    s -= Lc[i, k] * Lc[j, k]
                if i == j:
                    if not s > 1e-12 * scale:
                        ok = False
                        break
                    Lc[i, i] = np.sqrt(s)
                else:
                    Lc[i, j] = s / Lc[j, j]
            if not ok:
                break
        if ok:
            break
        shift = max(2.0 * shift, 1e-8 * scale)
    y = np.zeros(n)
    for i in range(n):
        s = g[i]
        for k in range(i):
            s -= Lc[i, k] * y[k]
        y[i] = s / Lc[i, i]
    x = np.zeros(n)
    for i in range(n - 1, -1, -1):
        s = y[i]
        for k in range(i + 1, n):
            s -= Lc[k, i] * x[k]
        x[i] = s / Lc[i, i]
    return x


@njit(cache=True)
def _greedy(buf, meta, ints, floats, x, u0, lb, ub, tol, max_iter):
    """``argmin_u Q(x, u)`` in ``[lb, ub]`` from ``u0``: Bertsekas' projected Newton (components
    within ``min(1e-3, r)`` of a bound that the gradient pushes into are held and take a scaled
    gradient step; Newton's step in the others on their block of the Hessian; an Armijo
    backtracking along the projection arc). Returns ``(u, Q, residual, iterations)``."""
    b, L, code, ln = ints[0], ints[1], ints[2], ints[3]
    m, eps = floats[0], floats[1]
    nu = u0.shape[0]
    V, Cc, S = _picnn_constants(buf, meta, b, L, code, ln, eps, x)
    u = np.minimum(np.maximum(u0, lb), ub)
    f, g, H = _picnn_u(buf, meta, b, L, m, V, Cc, S, u, True)
    r = np.abs(u - np.minimum(np.maximum(u - g, lb), ub)).max()
    it = 0
    while r > tol and it < max_iter and np.isfinite(r):
        it += 1
        e = min(1e-3, r)
        held = ((u - lb <= e) & (g > 0)) | ((ub - u <= e) & (g < 0))
        free = np.nonzero(~held)[0]
        d = np.zeros(nu)
        for i in range(nu):
            if held[i]:
                d[i] = -g[i] / max(abs(H[i, i]), 1e-12)
        if free.size:
            Hf = np.empty((free.size, free.size))
            gf = np.empty(free.size)
            for a in range(free.size):
                gf[a] = g[free[a]]
                for c in range(free.size):
                    Hf[a, c] = 0.5 * (H[free[a], free[c]] + H[free[c], free[a]])
            df = _solve_spd(Hf, gf)
            for a in range(free.size):
                d[free[a]] = -df[a]
        step = 1.0
        moved = False
        for _ in range(30):
            trial = np.minimum(np.maximum(u + step * d, lb), ub)
            ft = _picnn_u(buf, meta, b, L, m, V, Cc, S, trial, False)[0]
            if ft <= f + 1e-4 * _dot(g, trial - u) + 1e-13 * (1.0 + abs(f)):
                u = trial
                moved = True
                break
            step *= 0.5
        if not moved:
            break
        f, g, H = _picnn_u(buf, meta, b, L, m, V, Cc, S, u, True)
        r = np.abs(u - np.minimum(np.maximum(u - g, lb), ub)).max()
    return u, f, r, it


# --------------------------------------------------------------------------------------------
# The single-shooting plan: J, ∇J, ∇²J (the formulas of qmpc.plan_batch, one plan)
# --------------------------------------------------------------------------------------------
# ints: Q's base, layers, activation, layer norm; the model's base, hidden layers, activation;
# the cost head's (3), the termination head's (3), whether there is one, nu.
# floats: Q's m and ε, the cost's shift and scale, γ.


@njit(cache=True)
def _plan_value(buf, meta, I, F, x0, w):
    nu = I[14]
    U = w.reshape(-1, nu)
    N = U.shape[0] - 1
    x = x0.copy()
    J, alive = 0.0, 1.0
    gamma = F[4]
    for k in range(N):
        xn = x + _mlp_value(buf, meta, I[4], I[5], I[6], np.concatenate((x, U[k])))
        z3 = np.concatenate((x, U[k], xn))
        J += gamma**k * alive * _head_value(buf, meta, I[7], I[8], I[9], F[2], F[3], False, z3)
        if I[13]:
            alive *= 1.0 - _head_value(buf, meta, I[10], I[11], I[12], 0.0, 1.0, True, z3)
        x = xn
    V, Cc, S = _picnn_constants(buf, meta, I[0], I[1], I[2], I[3], F[1], x)
    return J + gamma**N * alive * _picnn_u(buf, meta, I[0], I[1], F[0], V, Cc, S, U[N].copy(), False)[0]


@njit(cache=True)
def _survival(t, q):
    """``s (N+1,)``, ``E (N, N+1)``, ``C (N, N)``, ``rho (N,)`` of :class:`qmpc.plan_batch.SurvivalTerms`
    for one plan."""
    N = q.shape[0]
    s = np.ones(N + 1)
    for i in range(N):
        s[i + 1] = s[i] * q[i]
    E = np.zeros((N, N + 1))
    C = np.zeros((N, N))
    for i in range(1, N + 1):
        for j in range(i):
            e = 1.0
            for l in range(i):
                if l != j:
                    e *= q[l]
            E[j, i] = e
            for m2 in range(j + 1, i):
                c = t[i]
                for l in range(i):
                    if l != j and l != m2:
                        c *= q[l]
                C[j, m2] += c
    C = C + C.T
    return s, E, C, _mv(E, t)


@njit(cache=True)
def _model_rollout(buf, meta, I, x0, U):
    """The model's rollout ``X (N+1, nx)`` under ``U (N+1, nu)``, its Jacobians ``A (N, nx, nx)``,
    ``B (N, nx, nu)`` and its tape (``nl`` entries a stage) for the Hessians of ``λᵀf``."""
    nx, nu, N = x0.shape[0], U.shape[1], U.shape[0] - 1
    mb, mnl, mcode = I[4], I[5], I[6]
    X = np.empty((N + 1, nx))
    X[0] = x0
    A, B = np.empty((N, nx, nx)), np.empty((N, nx, nu))
    eye_nz = np.eye(nx + nu)
    Ja, d1s, d2s = [eye_nz], [x0], [x0]  # typed by their first entries, emptied here
    Ja.pop(), d1s.pop(), d2s.pop()
    Wout = _m(buf, meta, mb + mnl)
    for k in range(N):
        h = _mlp_forward(buf, meta, mb, mnl, mcode, np.concatenate((X[k], U[k])), eye_nz, Ja, d1s, d2s)
        X[k + 1] = X[k] + _mv(Wout, h) + _v(buf, meta, mb + 2 * mnl + 1)
        jac = _mt(Wout, Ja[-1] * d1s[-1])  # (nx, nz)
        A[k] = jac[:, :nx] + np.eye(nx)
        B[k] = jac[:, nx:]
    return X, A, B, Ja, d1s, d2s


@njit(cache=True)
def _stage_maps(A, B, n):
    """Each stage's map to the actions ``T_k = ∂(x_k, u_k, x_{k+1})/∂w``, transposed ``(N, n, n3)``,
    the states' ``Sᵀ (N+1, n, nx)`` and the last action's selection ``Eᵀ (n, nu)``."""
    N, nx, nu = A.shape[0], A.shape[1], B.shape[2]
    ST = np.zeros((N + 1, n, nx))
    for k in range(N):
        ST[k + 1] = _mt(ST[k], A[k])
        for i in range(nu):
            ST[k + 1, k * nu + i] += B[k][:, i]
    TT = np.zeros((N, n, 2 * nx + nu))
    for k in range(N):
        TT[k, :, :nx] = ST[k]
        for i in range(nu):
            TT[k, k * nu + i, nx + i] = 1.0
        TT[k, :, nx + nu :] = ST[k + 1]
    EuT = np.zeros((n, nu))
    for i in range(nu):
        EuT[N * nu + i, i] = 1.0
    return ST, TT, EuT


@njit(cache=True)
def _stage_heads(buf, meta, I, F, X, U, TT, hessian):
    """The cost's and the termination's values ``(N,)``, gradients ``(N, n3)`` in ``(x, u, x⁺)`` and
    Hessians along the actions ``(N, n, n)`` (zeros without ``hessian`` or a termination)."""
    N, n, n3 = TT.shape[0], TT.shape[1], TT.shape[2]
    c, gc, Mc = np.empty(N), np.empty((N, n3)), np.zeros((N, n, n))
    p, gp, Mp = np.zeros(N), np.zeros((N, n3)), np.zeros((N, n, n))
    for k in range(N):
        z3 = np.concatenate((X[k], U[k], X[k + 1]))
        Tk = TT[k].copy() if hessian else np.zeros((1, n3))
        c[k], gc[k], Mck = _head(buf, meta, I[7], I[8], I[9], F[2], F[3], False, z3, Tk)
        if hessian:
            Mc[k] = Mck
        if I[13]:
            p[k], gp[k], Mpk = _head(buf, meta, I[10], I[11], I[12], 0.0, 1.0, True, z3, Tk)
            if hessian:
                Mp[k] = Mpk
    return c, gc, Mc, p, gp, Mp


@njit(cache=True)
def _plan_derivatives(buf, meta, I, F, x0, w, hessian):
    """``(J, ∇J (n,), ∇²J (n, n))`` of the plan ``w (n,)`` from ``x0`` (``hessian`` False: a zero Hessian)."""
    nu, gamma = I[14], F[4]
    nx, n = x0.shape[0], w.shape[0]
    U = w.reshape(-1, nu)
    N = U.shape[0] - 1
    X, A, B, Ja, d1s, d2s = _model_rollout(buf, meta, I, x0, U)
    ST, TT, EuT = _stage_maps(A, B, n)
    # Q along the actions (without the Hessian: one zero direction)
    SNT, DuT = (ST[N].copy(), EuT) if hessian else (np.zeros((1, nx)), np.zeros((1, nu)))
    xN, uN = X[N].copy(), U[N].copy()
    qv, gqx, gqu, Mq = _picnn(buf, meta, I[0], I[1], I[2], I[3], F[0], F[1], xN, uN, SNT, DuT, hessian)
    c, gc, Mc, p, gp, Mp = _stage_heads(buf, meta, I, F, X, U, TT, hessian)
    t = np.empty(N + 1)
    for k in range(N):
        t[k] = gamma**k * c[k]
    t[N] = gamma**N * qv
    s, E, C, rho = _survival(t, 1.0 - p)
    coef_q = s[N] * gamma**N
    Gx, local = np.zeros((N + 1, nx)), np.empty((N, 2 * nx + nu))  # ∂J/∂x_k explicit, the stages' gradients
    for k in range(N):
        local[k] = s[k] * gamma**k * gc[k] - rho[k] * gp[k]
        Gx[k] += local[k, :nx]
        Gx[k + 1] += local[k, nx + nu :]
    Gx[N] += coef_q * gqx
    lam = np.zeros((N + 1, nx))  # the costates
    lam[N] = Gx[N]
    for k in range(N - 1, 0, -1):
        lam[k] = Gx[k] + _tv(A[k], lam[k + 1])
    grad = np.empty(n)
    for k in range(N):
        grad[k * nu : (k + 1) * nu] = local[k, nx : nx + nu] + _tv(B[k], lam[k + 1])
    grad[N * nu :] = coef_q * gqu
    J = _dot(s, t)
    if not hessian:
        return J, grad, np.zeros((n, n))
    Hs = coef_q * Mq
    a_t, bq = np.empty((N + 1, n)), np.empty((N, n))  # ∇t_i and ∇q_j in the actions
    for k in range(N):
        a_t[k] = gamma**k * _mv(TT[k], gc[k])
        bq[k] = -_mv(TT[k], gp[k])
        Hs += s[k] * gamma**k * Mc[k] - rho[k] * Mp[k]
    a_t[N] = gamma**N * _mv(np.concatenate((ST[N], EuT), axis=1), np.concatenate((gqx, gqu)))
    cross = np.zeros((n, n))
    for j in range(N):
        for i in range(N + 1):
            if E[j, i] != 0.0:
                cross += E[j, i] * np.outer(bq[j], a_t[i])
    Hs += cross + cross.T
    for j in range(N):
        for l in range(N):
            if C[j, l] != 0.0:
                Hs += C[j, l] * np.outer(bq[j], bq[l])
    mb, mnl = I[4], I[5]
    for k in range(N):  # the rollout's curvature: Σ_k T_k[:nz]ᵀ ∇²(λ_{k+1}ᵀ f) T_k[:nz]
        _, Hf = _mlp_reverse(buf, meta, mb, mnl, Ja, d1s, d2s, k * mnl, _tv(_m(buf, meta, mb + mnl), lam[k + 1]))
        TxuT = TT[k, :, : nx + nu].copy()
        Hs += _mt(_mt(TxuT, Hf), TxuT)
    return J, grad, 0.5 * (Hs + Hs.T)


# --------------------------------------------------------------------------------------------
# The box SQP of qmpc.boxsqp, one iteration for one plan
# --------------------------------------------------------------------------------------------


@njit(cache=True)
def _jacobi_eigh(A):
    """Eigenvalues and eigenvectors (columns) of a small symmetric ``A`` by cyclic Jacobi rotations
    (numba's ``eigh`` needs SciPy's LAPACK), to an off-diagonal of 1e-15 of the matrix's norm."""
    n = A.shape[0]
    a = A.copy()
    V = np.eye(n)
    norm = 0.0
    for i in range(n):
        for j in range(n):
            norm += a[i, j] * a[i, j]
    for _ in range(100):
        off = 0.0
        for i in range(n):
            for j in range(i + 1, n):
                off += a[i, j] * a[i, j]
        if off <= 1e-30 * norm or off == 0.0:
            break
        for p in range(n - 1):
            for q in range(p + 1, n):
                apq = a[p, q]
                if apq == 0.0:
                    continue
                theta = (a[q, q] - a[p, p]) / (2.0 * apq)
                t = 1.0 / (abs(theta) + np.sqrt(theta * theta + 1.0))
                if theta < 0.0:
                    t = -t
                c = 1.0 / np.sqrt(t * t + 1.0)
                sn = t * c
                for k in range(n):  # columns p, q
                    akp, akq = a[k, p], a[k, q]
                    a[k, p], a[k, q] = c * akp - sn * akq, sn * akp + c * akq
                for k in range(n):  # rows p, q
                    apk, aqk = a[p, k], a[q, k]
                    a[p, k], a[q, k] = c * apk - sn * aqk, sn * apk + c * aqk
                for k in range(n):
                    vkp, vkq = V[k, p], V[k, q]
                    V[k, p], V[k, q] = c * vkp - sn * vkq, sn * vkp + c * vkq
    lam = np.empty(n)
    for i in range(n):
        lam[i] = a[i, i]
    return lam, V


@njit(cache=True)
def _convexified(H, floor, held):
    """:func:`qmpc.boxsqp.convexified` of one Hessian."""
    n = H.shape[0]
    out = H.copy()
    for i in range(n):
        for j in range(n):
            if held[i] or held[j]:
                out[i, j] = 0.0
        if held[i]:
            out[i, i] += max(1.0, abs(H[i, i]))
    lam, V = _jacobi_eigh(0.5 * (out + out.T))
    scale = max(1.0, np.abs(lam).max())
    if lam.min() <= 1e-10 * scale:
        fixed = np.maximum(np.where(lam < 0.0, 0.0, lam), floor * scale)
        out = _mt(V * fixed, V)
    return out


@njit(cache=True)
def _solve_held(H, g, held, bound):
    """``d`` with the held components on their bound and ``H_ff d_f = −g_f − H_fh d_h`` for the others."""
    n = g.shape[0]
    d = np.where(held, bound, 0.0)
    free = np.nonzero(~held)[0]
    if free.size == 0:
        return d
    Hf = np.empty((free.size, free.size))
    rhs = np.empty(free.size)
    for a in range(free.size):
        i = free[a]
        s = -g[i]
        for j in range(n):
            if held[j]:
                s -= H[i, j] * d[j]
        rhs[a] = s
        for c in range(free.size):
            Hf[a, c] = H[i, free[c]]
    df = _solve_spd(Hf, rhs)
    for a in range(free.size):
        d[free[a]] = df[a]
    return d


@njit(cache=True)
def _box_qp(g, H, lo, hi, tol, max_iter):
    """:func:`qmpc.boxsqp._box_qp_one`: block principal pivoting with Murty's rule."""
    n = g.shape[0]
    lower, upper = np.zeros(n, np.bool_), np.zeros(n, np.bool_)
    best, stall, e = n + 1, 0, 0.5 * tol
    d = np.zeros(n)
    for _ in range(max_iter):
        held = lower | upper
        d = _solve_held(H, g, held, np.where(lower, lo, hi))
        mu = _mv(H, d) + g
        to_lower, to_upper = ~held & (d < lo - e), ~held & (d > hi + e)
        misplaced = to_lower | to_upper | (lower & (mu < -e)) | (upper & (mu > e))
        count = misplaced.sum()
        if count == 0:
            break
        if count < best:
            best, stall = count, 0
        else:
            stall += 1
        if stall >= 3:  # Murty's rule: only the last misplaced component
            last = np.nonzero(misplaced)[0][-1]
            misplaced[:] = False
            misplaced[last] = True
        lower = np.where(misplaced, to_lower, lower)
        upper = np.where(misplaced, to_upper, upper)
    d = np.minimum(np.maximum(d, lo), hi)
    mu = _mv(H, d) + g
    return d, np.abs(d - np.minimum(np.maximum(d - mu, lo), hi)).max() <= tol


@njit(cache=True)
def _residual(u, f, g, H, lb, ub, hessian):
    """:func:`qmpc.boxsqp._residual` of one plan (``inf`` where anything is not finite)."""
    if not (np.isfinite(f) and np.isfinite(g).all() and np.isfinite(u).all()):
        return np.inf
    if hessian and not np.isfinite(H).all():
        return np.inf
    return np.abs(u - np.minimum(np.maximum(u - g, lb), ub)).max()


@njit(cache=True)
def _sqp_iteration(buf, meta, I, F, x0, u, f, g, H, r, lb, ub, floor, armijo, max_backtracks, tol, lazy_residual):
    """One iteration of :func:`qmpc.boxsqp.solve_box_sqp` for one plan: the convexified Hessian, the
    box QP of the step, Armijo's backtracking on ``J`` and the derivatives at the new iterate
    (the first order alone after a full step from a residual at most ``lazy_residual``, the Hessian
    then only if the plan is not done: the Hessian returned is then the previous one). Returns
    ``(status, u, f, g, H, r)``: status 0 moved,
    1 no descent (the line search failed), 2 the QP was not solved (nothing moved)."""
    n = u.shape[0]
    e = min(1e-3, r)
    held = ((u - lb <= e) & (g > 0)) | ((ub - u <= e) & (g < 0))
    lo, hi = lb - u, ub - u
    d, done = _box_qp(g, _convexified(H, floor, held), lo, hi, 1e-3 * min(r, 1.0), 4 * n + 10)
    if not (done and np.isfinite(d).all()):
        return 2, u, f, g, H, r
    slope = _dot(g, d)
    step = 1.0
    trial = u
    accepted = False
    for _ in range(max_backtracks):
        if slope >= 0.0:
            break
        trial = np.minimum(np.maximum(u + step * d, lb), ub)
        if step == 1.0:  # a whole step that the QP put on a bound lands exactly on it
            for i in range(n):
                if d[i] == hi[i]:
                    trial[i] = ub[i]
                elif d[i] == lo[i]:
                    trial[i] = lb[i]
        ft = _plan_value(buf, meta, I, F, x0, trial)
        if not np.isfinite(ft):
            ft = np.inf
        if ft <= f + armijo * step * slope + 1e-13 * (1.0 + abs(f)):
            accepted = True
            break
        step *= 0.5
    if not accepted:
        return 1, u, f, g, H, r
    if step == 1.0 and r <= lazy_residual:
        f2, g2, _ = _plan_derivatives(buf, meta, I, F, x0, trial, False)
        r2 = _residual(trial, f2, g2, H, lb, ub, False)
        if r2 <= tol:
            return 0, trial, f2, g2, H, r2
    f2, g2, H2 = _plan_derivatives(buf, meta, I, F, x0, trial, True)
    return 0, trial, f2, g2, H2, _residual(trial, f2, g2, H2, lb, ub, True)


# --------------------------------------------------------------------------------------------
# Python side: layouts, buffers, and the two objects the controller uses
# --------------------------------------------------------------------------------------------


def picnn_layout(T, shift, layers: list[dict], path: list, activation: str, m: float) -> dict:
    """A PICNN's weights (those of :func:`qmpc.networks.picnn._numpy_weights`) in the kernels'
    order (the table above); layer 0 has no ``z`` weights: zeros stand in."""
    arrays = [T, shift]
    for L in layers:
        arrays += [L["Wyx"], L["byx"], L["Wy"], L["Wx"], L["bx"]]
        arrays += [L.get("Wzx", np.zeros((1, 1))), L.get("bzx", np.zeros(1)), L.get("Wz", np.zeros((1, 1)))]
    ln = bool(path) and path[0][2] is not None
    for W, b, norm in path:
        arrays += [W, b] + ([norm[0], norm[1]] if norm is not None else [np.ones(len(b)), np.zeros(len(b))])
    eps = float(path[0][2][2]) if ln else 0.0
    ints = [len(layers), ACTIVATION_CODES[activation], int(ln)]
    return {"arrays": arrays, "ints": ints, "floats": [float(m), eps]}


def mlp_layout(Ws: list, bs: list, activation: str, shift: float = 0.0, scale: float = 1.0) -> dict:
    """An MLP's weights (the normalisation folded in, as its closed form has them): ``W_0 … W_L,
    b_0 … b_L``; ``shift`` and ``scale`` of a cost head's value."""
    return {"arrays": [*Ws, *bs], "ints": [len(Ws) - 1, ACTIVATION_CODES[activation]], "floats": [shift, scale]}


def quadratic_layout(a: np.ndarray, q: np.ndarray, b: float) -> dict:
    """A cost head ``c = a·z + Σ_j q_j z_j² + b`` in ``z = (x, u, x⁺)`` (``a``, ``q``: ``(n3,)``), e.g.
    :class:`qmpc.costs.QuadraticStageCost`, with a head's ``shift`` 0 and ``scale`` 1: the kernels read
    ``nl = −1`` as this form."""
    return {"arrays": [a, q, np.array([b])], "ints": [-1, 0], "floats": [0.0, 1.0]}


class _Buffer:
    """Layouts' arrays in one float64 buffer and an ``(offset, rows, columns)`` table; :meth:`add`
    returns a layout's first table entry."""

    def __init__(self):
        self.chunks: list[np.ndarray] = []
        self.rows: list[tuple[int, int, int]] = []
        self.size = 0

    def add(self, layout: dict) -> int:
        base = len(self.rows)
        for a in layout["arrays"]:
            a = np.asarray(a, np.float64)
            r, c = (a.shape[0], a.shape[1]) if a.ndim == 2 else (a.size, 1)
            self.rows.append((self.size, r, c))
            self.chunks.append(a.reshape(-1))
            self.size += a.size
        return base

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return np.concatenate(self.chunks), np.asarray(self.rows, np.int64).reshape(-1, 3)


class GreedyNewton:
    """``argmin_u Q(x, u)`` in the bounds for one state at a time, compiled (:func:`_greedy`), from a
    PICNN's layout (:func:`picnn_layout`). ``solve(x (nx,), u0 (nu,) | None)`` returns the action and
    whether its projected-gradient residual reached ``tol`` within ``max_iter`` iterations."""

    def __init__(self, layout: dict, low: np.ndarray, high: np.ndarray, tol: float = 1e-8, max_iter: int = 50):
        buf = _Buffer()
        base = buf.add(layout)
        self.buf, self.meta = buf.arrays()
        self.ints = np.array([base, *layout["ints"]], np.int64)
        self.floats = np.array(layout["floats"], np.float64)
        self.tol, self.max_iter = float(tol), int(max_iter)
        self.low, self.high = np.asarray(low, np.float64).copy(), np.asarray(high, np.float64).copy()
        self.start = np.clip(np.zeros_like(self.low), self.low, self.high)

    def solve(self, x: np.ndarray, u0: np.ndarray | None = None) -> tuple[np.ndarray, bool]:
        u0 = self.start if u0 is None else np.asarray(u0, np.float64)
        args = (self.buf, self.meta, self.ints, self.floats, np.asarray(x, np.float64), u0, self.low, self.high)
        u, _, r, _ = _greedy(*args, self.tol, self.max_iter)
        return u, bool(r <= self.tol)


class CompiledPlan:
    """The value, gradient and exact Hessian of a single-shooting plan ``w (H·nu,)`` from one state
    ``x0 (nx,)``, compiled: ``J = Σ_k γ^k s_k c_k + γ^N s_N Q(x_N, u_N)`` through the learned model's
    rollout (``x⁺ = x + MLP(x, u)``), with the cost head and, optionally, the termination head
    (``s`` the survival weights; without it ``s = 1``). Layouts: :func:`picnn_layout`, :func:`mlp_layout`."""

    def __init__(self, q: dict, model: dict, cost: dict, termination: dict | None, gamma: float, nu: int):
        buf = _Buffer()
        bases = [buf.add(d) for d in (q, model, cost)]
        tb = buf.add(termination) if termination is not None else bases[2]
        self.buf, self.meta = buf.arrays()
        term = termination if termination is not None else cost
        ints = [bases[0], *q["ints"], bases[1], *model["ints"], bases[2], *cost["ints"], tb, *term["ints"]]
        self.ints = np.array([*ints, int(termination is not None), int(nu)], np.int64)
        self.floats = np.array([*q["floats"], *cost["floats"], float(gamma)], np.float64)

    def value(self, w: np.ndarray, x0: np.ndarray) -> float:
        return _plan_value(self.buf, self.meta, self.ints, self.floats, x0, w)

    def first_order(self, w: np.ndarray, x0: np.ndarray) -> tuple[float, np.ndarray]:
        J, g, _ = _plan_derivatives(self.buf, self.meta, self.ints, self.floats, x0, w, False)
        return J, g

    def derivatives(self, w: np.ndarray, x0: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
        return _plan_derivatives(self.buf, self.meta, self.ints, self.floats, x0, w, True)

    def solve(
        self,
        x0: np.ndarray,
        u0: np.ndarray,
        lb: np.ndarray,
        ub: np.ndarray,
        *,
        tol: float,
        max_iter: int,
        floor: float = FLOOR,
        armijo: float = 1e-4,
        max_backtracks: int = 20,
        lazy_residual: float = LAZY_RESIDUAL,
        deadline: float = np.inf,
    ) -> tuple[np.ndarray, float, np.ndarray, float, int, bool]:
        """:func:`qmpc.boxsqp.solve_box_sqp` of this plan from ``x0 (nx,)``, ``u0 (n,)`` within
        ``lb ≤ u ≤ ub``, each iteration one compiled call (:func:`_sqp_iteration`); the deadline (a
        ``time.perf_counter()``) is checked between iterations. Returns ``(u, J, ∇J, residual,
        iterations, qp_failed)``: ``qp_failed`` where an iteration's QP was not solved (the caller
        finishes from ``u`` with :mod:`qmpc.boxsqp`, whose QP has a fallback)."""
        args = (self.buf, self.meta, self.ints, self.floats, x0)
        u = np.minimum(np.maximum(np.asarray(u0, np.float64), lb), ub)
        f, g, H = _plan_derivatives(*args, u, True)
        r = _residual(u, f, g, H, lb, ub, True)
        its = 0
        while r > tol and np.isfinite(r) and its < max_iter and time.perf_counter() <= deadline:
            status, u, f, g, H, r = _sqp_iteration(
                *args, u, f, g, H, r, lb, ub, floor, armijo, max_backtracks, tol, lazy_residual
            )
            its += 1
            if status == 2:
                return u, f, g, r, its, True
            if status == 1:
                break
        return u, f, g, r, its, False
