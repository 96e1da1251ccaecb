"""What every Q network shares: the :class:`QNetwork` base class, the smooth activations with
their CasADi and numpy twins, and the mapping of torch parameters onto the flat symbolic ``theta``.

The conventions (shapes, Q as a cost-to-go, the flat ``theta`` of the twins) are in the package's
docstring, :mod:`qmpc.networks`.

The architectures live in their own modules (:mod:`qmpc.networks.quadratic`,
:mod:`qmpc.networks.picnn`, :mod:`qmpc.networks.mlp`), named in :mod:`qmpc.networks.registry`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import casadi as ca
import numpy as np
import torch
from torch import nn

from qmpc.errors import InputError, UnsupportedLayerError

__all__ = [
    "ACTIVATIONS",
    "QNetwork",
    "ThetaView",
    "activation_twins",
    "layer_norm_np",
    "layer_norm_twin",
    "linear_twin",
    "make_mlp",
    "mlp_twin",
    "np64",
    "np_activation",
    "np_softplus",
    "sequential_twin",
    "softplus_c",
    "softplus_t",
]


# --------------------------------------------------------------------------------------
# Smooth activations, written once for torch and once for CasADi with the same formula.
# --------------------------------------------------------------------------------------


def softplus_t(z: torch.Tensor) -> torch.Tensor:
    """``log(1 + e^z)`` in torch (elementwise, any shape); its CasADi twin is :func:`softplus_c`."""
    # logaddexp: stable for large |z| and with the exact derivative σ(0) = ½ at z = 0
    # (clamp_min(z, 0) + log1p(exp(-|z|)) would give 1 there).
    return torch.logaddexp(z, torch.zeros_like(z))


def softplus_c(z):
    """``log(1 + e^z)`` in CasADi (elementwise), without overflow: the twin of :func:`softplus_t`."""
    return ca.fmax(z, 0) + ca.log1p(ca.exp(-ca.fabs(z)))


def _sigmoid_c(z):
    # not 1 / (1 + exp(−z)): its derivative is inf/inf = NaN for z < −710, which a single-shooting
    # rollout through a learned model reached in a solver's trial step; tanh saturates cleanly
    return 0.5 + 0.5 * ca.tanh(0.5 * z)


ACTIVATIONS: dict[str, tuple[Callable, Callable]] = {
    "tanh": (torch.tanh, ca.tanh),
    "softplus": (softplus_t, softplus_c),
    "sigmoid": (torch.sigmoid, _sigmoid_c),
    "silu": (lambda z: z * torch.sigmoid(z), lambda z: z * _sigmoid_c(z)),
}
"""Smooth activations with exact twins: name -> (torch function, CasADi function)."""


def np64(t: torch.Tensor) -> np.ndarray:
    """A float64 numpy copy of a tensor (weights for the closed-form numpy derivatives)."""
    return t.detach().to("cpu", torch.float64).numpy().copy()


def np_softplus(a: np.ndarray) -> np.ndarray:
    """``log(1 + e^a)`` without overflow (as ``np.logaddexp(0, a)``, which was measured 10× slower)."""
    return np.maximum(a, 0.0) + np.log1p(np.exp(-np.abs(a)))


def np_activation(name: str, a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``σ(a), σ'(a), σ''(a)`` elementwise in numpy, for the activations of :data:`ACTIVATIONS`
    (the closed-form derivatives of :class:`~qmpc.networks.picnn.PICNN` and of the learned dynamics model)."""
    if name == "tanh":
        t = np.tanh(a)
        d = 1.0 - t * t
        return t, d, -2.0 * t * d
    s = 0.5 + 0.5 * np.tanh(0.5 * a)  # the logistic sigmoid, without overflow
    ds = s * (1.0 - s)
    if name == "sigmoid":
        return s, ds, ds * (1.0 - 2.0 * s)
    if name == "softplus":
        return np_softplus(a), s, ds
    if name == "silu":
        return a * s, s + a * ds, ds * (2.0 + a * (1.0 - 2.0 * s))
    raise UnsupportedLayerError(f"expected a smooth activation {sorted(ACTIVATIONS)}, got {name!r}")


_NON_SMOOTH = {"relu", "leaky_relu", "hardtanh", "relu6", "elu", "selu", "hardswish"}


def activation_twins(name: str) -> tuple[Callable, Callable]:
    """``(torch function, CasADi function)`` of the smooth activation ``name`` (see :data:`ACTIVATIONS`);
    :class:`UnsupportedLayerError` for a non-smooth or unknown one."""
    if name in ACTIVATIONS:
        return ACTIVATIONS[name]
    if name.lower() in _NON_SMOOTH:
        raise UnsupportedLayerError(
            f"activation {name!r} is not twice continuously differentiable; the solver and its "
            f"sensitivities need a smooth Q: expected one of {sorted(ACTIVATIONS)}"
        )
    raise UnsupportedLayerError(f"unknown activation {name!r}: expected one of {sorted(ACTIVATIONS)}")


# --------------------------------------------------------------------------------------
# Mapping torch parameters to slices of the flat symbolic theta.
# --------------------------------------------------------------------------------------


class ThetaView:
    """Reads torch parameters as CasADi matrices out of a flat symbolic ``theta``.

    ``theta`` holds the parameters of ``module`` in ``module.parameters()`` order, each
    flattened row-major. A weight ``W`` of shape ``(out, in)`` comes back as an ``out × in``
    CasADi matrix, a bias of shape ``(n,)`` as an ``n × 1`` column.
    """

    def __init__(self, module: nn.Module, theta):
        self.theta = theta
        self.offsets: dict[int, tuple[int, tuple[int, ...]]] = {}
        off = 0
        for p in module.parameters():
            self.offsets[id(p)] = (off, tuple(p.shape))
            off += p.numel()
        self.size = off
        if theta.shape[0] != off:
            raise InputError(f"expected theta of length {off}, got {theta.shape[0]}")

    def matvec(self, p: torch.Tensor, z):
        """``W z`` for a weight ``W`` of shape ``(out, in)``, without materialising a transpose
        (the row-major slice is ``Wᵀ`` in CasADi's column-major reshape)."""
        off, (n_out, n_in) = self.offsets[id(p)]
        Wt = ca.reshape(self.theta[off : off + n_out * n_in], n_in, n_out)
        return ca.mtimes(z.T, Wt).T

    def __call__(self, p: torch.Tensor):
        off, shape = self.offsets[id(p)]
        n = int(np.prod(shape)) if shape else 1
        v = self.theta[off : off + n]
        if len(shape) == 2:
            return ca.reshape(v, shape[1], shape[0]).T
        if len(shape) <= 1:
            return v
        raise UnsupportedLayerError(f"parameter of shape {shape} has no CasADi twin (expected 1-D or 2-D)")


def linear_twin(view: ThetaView, lin: nn.Linear, z):
    """``W z + b``; ``z`` may hold one sample per column (the bias is repeated)."""
    out = view.matvec(lin.weight, z)
    if lin.bias is None:
        return out
    b = view(lin.bias)
    return out + (ca.repmat(b, 1, z.size2()) if z.size2() > 1 else b)


def layer_norm_twin(view: ThetaView, ln: nn.LayerNorm, a):
    """CasADi twin of ``nn.LayerNorm(d)`` (biased variance, learned scale and shift) over the
    ``d`` rows of ``a``; ``a`` may hold one sample per column."""
    d, B = a.size1(), a.size2()
    c = a - ca.repmat(ca.sum1(a) / d, d, 1)
    s = ca.sqrt(ca.sum1(c * c) / d + ln.eps)
    n = c / ca.repmat(s, d, 1)
    gamma, beta = view(ln.weight), view(ln.bias)
    return n * ca.repmat(gamma, 1, B) + ca.repmat(beta, 1, B)


def layer_norm_np(a: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """``(n, s)``: ``a (…, d)`` normalised over its last axis, ``n = (a − mean) / s`` with
    ``s = sqrt(var + eps) (…, 1)`` (the biased variance, as ``nn.LayerNorm``), before its scale and shift."""
    c = a - a.mean(axis=-1, keepdims=True)
    s = np.sqrt((c * c).mean(axis=-1, keepdims=True) + eps)
    return c / s, s


def sequential_twin(seq: nn.Module, z, view: ThetaView):
    """CasADi twin of an ``nn.Sequential`` of linear layers and smooth activations.

    ``z`` is a CasADi column vector; returns the output column. Raises
    :class:`UnsupportedLayerError` naming the first layer without an exact twin.
    """
    layers = list(seq) if isinstance(seq, nn.Sequential) else [seq]
    for i, layer in enumerate(layers):
        if isinstance(layer, nn.Linear):
            z = linear_twin(view, layer, z)
        elif isinstance(layer, nn.Identity):
            pass
        elif isinstance(layer, nn.Tanh):
            z = ca.tanh(z)
        elif isinstance(layer, nn.Sigmoid):
            z = _sigmoid_c(z)
        elif isinstance(layer, nn.SiLU):
            z = z * _sigmoid_c(z)
        elif isinstance(layer, nn.Softplus):
            b, t = float(layer.beta), float(layer.threshold)
            z = ca.if_else(b * z > t, z, ca.log1p(ca.exp(b * z)) / b)
        elif isinstance(layer, nn.Sequential):
            z = sequential_twin(layer, z, view)
        else:
            name = type(layer).__name__
            smooth = "" if name.lower() not in _NON_SMOOTH else " (not twice differentiable)"
            raise UnsupportedLayerError(
                f"layer {i} ({name}){smooth} has no exact CasADi twin: expected nn.Linear, nn.Tanh, "
                "nn.Sigmoid, nn.SiLU, nn.Softplus or nn.Identity"
            )
    return z


class _Act(nn.Module):
    """An activation by name, whose CasADi twin is known to :func:`mlp_twin`."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name
        self.fn_t, self.fn_c = activation_twins(name)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.fn_t(z)


def make_mlp(sizes: Sequence[int], activation: str, last_activation: bool) -> nn.Sequential:
    """An MLP of widths ``sizes`` (input first): ``nn.Linear`` layers, each followed by the smooth
    ``activation`` except the last (unless ``last_activation``). Its CasADi twin is :func:`mlp_twin`."""
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2 or last_activation:
            layers.append(_Act(activation))
    return nn.Sequential(*layers)


def mlp_twin(seq: nn.Sequential, z, view: ThetaView):
    """CasADi twin of an MLP of :func:`make_mlp`: like :func:`sequential_twin`, also understanding
    its activations by name."""
    for layer in seq:
        if isinstance(layer, _Act):
            z = layer.fn_c(z)
        else:
            z = sequential_twin(layer, z, view)
    return z


# --------------------------------------------------------------------------------------
# The base class.
# --------------------------------------------------------------------------------------


class QNetwork(nn.Module):
    """Base class: a cost-to-go ``Q_θ(x, u) -> (B,)`` with an exact CasADi twin.

    Subclasses implement :meth:`forward` and :meth:`casadi_expr`.
    """

    convex_in_u: bool = False
    vectorized_twin: bool = False
    """:meth:`casadi_expr` also takes one sample per column (see :meth:`casadi_batch_function`)."""

    def __init__(self, obs_dim: int, act_dim: int):
        super().__init__()
        for name, v in (("obs_dim", obs_dim), ("act_dim", act_dim)):
            if not isinstance(v, int | np.integer) or isinstance(v, bool) or v < 1:
                raise InputError(f"expected {name} to be a positive int, got {v!r}")
        self.obs_dim = int(obs_dim)
        self.act_dim = int(act_dim)
        # fixed input normalisation x̃ = T (x − shift) (identity unless set from data)
        self.register_buffer("obs_shift", torch.zeros(self.obs_dim))
        self.register_buffer("obs_transform", torch.eye(self.obs_dim))

    def set_input_normalization(self, shift: np.ndarray, transform: np.ndarray) -> None:
        """Fix the input normalisation ``x̃ = transform @ (x − shift)`` (e.g. whitening with the
        data's mean and covariance). It is a constant of the CasADi twin: the twin is rebuilt when
        it changes, and an :class:`~qmpc.ArgminLayer` of this network follows the change."""
        shift, transform = np.asarray(shift, np.float64), np.asarray(transform, np.float64)
        if shift.shape != (self.obs_dim,) or transform.shape != (self.obs_dim, self.obs_dim):
            raise InputError(
                f"expected shift ({self.obs_dim},) and transform ({self.obs_dim}, {self.obs_dim}), "
                f"got {shift.shape} and {transform.shape}"
            )
        if not (np.isfinite(shift).all() and np.isfinite(transform).all()):
            raise InputError("expected a finite input normalisation, got NaN/Inf")
        with torch.no_grad():
            self.obs_shift.copy_(torch.as_tensor(shift))
            self.obs_transform.copy_(torch.as_tensor(transform))

    # -- the twin -------------------------------------------------------------------
    def casadi_expr(self, x, u, theta):
        """CasADi expression of ``Q`` for column vectors ``x (obs_dim)`` (already normalised, see
        :meth:`set_input_normalization`), ``u (act_dim)`` and the flat parameter vector ``theta``
        (see :meth:`flat_parameters`)."""
        raise NotImplementedError

    def __getstate__(self) -> dict:
        """Pickles and deep copies carry the weights, not the cached CasADi twins (rebuilt on use)."""
        state = dict(self.__dict__)
        state.pop("_casadi_cache", None)
        return state

    def casadi_function(self, kind: str = "MX", baked: bool = False) -> ca.Function:
        """``Function('q', [x, u, theta], [q])``, built once and cached.

        ``baked=True``: the current weights as constants and an empty ``theta`` (``0 × 1``), built
        anew at each call. Everything that depends on the weights alone (softplus of PICNN's
        non-negative weights, slicing ``theta`` into matrices) is then computed once instead of
        at every evaluation: measured on a HalfCheetah-sized PICNN, a Q evaluation 0.18 → 0.09 ms
        and a controller step 1.70 → 0.95 ms (H = 1), 10.9 → 9.6 ms (H = 10)."""
        if baked:
            x, u = ca.MX.sym("x", self.obs_dim), ca.MX.sym("u", self.act_dim)
            T = ca.DM(self.obs_transform.detach().double().numpy())
            xn = ca.mtimes(T, x - ca.DM(self.obs_shift.detach().double().numpy()))
            q = self.casadi_expr(xn, u, ca.DM(self.flat_parameters()))
            return ca.Function("q", [x, u, ca.MX.sym("theta", 0)], [q], ["x", "u", "theta"], ["q"])
        cache = self.__dict__.setdefault("_casadi_cache", {})
        # the normalisation buffers are constants of the twin: a twin built with others is stale
        norm = tuple(
            b.detach().to("cpu", torch.float64).numpy().tobytes() for b in (self.obs_shift, self.obs_transform)
        )
        if cache.get("norm") != norm:
            cache.clear()
            cache["norm"] = norm
        if kind not in cache:
            sym = {"MX": ca.MX.sym, "SX": ca.SX.sym}[kind]
            x, u, th = sym("x", self.obs_dim), sym("u", self.act_dim), sym("theta", self.num_parameters)
            T = ca.DM(self.obs_transform.detach().double().numpy())
            xn = ca.mtimes(T, x - ca.DM(self.obs_shift.detach().double().numpy()))
            cache[kind] = ca.Function("q", [x, u, th], [self.casadi_expr(xn, u, th)], ["x", "u", "theta"], ["q"])
        return cache[kind]

    def casadi_batch_function(self, batch: int) -> ca.Function:
        """``Function('q_batch', [x (nx × B), u (nu × B), theta], [q (1 × B)])``: the twin for
        ``B = batch`` samples at once, one per column, as matrix operations (one matrix product
        per layer instead of ``B`` matrix–vector products; only architectures whose
        ``vectorized_twin`` is true). Measured on a HalfCheetah-sized PICNN, the gradient in ``u``
        of 256 samples: ~15 ms against ~88 ms for the per-sample twin mapped over the batch."""
        if not self.vectorized_twin:
            raise UnsupportedLayerError(f"expected a network with a vectorized twin (PICNN), got {type(self).__name__}")
        x, u = ca.MX.sym("x", self.obs_dim, batch), ca.MX.sym("u", self.act_dim, batch)
        th = ca.MX.sym("theta", self.num_parameters)
        T = ca.DM(self.obs_transform.detach().double().numpy())
        shift = ca.DM(self.obs_shift.detach().double().numpy())
        xn = ca.mtimes(T, x - ca.repmat(shift, 1, batch))
        q = self.casadi_expr(xn, u, th)
        return ca.Function("q_batch", [x, u, th], [q], ["x", "u", "theta"], ["q"])

    @property
    def num_parameters(self) -> int:
        """Length of the flat parameter vector ``theta``."""
        return sum(p.numel() for p in self.parameters())

    def flat_parameters(self) -> np.ndarray:
        """``theta``: every parameter flattened row-major and concatenated, float64, ``(n_theta,)``."""
        with torch.no_grad():
            return torch.cat([p.detach().reshape(-1).to("cpu", torch.float64) for p in self.parameters()]).numpy()

    def load_flat_parameters(self, theta: np.ndarray | torch.Tensor) -> None:
        """Set every parameter from a flat vector laid out as :meth:`flat_parameters`."""
        theta = torch.as_tensor(np.asarray(theta, dtype=np.float64))
        if theta.shape != (self.num_parameters,):
            raise InputError(f"expected theta of shape ({self.num_parameters},), got {tuple(theta.shape)}")
        if not torch.isfinite(theta).all():
            raise InputError("expected finite theta, got NaN/Inf")
        off = 0
        with torch.no_grad():
            for p in self.parameters():
                n = p.numel()
                p.copy_(theta[off : off + n].reshape(p.shape).to(p.dtype))
                off += n

    def parameter_layout(self) -> list[tuple[str, tuple[int, ...], int]]:
        """``[(name, shape, offset), …]``: where each named parameter lives in ``theta``."""
        out, off = [], 0
        for name, p in self.named_parameters():
            out.append((name, tuple(p.shape), off))
            off += p.numel()
        return out

    def _prepare(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Check shapes; return the normalised ``x``."""
        if x.ndim != 2 or x.shape[1] != self.obs_dim:
            raise InputError(f"expected x of shape (B, {self.obs_dim}), got {tuple(x.shape)}")
        if u.ndim != 2 or u.shape != (x.shape[0], self.act_dim):
            raise InputError(f"expected u of shape ({x.shape[0]}, {self.act_dim}), got {tuple(u.shape)}")
        return (x - self.obs_shift.to(x.dtype)) @ self.obs_transform.to(x.dtype).T
