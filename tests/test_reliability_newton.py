"""Issue 20 (reliability, round 2), item 5: the batched Newton never raises on a singular or
non-finite Hessian (a PICNN without action curvature, unbounded actions): such samples are
unconverged, retried by the plugin, and masked and counted if that fails too."""

import numpy as np
import pytest
import torch

import qmpc
from qmpc.networks import PICNN


@pytest.mark.parametrize("seed", [2, 3, 4])
def test_newton_singular_hessian_is_a_masked_failure_not_a_linalg_error(seed):
    """A PICNN with ``action_curvature = 0`` and ±inf bounds: raw ``LinAlgError`` before."""
    torch.manual_seed(seed)
    q = PICNN(3, 2, hidden=[16, 16], action_curvature=0.0).double()
    layer = qmpc.ArgminLayer(q, -np.inf, np.inf)
    x = torch.randn(16, 3, dtype=torch.float64, requires_grad=True)
    u, v = layer(x)
    res = layer.last_result
    failed = ~qmpc.Status.ok(res.status)
    assert res.num_failed == failed.sum() == layer.counters["failed"]
    assert np.isfinite(u.detach().numpy()[~failed]).all()
    if failed.any():
        i = np.flatnonzero(failed)
        (u[i].sum() + v[i].sum()).backward()
        assert x.grad.abs().max() == 0


def test_newton_direction_never_raises_on_singular_or_non_finite_hessians():
    from qmpc.newton import _direction

    g = np.array([[1.0, -1.0], [0.5, 0.5], [1.0, 1.0], [1.0, 0.0]])
    H = np.array(
        [
            # eigvalsh says positive definite (2.8e-17 > 0), Cholesky fails: LinAlgError before
            [[0.14928146592354916, -0.22472833589166927], [-0.22472833589166927, 0.3383060625791464]],
            [[0.0, 0.0], [0.0, 0.0]],  # singular
            [[np.nan, 0.0], [0.0, 1.0]],  # non-finite: no direction
            [[2.0, 0.0], [0.0, 2.0]],  # fine
        ]
    )
    d = _direction(g, H, np.zeros((4, 2), bool), 1e-10)
    assert np.isfinite(d[[0, 1, 3]]).all() and not np.isfinite(d[2]).any()
    np.testing.assert_array_equal(d[3], [-0.5, 0.0])
