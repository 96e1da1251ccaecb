"""The controller plans in the units and discount that Q was trained in (issue 9, item 2)."""

from pathlib import Path

import numpy as np
import pytest
import torch

import qmpc
from qmpc.checkpoint import load_checkpoint
from qmpc.controller import trained_units
from qmpc.costs import stage_cost
from qmpc.env import make_env

MODELS = Path(__file__).resolve().parents[1] / "models"


def _plan_value(ctrl: qmpc.Controller, x: np.ndarray, cost_fn, scale: float, gamma: float) -> float:
    """``Σ_k γ^k · scale · c(x_k, u_k, x_{k+1}) + γ^N Q(x_N, u_N)`` along the controller's last plan."""
    plan = ctrl.plan()
    us, xs = plan["actions"][0], np.vstack([x[None], plan["states"][0]])
    N = us.shape[0] - 1
    v = sum(gamma**k * scale * float(cost_fn(xs[k], us[k], xs[k + 1])) for k in range(N))
    with torch.no_grad():
        qN = ctrl.q(torch.as_tensor(xs[N:], dtype=torch.float64), torch.as_tensor(us[N:], dtype=torch.float64))
    return v + gamma**N * float(qN[0])


@pytest.mark.parametrize("horizon", [3, 5])
def test_mpc_adds_stage_costs_in_the_trained_units(horizon):
    """InvertedPendulum-v5 was trained with c = −reward × 0.1 and γ = 0.98: a plan adds its stage
    costs (−1 per step) as −0.1 and discounts with 0.98."""
    path = MODELS / "inverted_pendulum.pt"
    ckpt = load_checkpoint(path)
    assert ckpt["config"]["train"]["cost_scale"] == 0.1 and ckpt["config"]["train"]["gamma"] == 0.98
    ctrl = qmpc.Controller.from_checkpoint(path, horizon=horizon, model="learned")
    x = np.array([0.0, 0.02, 0.0, -0.05])
    _, info = ctrl.act(x)
    assert qmpc.Status.ok(np.array([info["status"]]))[0]
    expected = _plan_value(ctrl, x, stage_cost(make_env("InvertedPendulum-v5")), 0.1, 0.98)
    assert info["value"] == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_a_different_discount_or_cost_scale_is_refused():
    path = MODELS / "reacher.pt"
    with pytest.raises(qmpc.InputError, match=r"discount = 0\.95"):
        qmpc.Controller.from_checkpoint(path, horizon=3, model="learned", discount=0.99)
    with pytest.raises(qmpc.InputError, match=r"cost_scale = 1\.0"):
        qmpc.Controller.from_checkpoint(path, horizon=3, model="learned", cost_scale=0.1)
    ctrl = qmpc.Controller.from_checkpoint(path, horizon=3, model="learned", discount=0.95)
    assert ctrl.problem.discount == 0.95 and ctrl.cost_scale == 1.0


def test_trained_units_read_the_checkpoint_then_its_config():
    assert trained_units({"gamma": 0.9, "cost_scale": 0.5}) == {"discount": 0.9, "cost_scale": 0.5}
    cfg = {"config": {"train": {"gamma": 0.97, "cost_scale": 0.2}}}
    assert trained_units(cfg) == {"discount": 0.97, "cost_scale": 0.2}
    assert trained_units({}) == {"discount": 0.99, "cost_scale": 1.0}


def test_cost_scale_must_be_positive_and_finite():
    q = qmpc.QuadraticQ(2, 1, hidden=()).double()
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(qmpc.InputError, match="cost_scale"):
            qmpc.Controller(q, -np.ones(1), np.ones(1), cost_scale=bad)
