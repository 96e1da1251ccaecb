"""The partially input-convex Q network :class:`PICNN` (Amos, Xu & Kolter 2017) in all its forms:
the torch module, its CasADi twin, its closed-form numpy derivatives in ``(x, u)``
(:meth:`PICNN.numpy_derivatives`, for the controller's single-shooting Hessian) and the batched
closed-form oracle in ``u`` of :class:`PICNNActionOracle` (for the Newton solver of the TD targets).

Convex in u for every x, by construction (non-negative weights on the convex path, convex
non-decreasing activations), plus ``½ m ‖u‖²`` so that the minimiser is unique.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import casadi as ca
import numpy as np
import torch
from torch import nn

from qmpc import compiled
from qmpc.errors import InputError
from qmpc.networks.base import (
    QNetwork,
    ThetaView,
    activation_twins,
    layer_norm_np,
    layer_norm_twin,
    linear_twin,
    np64,
    np_activation,
    np_softplus,
    softplus_c,
    softplus_t,
)

__all__ = ["PICNN", "PICNNActionOracle"]


class _PICNNLayer(nn.Module):
    """One layer of the convex path: ``z⁺ = g(Wz (z ∘ s(Wzx x̃ + bz)) + Wy (u ∘ (Wyx x̃ + by)) + Wx x̃ + b)``.

    ``Wz = softplus(Wz_raw) ≥ 0``; ``s`` is softplus (a smooth, positive gate).
    """

    def __init__(self, nx_in: int, nz_in: int, nu: int, n_out: int):
        super().__init__()
        self.nz_in = nz_in
        if nz_in > 0:
            self.Wzx = nn.Linear(nx_in, nz_in)
            self.Wz_raw = nn.Parameter(torch.empty(n_out, nz_in))
        self.Wyx = nn.Linear(nx_in, nu)
        self.Wy = nn.Linear(nu, n_out, bias=False)
        self.Wx = nn.Linear(nx_in, n_out)
        if nz_in > 0:
            # softplus(raw) ~ U(0, 2/nz_in): keeps the scale of z roughly constant with depth.
            with torch.no_grad():
                s = torch.rand(n_out, nz_in) * (2.0 / nz_in) + 1e-4
                self.Wz_raw.copy_(torch.log(torch.expm1(s)))

    def forward(self, xt: torch.Tensor, z: torch.Tensor | None, u: torch.Tensor) -> torch.Tensor:
        out = self.Wy(u * self.Wyx(xt)) + self.Wx(xt)
        if self.nz_in > 0:
            out = out + (z * softplus_t(self.Wzx(xt))) @ softplus_t(self.Wz_raw).T
        return out

    def twin(self, view: ThetaView, xt, z, u):
        out = view.matvec(self.Wy.weight, u * linear_twin(view, self.Wyx, xt)) + linear_twin(view, self.Wx, xt)
        if self.nz_in > 0:
            gate = softplus_c(linear_twin(view, self.Wzx, xt))
            out = out + ca.mtimes(softplus_c(view(self.Wz_raw)), z * gate)
        return out


class PICNN(QNetwork):
    """Partially input-convex Q network (Amos, Xu & Kolter 2017), convex in u for every x.

    The state path ``x̃_{k+1} = act(W̃_k x̃_k + b̃_k)`` (with ``layer_norm``:
    ``act(LN(W̃_k x̃_k + b̃_k))``) is unconstrained; the convex path uses
    non-negative weights (softplus of free parameters) on ``z`` and softplus activations, so
    ``Q`` is convex in ``u``. ``½ action_curvature ‖u‖²`` is added so that ``argmin_u Q`` is
    unique and the KKT matrix the sensitivities need is non-singular.

    Args:
        obs_dim: state dimension ``nx``.
        act_dim: action dimension ``nu``.
        hidden: widths of the convex path (the state path has the same widths).
        activation: smooth activation of the state path.
        action_curvature: ``m ≥ 0`` of the ``½ m ‖u‖²`` term (``m > 0``: strongly convex).
        layer_norm: layer normalisation (``nn.LayerNorm``: learned scale and shift, ε = 1e-5) of
            each state-path layer before its activation. The convex path is untouched: ``Q`` stays
            convex in ``u``, and its closed-form derivatives include the normalisation's.
    """

    convex_in_u = True
    vectorized_twin = True

    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        hidden: Sequence[int] = (64, 64),
        activation: str = "softplus",
        action_curvature: float = 1e-2,
        layer_norm: bool = False,
    ):
        super().__init__(obs_dim, act_dim)
        if action_curvature < 0:
            raise InputError(f"expected action_curvature >= 0, got {action_curvature}")
        self.hidden = tuple(int(h) for h in hidden)
        if not self.hidden:
            raise InputError("expected at least one hidden layer for PICNN, got hidden=()")
        self.action_curvature = float(action_curvature)
        self.act_t, self.act_c = activation_twins(activation)
        self.activation = activation
        xs = (obs_dim, *self.hidden)
        self.x_path = nn.ModuleList(nn.Linear(xs[i], xs[i + 1]) for i in range(len(self.hidden)))
        zs = (0, *self.hidden, 1)
        self.layers = nn.ModuleList(_PICNNLayer(xs[k], zs[k], act_dim, zs[k + 1]) for k in range(len(zs) - 1))
        self.layer_norm = bool(layer_norm)
        if self.layer_norm:  # registered only when asked: a network without keeps its state_dict
            self.x_norm = nn.ModuleList(nn.LayerNorm(h) for h in self.hidden)

    def forward(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        xt, z = self._prepare(x, u), None
        for k, layer in enumerate(self.layers):
            z = layer(xt, z, u)
            if k < len(self.layers) - 1:
                z = softplus_t(z)
                pre = self.x_path[k](xt)
                xt = self.act_t(self.x_norm[k](pre) if self.layer_norm else pre)
        return z.squeeze(-1) + 0.5 * self.action_curvature * (u**2).sum(-1)

    def numpy_derivatives(self) -> Callable[[np.ndarray, np.ndarray], tuple[float, np.ndarray, np.ndarray]]:
        """``(x (nx,), u (nu,)) -> (q, ∇q (nx+nu,), ∇²q (nx+nu, nx+nu))`` in closed form with numpy,
        with the current weights as constants (for the controller's single-shooting Hessian): one
        sample of :meth:`numpy_batch_derivatives`."""
        batch = self.numpy_batch_derivatives()

        def derivatives(x: np.ndarray, u: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
            q, grad, H = batch(np.asarray(x)[None], np.asarray(u)[None])
            return float(q[0]), grad[0], H[0]

        derivatives.compiled = batch.compiled
        return derivatives

    def numpy_batch_derivatives(
        self,
    ) -> Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """``(x (R, nx), u (R, nu)) -> (q (R,), ∇q (R, nx+nu), ∇²q (R, nx+nu, nx+nu))`` in closed
        form with numpy, with the current weights as constants (the H-step targets' plans); with
        ``hessian=False`` the Hessian is None (no reverse pass).

        Forward: the Jacobian ``J`` of every intermediate vector with respect to ``(x, u)`` (matrix
        products); reverse: the adjoint ``ḡ`` of each; the Hessian is the sum of the second-order
        terms of the nonlinear nodes: ``J_aᵀ diag(ḡ σ''(a)) J_a`` for an activation ``σ(a)`` and
        ``J_aᵀ diag(ḡ) J_b + J_bᵀ diag(ḡ) J_a`` for a product ``a ∘ b``. Measured on a 64×64
        PICNN (HalfCheetah sizes): ~0.1 ms a sample against ~1.2 ms for CasADi's Hessian of the twin."""
        nx, nu, m, act = self.obs_dim, self.act_dim, self.action_curvature, self.activation
        T, shift, path, layers = _numpy_weights(self)
        nz = nx + nu
        Ju = np.zeros((nu, nz))
        Ju[:, nx:] = np.eye(nu)
        Jx0 = np.zeros((nx, nz))
        Jx0[:, :nx] = T

        def derivatives(x: np.ndarray, u: np.ndarray, hessian: bool = True) -> tuple[np.ndarray, ...]:
            R = x.shape[0]
            xt = (x - shift) @ T.T
            out, Jout, tape = _forward_tape(layers, path, act, xt, np.broadcast_to(Jx0, (R, nx, nz)), u, Ju)
            q = out[:, 0] + 0.5 * m * np.einsum("ri,ri->r", u, u)
            grad = Jout[:, 0].copy()
            grad[:, nx:] += m * u
            if not hessian:  # the forward pass's Jacobian is the gradient
                return q, grad, None
            H = np.zeros((R, nz, nz))
            H[:, nx:, nx:] += m * np.eye(nu)
            _add_second_order_terms(H, layers, path, tape, u, Ju)
            return q, grad, H

        derivatives.compiled = ("picnn", compiled.picnn_layout(T, shift, layers, path, act, m))  # qmpc.compiled
        return derivatives

    def action_oracle(self, x: np.ndarray, weights: dict[str, np.ndarray] | None = None) -> PICNNActionOracle:
        """Closed-form ``Q``, ``∇_u Q`` and ``∇²_u Q`` for a batch of fixed states ``x (B, nx)``
        (numpy): see :class:`PICNNActionOracle`. ``weights``: float64 arrays by the names of
        ``state_dict()`` (parameters and buffers); default: the network's current values."""
        if weights is None:
            weights = {n: np64(t) for n, t in (*self.named_parameters(), *self.named_buffers())}
        return PICNNActionOracle(self, x, weights)

    def casadi_expr(self, x, u, theta):
        view = ThetaView(self, theta)
        xt, z = x, None
        for k, layer in enumerate(self.layers):
            z = layer.twin(view, xt, z, u)
            if k < len(self.layers) - 1:
                z = softplus_c(z)
                pre = linear_twin(view, self.x_path[k], xt)
                xt = self.act_c(layer_norm_twin(view, self.x_norm[k], pre) if self.layer_norm else pre)
        return z + 0.5 * self.action_curvature * ca.sum1(u * u)


# --------------------------------------------------------------------------------------
# PICNN.numpy_derivatives: closed-form value, gradient and Hessian in (x, u) of one sample.
# --------------------------------------------------------------------------------------


def _numpy_weights(q: PICNN) -> tuple[np.ndarray, np.ndarray, list, list[dict[str, np.ndarray]]]:
    """float64 copies of the weights of ``q`` for :meth:`PICNN.numpy_derivatives`: the input
    normalisation ``T (nx, nx)`` and ``shift (nx,)``, the state path ``[(W, b, ln), …]`` (``ln``: the
    layer norm's ``(scale, shift, eps)``, or None) and, per layer
    of the convex path, its matrices by name (``Wz`` already the non-negative ``softplus(Wz_raw)``)."""
    arr = np64
    T, shift = arr(q.obs_transform), arr(q.obs_shift)
    norms = [(arr(n.weight), arr(n.bias), n.eps) for n in q.x_norm] if q.layer_norm else [None] * len(q.x_path)
    path = [(arr(lin.weight), arr(lin.bias), ln) for lin, ln in zip(q.x_path, norms, strict=True)]
    layers = []
    for lay in q.layers:
        d = {
            "Wyx": arr(lay.Wyx.weight),
            "byx": arr(lay.Wyx.bias),
            "Wy": arr(lay.Wy.weight),
            "Wx": arr(lay.Wx.weight),
            "bx": arr(lay.Wx.bias),
        }
        if lay.nz_in > 0:
            d.update(Wzx=arr(lay.Wzx.weight), bzx=arr(lay.Wzx.bias), Wz=np_softplus(arr(lay.Wz_raw)))
        layers.append(d)
    return T, shift, path, layers


def _forward_tape(
    layers: list[dict[str, np.ndarray]],
    path: list,
    act: str,
    xt: np.ndarray,
    Jxt: np.ndarray,
    u: np.ndarray,
    Ju: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, list[dict[str, np.ndarray]]]:
    """The forward pass of :meth:`PICNN.numpy_batch_derivatives` from the normalised states
    ``xt (R, nx)`` (their Jacobians ``Jxt (R, nx, nx+nu)``) and ``u (R, nu)`` (``Ju (nu, nx+nu)``):
    the last layer's output ``(R, 1)``, its Jacobian ``(R, 1, nx+nu)`` in ``(x, u)``, and per layer
    what the reverse pass and the second-order terms need."""
    z = Jz = None
    tape = []
    for k, L in enumerate(layers):
        v1 = xt @ L["Wyx"].T + L["byx"]
        Jv1 = L["Wyx"] @ Jxt
        p1 = u * v1
        Jp1 = v1[:, :, None] * Ju + u[:, :, None] * Jv1
        out = p1 @ L["Wy"].T + xt @ L["Wx"].T + L["bx"]
        Jout = L["Wy"] @ Jp1 + L["Wx"] @ Jxt
        rec = {"Jv1": Jv1}
        if z is not None:
            gpre = xt @ L["Wzx"].T + L["bzx"]
            Jgpre = L["Wzx"] @ Jxt
            gate, dg, d2g = np_activation("softplus", gpre)
            Jgate = dg[:, :, None] * Jgpre
            out = out + (z * gate) @ L["Wz"].T
            Jout = Jout + L["Wz"] @ (gate[:, :, None] * Jz + z[:, :, None] * Jgate)
            rec.update(z=z, Jz=Jz, gate=gate, dg=dg, d2g=d2g, Jgpre=Jgpre, Jgate=Jgate)
        if k < len(layers) - 1:
            z, dz, d2z = np_activation("softplus", out)
            rec.update(dz=dz, d2z=d2z, Jout=Jout)
            Jz = dz[:, :, None] * Jout
            W, b, ln = path[k]
            pre, Jpre = xt @ W.T + b, W @ Jxt
            if ln is not None:  # pre ← LN(pre): n = (pre − mean) / s, ∂n = (P − n nᵀ/d) ∂pre / s
                n, s = layer_norm_np(pre, ln[2])
                nJ = np.einsum("rd,rdk->rk", n, Jpre)
                Jn = Jpre - Jpre.mean(axis=1, keepdims=True) - n[:, :, None] * nJ[:, None, :] / n.shape[1]
                Jn /= s[:, :, None]
                rec["ln"] = (n, s[:, 0], Jpre)
                pre, Jpre = ln[0] * n + ln[1], ln[0][:, None] * Jn
            xt, da, d2a = np_activation(act, pre)
            rec.update(da=da, d2a=d2a, Jpre=Jpre)  # Jpre: the activation's argument's Jacobian
            Jxt = da[:, :, None] * Jpre
        tape.append(rec)
    return out, Jout, tape


def _quad(J: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``Jᵀ diag(w) J`` of each sample: ``J (R, d, n)``, ``w (R, d)``."""
    return np.swapaxes(J, 1, 2) @ (w[:, :, None] * J)


def _cross(Ja: np.ndarray, w: np.ndarray, Jb: np.ndarray) -> np.ndarray:
    """``Jaᵀ diag(w) Jb + Jbᵀ diag(w) Ja`` of each sample (``Ja`` may be one ``(d, n)`` for all)."""
    C = np.swapaxes(Ja, -1, -2) @ (w[:, :, None] * Jb)
    return C + np.swapaxes(C, 1, 2)


def _add_second_order_terms(
    H: np.ndarray, layers: list[dict[str, np.ndarray]], path: list, tape: list, u: np.ndarray, Ju: np.ndarray
) -> None:
    """The reverse pass of :meth:`PICNN.numpy_batch_derivatives`: adds to ``H (R, nx+nu, nx+nu)``,
    in place, the second-order terms of every nonlinear node of the tape of :func:`_forward_tape`."""
    g_out = np.ones((u.shape[0], 1))  # adjoint of the last layer's output
    g_xt_next = None  # adjoint of xt_{k+1}
    for k in reversed(range(len(layers))):
        L, r = layers[k], tape[k]
        g_xt = g_out @ L["Wx"]
        g_p1 = g_out @ L["Wy"]
        H += _cross(Ju, g_p1, r["Jv1"])
        g_xt += (u * g_p1) @ L["Wyx"]
        if g_xt_next is not None:  # xt_{k+1} = act(W xt_k + b), or act(LN(W xt_k + b))
            g_pre = g_xt_next * r["da"]
            H += _quad(r["Jpre"], g_xt_next * r["d2a"])
            if "ln" in r:
                g_pre = _layer_norm_reverse(H, path[k][2][0] * g_pre, *r["ln"])
            g_xt += g_pre @ path[k][0]
        g_z = None
        if "z" in r:
            g_p2 = g_out @ L["Wz"]
            H += _cross(r["Jz"], g_p2, r["Jgate"])
            g_gate = r["z"] * g_p2
            H += _quad(r["Jgpre"], g_gate * r["d2g"])
            g_xt += (g_gate * r["dg"]) @ L["Wzx"]
            g_z = r["gate"] * g_p2
        if k > 0:  # z_k = softplus(out_{k−1})
            rp = tape[k - 1]
            H += _quad(rp["Jout"], g_z * rp["d2z"])
            g_out = g_z * rp["dz"]
        g_xt_next = g_xt


def _layer_norm_reverse(H: np.ndarray, g: np.ndarray, n: np.ndarray, s: np.ndarray, J: np.ndarray) -> np.ndarray:
    """The reverse step through ``n = (a − mean(a)) / s`` (``s = sqrt(var(a) + ε) (R,)``, ``a (R, d)``
    with Jacobians ``J (R, d, nx+nu)``) for the adjoint ``g (R, d)`` of ``n``: adds ``Jᵀ ∇²(gᵀn) J``
    to ``H`` in place and returns the adjoint of ``a``, ``r / s`` with ``r = P g − (nᵀg) n / d``
    (``P = I − 11ᵀ/d``). ``∇²(gᵀn) = −(r nᵀ + n rᵀ + (nᵀg)(P − n nᵀ/d)) / (d s²)``."""
    d = n.shape[1]
    alpha = np.einsum("rd,rd->r", n, g)
    r = g - g.mean(axis=1, keepdims=True) - alpha[:, None] * n / d
    a, b, one = np.einsum("rd,rdk->rk", r, J), np.einsum("rd,rdk->rk", n, J), J.sum(axis=1)
    ab = a[:, :, None] * b[:, None, :]
    JPJ = np.swapaxes(J, 1, 2) @ J - (one[:, :, None] * one[:, None, :] + b[:, :, None] * b[:, None, :]) / d
    H -= (ab + np.swapaxes(ab, 1, 2) + alpha[:, None, None] * JPJ) / (d * s * s)[:, None, None]
    return r / s[:, None]


class PICNNActionOracle:
    """``Q(x_b, ·)`` of a :class:`PICNN` for a batch of fixed states, in closed form with numpy.

    With the states fixed, every state-path quantity is a constant of the batch, and each layer
    of the convex path is affine in ``u`` and in the previous ``z``:
    ``out_k = (u ∘ v_k) W_yᵀ + (z_k ∘ s_k) W_zᵀ + c_k`` with ``v_k = W_yx x̃_k + b_yx``, the gate
    ``s_k = softplus(W_zx x̃_k + b_zx)`` and ``c_k = W_x x̃_k + b_x`` computed once here. The
    Jacobians ``∂out_k/∂u (B, n_k, nu)`` go forward, the adjoints backward, and
    ``∇²_u Q = Σ_k J_kᵀ diag(ḡ_{k+1} ∘ softplus''(out_k)) J_k + m I`` (the products ``u ∘ v_k`` are
    linear in ``u``: no other second-order terms). Every product with a weight matrix is one GEMM
    over the whole batch. Framework-free: what the batched solver (:mod:`qmpc.newton`) calls.
    """

    def __init__(self, q: PICNN, x: np.ndarray, weights: dict[str, np.ndarray]):
        x = np.asarray(x, np.float64)
        if x.ndim != 2 or x.shape[1] != q.obs_dim:
            raise InputError(f"expected x of shape (B, {q.obs_dim}), got {x.shape}")
        self.m, self.nu = q.action_curvature, q.act_dim
        w = weights
        xt = (x - w["obs_shift"]) @ w["obs_transform"].T
        self.layers = []
        for k, lay in enumerate(q.layers):
            p = f"layers.{k}."
            rec = {
                "v": xt @ w[p + "Wyx.weight"].T + w[p + "Wyx.bias"],
                "Wy": w[p + "Wy.weight"],
                "WyT": np.ascontiguousarray(w[p + "Wy.weight"].T),
                "c": xt @ w[p + "Wx.weight"].T + w[p + "Wx.bias"],
            }
            if lay.nz_in > 0:
                rec["s"] = np_softplus(xt @ w[p + "Wzx.weight"].T + w[p + "Wzx.bias"])
                rec["Wz"] = np_softplus(w[p + "Wz_raw"])
            self.layers.append(rec)
            if k == 0:  # the first layer's Hessian term, (v vᵀ) ∘ (c K): K[l, i·nu + j] = W_y[l, i] W_y[l, j]
                Wy = rec["Wy"]
                self.K0 = (Wy[:, :, None] * Wy[:, None, :]).reshape(Wy.shape[0], -1)
            if k < len(q.layers) - 1:
                pre = xt @ w[f"x_path.{k}.weight"].T + w[f"x_path.{k}.bias"]
                if q.layer_norm:
                    pre = layer_norm_np(pre, q.x_norm[k].eps)[0] * w[f"x_norm.{k}.weight"] + w[f"x_norm.{k}.bias"]
                xt = np_activation(q.activation, pre)[0]

    def value(self, u: np.ndarray, rows: np.ndarray | slice = slice(None)) -> np.ndarray:
        """``Q (R,)`` at actions ``u (R, nu)`` for the states ``rows`` of the batch."""
        return self._forward(u, self._rows(rows), slopes=False)[0]

    def first_order(self, u: np.ndarray, rows: np.ndarray | slice = slice(None)) -> tuple[np.ndarray, np.ndarray]:
        """``(Q (R,), ∇_u Q (R, nu))`` at ``u (R, nu)`` for the states ``rows``, bit for bit those of
        :meth:`derivatives`, without the Hessian: one forward and one reverse pass (what the
        batched Newton asks at a trial point that may end the solve)."""
        at = self._rows(rows)
        q, acts = self._forward(u, at)
        return q, self._reverse(u, at, acts)[0]

    def derivatives(
        self, u: np.ndarray, rows: np.ndarray | slice = slice(None)
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(Q (R,), ∇_u Q (R, nu), ∇²_u Q (R, nu, nu))`` at ``u (R, nu)`` for the states ``rows``.

        The gradient by the reverse pass (as :meth:`first_order`); the Hessian
        ``Σ_k J_kᵀ diag(c_k) J_k`` from the Jacobians ``J_k = ∂out_k/∂u`` carried forward,
        transposed ``(R, nu, n_k)`` with the layer's width last (every elementwise product along long
        rows, every product with a weight matrix one GEMM of ``(R·nu) × n``). The first layer's
        ``J_0 = v_0 ∘ W_yᵀ`` is separable: its term is ``(v vᵀ) ∘ (c_0 K)`` with
        ``K = W_y[:, i] W_y[:, j]`` computed once, a GEMM of ``R × n × nu²``."""
        R, nu = u.shape
        at = self._rows(rows)
        q, acts = self._forward(u, at)
        grad, curv = self._reverse(u, at, acts)
        v0 = at[0]["v"]
        H0 = (curv[0] @ self.K0).reshape(R, nu, nu)
        H = H0 * v0[:, :, None] * v0[:, None, :]
        H += self.m * np.eye(nu)
        J = v0[:, :, None] * self.layers[0]["WyT"][None]  # ∂out_0/∂u, (R, nu, n)
        for k in range(1, len(self.layers) - 1):
            L, A = self.layers[k], at[k]
            M = ((A["s"] * acts[k - 1][1])[:, None, :] * J).reshape(R * nu, -1)  # s ∘ softplus' ∘ J
            J = (M @ L["Wz"].T).reshape(R, nu, -1)
            J += A["v"][:, :, None] * L["WyT"][None]
            H += np.matmul(J * curv[k][:, None, :], J.transpose(0, 2, 1))
        return q, grad, H

    def _rows(self, rows: np.ndarray | slice) -> list[dict[str, np.ndarray]]:
        """Each layer's state-dependent constants ``v``, ``c`` (and ``s``) at the states ``rows``,
        indexed once per call (the forward, reverse and Hessian passes all read them)."""
        return [{k: L[k][rows] for k in ("v", "c", "s") if k in L} for L in self.layers]

    def _forward(self, u: np.ndarray, at: list[dict], slopes: bool = True) -> tuple[np.ndarray, list[tuple]]:
        """``Q (R,)`` and, with ``slopes``, each hidden layer's ``softplus(out_k), softplus'(out_k),
        softplus''(out_k)`` (without: the softplus alone, what :meth:`value` needs)."""
        z, acts = None, []
        for k, (L, A) in enumerate(zip(self.layers, at, strict=True)):
            out = (u * A["v"]) @ L["Wy"].T + A["c"]
            if z is not None:
                out += (z * A["s"]) @ L["Wz"].T
            if k < len(self.layers) - 1:
                if slopes:
                    acts.append(np_activation("softplus", out))
                    z = acts[-1][0]
                else:
                    z = np_softplus(out)
        return out[:, 0] + 0.5 * self.m * np.einsum("bi,bi->b", u, u), acts

    def _reverse(self, u: np.ndarray, at: list[dict], acts: list[tuple]) -> tuple[np.ndarray, list]:
        """The reverse pass: ``∇_u Q (R, nu)`` and, per hidden layer, the weights
        ``c_k = ḡ_{z_{k+1}} ∘ softplus''(out_k) (R, n_k)`` of its Hessian term (``ḡ`` the adjoints)."""
        g_out = np.ones((u.shape[0], 1))
        grad = self.m * u
        curv = [None] * (len(self.layers) - 1)
        for k in range(len(self.layers) - 1, -1, -1):
            L, A = self.layers[k], at[k]
            grad += (g_out @ L["Wy"]) * A["v"]  # out_k depends on u through (u ∘ v_k) W_yᵀ
            if k > 0:
                g_z = (g_out @ L["Wz"]) * A["s"]  # adjoint of z_k = softplus(out_{k−1})
                _, dz, d2z = acts[k - 1]
                curv[k - 1] = g_z * d2z
                g_out = g_z * dz
        return grad, curv
