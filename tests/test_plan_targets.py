"""Issue 19: the H-step MPC-value TD target (``train.target_horizon``). Its objective's derivatives
against finite differences, its values against the CasADi plan of the same networks' twins (and,
at H = 1, against the argmin layer), and a run that trains with it and resumes bit for bit."""

from pathlib import Path

import numpy as np
import pytest
import torch
from test_resume_exact import TINY, assert_same_run

import qmpc
from qmpc.check import spread_layer_norms
from qmpc.config import load_config
from qmpc.dynamics import DynamicsModel, OutcomeModel
from qmpc.errors import ConfigError
from qmpc.plan_targets import PlanObjective, PlanTargets
from qmpc.planner import Planner
from qmpc.problem import MPCSpec
from qmpc.solver import SolverOptions, Status
from qmpc.trainer import train

ROOT = Path(__file__).resolve().parents[1]
NX, NU = 3, 2
LOW, HIGH = -np.ones(NU), np.ones(NU)


def _networks():
    torch.manual_seed(0)
    q = qmpc.PICNN(NX, NU, hidden=(8, 8), action_curvature=0.1).double()
    model = DynamicsModel(NX, NU, hidden=(16,)).double()
    heads = OutcomeModel(NX, NU, hidden=(8,)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, NX, dtype=torch.float64, generator=g)
    with torch.no_grad():
        model.fit_normalization(x, x + 0.1 * torch.randn(64, NX, dtype=torch.float64, generator=g))
        heads.fit_normalization(x, torch.randn(64, dtype=torch.float64, generator=g))
        heads.term_net[-1].bias.fill_(-2.0)  # a termination probability of ~0.1: the weights matter
    return q, model, heads


def _states(n: int) -> torch.Tensor:
    return 0.5 * torch.randn(n, NX, dtype=torch.float64, generator=torch.Generator().manual_seed(2))


def _objective(kind: str, q, model, heads, x0, horizon, termination=True):
    """The plan objective of the targets: ``torch`` (:class:`PlanObjective`) or ``closed`` (the
    closed forms of :mod:`qmpc.plan_batch`, as :class:`PlanTargets` builds them)."""
    if kind == "torch":
        return PlanObjective(q, model, heads, x0, horizon, 0.95, termination=termination)
    targets = PlanTargets(q, q, model, heads, LOW, HIGH, horizon, 0.95, termination=termination)
    return targets._objective(q, model, heads, x0)


@pytest.mark.parametrize("kind", ["torch", "closed"])
@pytest.mark.parametrize("horizon", [1, 3])
def test_objective_derivatives_match_finite_differences(horizon, kind):
    q, model, heads = _networks()
    x0 = _states(4)
    obj = _objective(kind, q, model, heads, x0, horizon)
    rng = np.random.default_rng(0)
    u = rng.uniform(-0.8, 0.8, size=(4, horizon * NU))
    rows = np.arange(4)
    f, g, H = obj.derivatives(u, rows)
    np.testing.assert_allclose(f, obj.value(u, rows), rtol=0, atol=1e-13)
    eps = 1e-6
    for j in range(u.shape[1]):
        d = np.zeros_like(u)
        d[:, j] = eps
        fd_g = (obj.value(u + d, rows) - obj.value(u - d, rows)) / (2 * eps)
        fd_H = (obj.derivatives(u + d, rows)[1] - obj.derivatives(u - d, rows)[1]) / (2 * eps)
        np.testing.assert_allclose(g[:, j], fd_g, rtol=1e-6, atol=1e-8)
        np.testing.assert_allclose(H[:, :, j], fd_H, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("case", ["plain", "no termination", "certain termination", "layer norm"])
@pytest.mark.parametrize("horizon", [2, 3, 4])
def test_closed_forms_are_the_torch_objective(horizon, case):
    """The closed-form value, gradient and exact Hessian of a batch of plans (:mod:`qmpc.plan_batch`)
    against torch's of the same networks, with a termination of ~0.1 a step, none, one certain to
    terminate (``1 − p ≈ 1e-26``: no division by it), and a PICNN with layer norms."""
    q, model, heads = _networks()
    if case == "certain termination":
        with torch.no_grad():
            heads.term_net[-1].bias.fill_(60.0)
    if case == "layer norm":
        torch.manual_seed(4)
        q = spread_layer_norms(qmpc.PICNN(NX, NU, hidden=(8, 8), action_curvature=0.1, layer_norm=True).double())
    x0, term = _states(7), case != "no termination"
    ref = _objective("torch", q, model, heads, x0, horizon, term)
    closed = _objective("closed", q, model, heads, x0, horizon, term)
    u = np.random.default_rng(horizon).uniform(-0.9, 0.9, size=(5, horizon * NU))
    rows = np.array([6, 0, 3, 3, 1])
    for got, want in zip(closed.derivatives(u, rows), ref.derivatives(u, rows), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(closed.value(u, rows), ref.value(u, rows), rtol=1e-13, atol=1e-13)
    np.testing.assert_array_equal(closed.gradient(u, rows), closed.derivatives(u, rows)[1])


def _casadi_spec(model, heads, termination: bool, closed_forms: bool = False) -> MPCSpec:
    """The H = 3 single-shooting plan of the networks' CasADi twins (``closed_forms``: with the heads'
    closed-form derivatives, as the controller plans; else CasADi's AD of the twins)."""
    return MPCSpec(
        LOW,
        HIGH,
        horizon=3,
        dynamics=model.casadi_function(),
        dynamics_derivatives=model.stage_derivatives(),
        stage_cost=heads.cost_function(),
        stage_cost_derivatives=heads.cost_derivatives() if closed_forms else None,
        termination=heads.termination_function() if termination else None,
        termination_derivatives=heads.termination_derivatives() if termination and closed_forms else None,
        discount=0.95,
        shooting="single",
    )


@pytest.mark.parametrize("termination", [True, False])
def test_closed_forms_are_the_controllers_condensed_hessian(termination):
    """The batch's closed forms against the controller's own single-shooting derivatives (CasADi's
    rollout and gradient, the condensed Hessian's callback) of the same networks, plan by plan."""
    from qmpc.solver import PlanOracle

    q, model, heads = _networks()
    planner = Planner(q, _casadi_spec(model, heads, termination, closed_forms=True), SolverOptions(workers=1), True)
    x = _states(3)
    closed = _objective("closed", q, model, heads, x, 3, termination)
    u = np.random.default_rng(7).uniform(-0.9, 0.9, size=(3, 3 * NU))
    for b in range(3):
        one = PlanOracle(planner.solver, x[b : b + 1].numpy(), planner.problem_theta())
        want = one.derivatives(u[b : b + 1], np.arange(1))
        got = closed.derivatives(u[b : b + 1], np.array([b]))
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-11, atol=1e-12)


def test_plan_targets_are_the_same_on_the_closed_forms_and_on_torch():
    q, model, heads = _networks()
    x = _states(16)
    targets = PlanTargets(q, q, model, heads, LOW, HIGH, 3, 0.95, tol=1e-10, max_iter=50)
    closed = targets(x, np.zeros((16, NU)))
    targets.closed_form = False
    ref = targets(x, np.zeros((16, NU)))
    assert Status.ok(closed.status).all() and Status.ok(ref.status).all()
    np.testing.assert_allclose(closed.value.numpy(), ref.value.numpy(), rtol=0, atol=1e-10)
    np.testing.assert_allclose(closed.plan, ref.plan, rtol=0, atol=1e-6)


@pytest.mark.parametrize("termination", [True, False])
def test_plan_values_match_the_casadi_plan_of_the_twins(termination):
    """``V_H`` from the torch objective and the batched box SQP equals the value CasADi's plan
    (the networks' exact twins: Q, the model, the cost and termination heads) finds; without
    termination (``train.plan_termination = false``), CasADi's plan without it."""
    q, model, heads = _networks()
    x = _states(12)
    targets = PlanTargets(q, q, model, heads, LOW, HIGH, 3, 0.95, tol=1e-10, max_iter=50, termination=termination)
    res = targets(x, np.zeros((12, NU)))
    assert Status.ok(res.status).all() and res.plan.shape == (12, 3 * NU)
    spec = _casadi_spec(model, heads, termination)
    ref, _ = Planner(q, spec, SolverOptions(tol=1e-10, workers=1), bake_weights=True).solve(x.numpy())
    assert Status.ok(ref.status).all()
    np.testing.assert_allclose(res.value.numpy(), ref.value, rtol=1e-9, atol=1e-9)


def test_horizon_one_is_the_argmin_layers_value():
    q, model, heads = _networks()
    x = _states(8)
    res = PlanTargets(q, q, model, heads, LOW, HIGH, 1, 0.95, tol=1e-10, max_iter=50)(x, np.zeros((8, NU)))
    _, v = qmpc.ArgminLayer(q, LOW, HIGH, grad_mode="none")(x)
    np.testing.assert_allclose(res.value.numpy(), v.detach().numpy(), rtol=0, atol=1e-9)


def test_double_detached_scores_the_online_plan_with_the_target_network():
    q, model, heads = _networks()
    q_target = qmpc.PICNN(NX, NU, hidden=(8, 8), action_curvature=0.1).double()
    x = _states(6)
    targets = PlanTargets(q, q_target, model, heads, LOW, HIGH, 2, 0.95, tol=1e-10, max_iter=50)
    own, online = targets(x, np.zeros((6, NU)), "target"), targets(x, np.zeros((6, NU)), "online")
    score = PlanObjective(q_target, model, heads, x, 2, 0.95).value(online.plan, np.arange(6))
    np.testing.assert_allclose(online.value.numpy(), score, rtol=0, atol=1e-12)
    assert np.all(own.value.numpy() <= score + 1e-9)  # the target network's own plan is its minimum


def test_the_gradient_through_the_plan_matches_finite_differences():
    """``double`` at H = 3: ``V = J_target(U*(θ))`` with ``U*`` the online network's plan. Its
    gradient in the online weights (the tilt through the plan's optimality conditions) against
    central differences of re-solved plans, along random directions of the weights."""
    q, model, heads = _networks()
    torch.manual_seed(5)
    q_target = qmpc.PICNN(NX, NU, hidden=(8, 8), action_curvature=0.1).double()
    x = _states(6)
    targets = PlanTargets(q, q_target, model, heads, 3 * LOW, 3 * HIGH, 3, 0.95, tol=1e-12, max_iter=100)
    start = np.zeros((6, NU))
    res = targets(x, start, "online", through_plan=True)
    assert Status.ok(res.status).all()
    free = (np.abs(res.plan) < 3 - 1e-6).sum()
    assert 0 < free < res.plan.size  # some actions on a bound (held), most free
    w = torch.linspace(0.5, 1.5, 6, dtype=torch.float64)
    (w * res.value).sum().backward()
    grads = [p.grad.clone() for p in q.parameters()]
    gen = torch.Generator().manual_seed(3)
    eps = 1e-6
    for _ in range(3):
        d = [torch.randn(p.shape, dtype=p.dtype, generator=gen) for p in q.parameters()]
        vals = []
        for sign in (1.0, -1.0):
            with torch.no_grad():
                for p, dp in zip(q.parameters(), d, strict=True):
                    p.add_(sign * eps * dp)
            vals.append(float((w * targets(x, res.plan, "online").value).sum()))
            with torch.no_grad():
                for p, dp in zip(q.parameters(), d, strict=True):
                    p.sub_(sign * eps * dp)
        fd = (vals[0] - vals[1]) / (2 * eps)
        analytic = float(sum((g * dp).sum() for g, dp in zip(grads, d, strict=True)))
        assert abs(fd - analytic) <= 1e-5 * max(1.0, abs(fd)), (fd, analytic)
    assert any(g.abs().max() > 0 for g in grads)


PLAN_TARGETS = ["train.steps=50", "train.eval_every=25", "train.target=double_detached", "train.target_horizon=3"]


def _ip(run_dir, *sets):
    return load_config(ROOT / "launch" / "inverted_pendulum.toml", [f"run_dir={run_dir}", *TINY, *PLAN_TARGETS, *sets])


def test_a_run_with_plan_targets_trains_and_resumes_bit_identical(tmp_path):
    straight = train(_ip(tmp_path / "a"), progress=False)
    assert straight.fail_frac < 0.5  # masked plans (10 SQP iterations on networks 40 updates old)
    b = tmp_path / "b"
    train(_ip(b), progress=False, stop_at=37)
    resumed = train(_ip(b), resume=True, progress=False)
    assert resumed.eval_returns == straight.eval_returns
    assert_same_run(tmp_path / "a", b)


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["train.target=residual"], "semi, double or double_detached"),
        (["model.learn=false"], r"model\.learn = true with train\.target_horizon"),
    ],
)
def test_plan_targets_need_a_model_and_a_detached_mode(tmp_path, sets, message):
    with pytest.raises(ConfigError, match=message):
        train(_ip(tmp_path / "r", *sets), progress=False)
