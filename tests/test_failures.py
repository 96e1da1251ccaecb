"""Layer 4: bad input gets a clear error; failed solves are retried, masked and counted."""

import casadi as ca
import numpy as np
import pytest
import torch

import qmpc
from qmpc.check import linear_model, make_network


@pytest.fixture
def layer():
    return qmpc.ArgminLayer(make_network("PICNN", 4, 2, 0), -torch.ones(2), torch.ones(2))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_state(layer, bad):
    x = torch.zeros(3, 4, dtype=torch.float64)
    x[1, 2] = bad
    with pytest.raises(qmpc.InputError, match=r"expected finite x, got NaN/Inf in rows \[1\]"):
        layer(x)


def test_non_finite_weights(layer):
    with torch.no_grad():
        layer.q.layers[0].Wx.weight[0, 0] = float("nan")
    with pytest.raises(qmpc.InputError, match=r"layers\.0\.Wx\.weight"):
        layer(torch.zeros(2, 4, dtype=torch.float64))


@pytest.mark.parametrize(
    "x,msg",
    [
        (torch.zeros(3, 5), r"expected x of shape \(B, 4\) with B >= 1, got \(3, 5\)"),
        (torch.zeros(4), r"got \(4,\)"),
        (torch.zeros(0, 4), r"got \(0, 4\)"),
        (torch.zeros(3, 4, dtype=torch.int64), "floating-point"),
        (np.zeros((3, 4)), "torch.Tensor"),
    ],
)
def test_bad_state_shapes_and_dtypes(layer, x, msg):
    with pytest.raises(qmpc.InputError, match=msg):
        layer(x)


def test_bad_bounds():
    q = make_network("PICNN", 4, 2, 0)
    with pytest.raises(qmpc.InputError, match=r"low\[1\]=0.5 > high\[1\]=0.2"):
        qmpc.ArgminLayer(q, torch.tensor([0.0, 0.5]), torch.tensor([1.0, 0.2]))
    with pytest.raises(qmpc.InputError, match=r"expected low of shape \(2,\), got \(3,\)"):
        qmpc.ArgminLayer(q, torch.zeros(3), torch.ones(2))
    with pytest.raises(qmpc.InputError, match="NaN"):
        qmpc.ArgminLayer(q, torch.tensor([0.0, float("nan")]), torch.ones(2))


def test_bad_options():
    q = make_network("PICNN", 4, 2, 0)
    with pytest.raises(qmpc.InputError, match="grad_mode"):
        qmpc.ArgminLayer(q, -1, 1, grad_mode="full")
    with pytest.raises(qmpc.InputError, match="solver plugin"):
        qmpc.ArgminLayer(q, -1, 1, solver="snopt")
    with pytest.raises(qmpc.InputError, match="unknown solver option"):
        qmpc.ArgminLayer(q, -1, 1, max_iters=3)
    with pytest.raises(qmpc.InputError, match="QNetwork"):
        qmpc.ArgminLayer(torch.nn.Linear(3, 1), -1, 1)
    with pytest.raises(qmpc.InputError, match="dynamics and stage_cost"):
        qmpc.ArgminLayer(q, -1, 1, horizon=3)
    x, u = ca.SX.sym("x", 3), ca.SX.sym("u", 2)
    f = ca.Function("f", [x, u], [x])
    _, c, _, _ = linear_model(4, 2)
    with pytest.raises(qmpc.InputError, match=r"input 0 of dynamics to have shape \(4, 1\), got \(3, 1\)"):
        qmpc.ArgminLayer(q, -1, 1, horizon=3, dynamics=f, stage_cost=c)
    with pytest.raises(qmpc.InputError, match="discount"):
        qmpc.ArgminLayer(q, -1, 1, discount=1.5)


def _hard_layer(max_iter=1, **kw):
    """A non-convex problem that needs several SQP iterations from the cold start."""
    q = make_network("MLPQ", 4, 2, 3, hidden=(16, 16))
    with torch.no_grad():
        for p in q.parameters():
            p.mul_(3.0)
    return qmpc.ArgminLayer(q, -3 * torch.ones(2), 3 * torch.ones(2), max_iter=max_iter, **kw)


def test_iteration_limit_is_retried_masked_and_counted():
    layer = _hard_layer()
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    u, v = layer(x)
    res = layer.last_result
    failed = ~qmpc.Status.ok(res.status)
    assert failed.any(), res.status
    assert (res.status[failed] == qmpc.Status.MAX_ITER).all()
    assert res.num_failed == failed.sum() == layer.counters["failed"]
    assert res.status_tensor.dtype == torch.int8 and (res.status_tensor.numpy() == res.status).all()
    assert np.isfinite(u.detach().numpy()).all() and (u.abs() <= 3).all()
    # a loss on the failed samples only: exactly zero gradient, never garbage
    i = np.flatnonzero(failed)
    (u[i].sum() + v[i].sum()).backward()
    assert x.grad.abs().max() == 0
    assert all(p.grad.abs().max() == 0 for p in layer.q.parameters())


def test_iteration_limit_can_raise():
    layer = _hard_layer(on_failure="raise")
    with pytest.raises(qmpc.SolverError, match="MAX_ITER"):
        layer(torch.randn(6, 4, dtype=torch.float64))


def test_cold_retry_rescues_a_bad_warm_start():
    layer = _hard_layer(max_iter=8)
    x = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    layer(x, grad_mode="none", w0=np.tile([3.0, 3.0], (6, 1)))  # a corner far from the minima
    st = layer.last_result.status
    assert (st == qmpc.Status.RETRIED).any(), st
    assert layer.counters["retried"] == (st == qmpc.Status.RETRIED).sum()


def test_weakly_active_bound_convention_and_count():
    """μ exactly on the bound: the derivative does not exist; qmpc uses the active side (zero)."""
    q = qmpc.QuadraticQ(2, 2, hidden=(), diagonal=True, state_dependent_curvature=False).double()
    with torch.no_grad():
        q.mu.weight.zero_()
        q.mu.bias.copy_(torch.tensor([0.5, 0.1]))
    layer = qmpc.ArgminLayer(q, -0.5 * torch.ones(2), 0.5 * torch.ones(2), tol=1e-13)
    u, _ = layer(torch.zeros(1, 2, dtype=torch.float64))
    (g,) = torch.autograd.grad(u.sum(), [q.mu.bias])
    assert layer.counters["weakly_active"] == 1
    np.testing.assert_allclose(g.numpy(), [0.0, 1.0], atol=1e-10)


def test_singular_kkt_is_flagged_and_keeps_value_gradient():
    q = qmpc.MLPQ(3, 2, hidden=(4,)).double()
    with torch.no_grad():
        q.net[0].weight[:, 3:] = 0.0  # Q does not depend on u: every u is a minimiser
    layer = qmpc.ArgminLayer(q, -torch.ones(2), torch.ones(2))
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    u, v = layer(x)
    params = list(q.parameters())
    g = torch.autograd.grad(u.sum() + v.sum(), params)
    assert layer.last_adjoint.singular.all()
    assert layer.counters["singular"] == 2
    assert (layer.last_result.status == qmpc.Status.SOLVED).all()  # backward leaves the result alone
    env = torch.autograd.grad(q(x, u.detach()).sum(), params)
    for a, b in zip(g, env, strict=True):
        torch.testing.assert_close(a, b)


def _plan_layers_raising_at_marked_states():
    """A single-shooting H = 3 layer whose Python model derivatives raise at states with
    ``x[0] > 50``, and the same layer with derivatives that never raise."""
    from qmpc.problem import CasadiStageDerivatives

    f, c, _, _ = linear_model(3, 2, seed=0)
    inner = CasadiStageDerivatives(f, 2)

    def derivatives(X, U, P):
        if (X[:, 0] > 50).any():
            raise FloatingPointError("a model derivative that fails at the marked state")
        return inner(X, U, P)

    q = make_network("PICNN", 3, 2, 0)
    kw = dict(horizon=3, dynamics=f, stage_cost=c, shooting="single", grad_mode="none", workers=1)
    raising = qmpc.ArgminLayer(q, -1.0, 1.0, dynamics_derivatives=derivatives, **kw)
    return raising, qmpc.ArgminLayer(q, -1.0, 1.0, dynamics_derivatives=inner, **kw)


def test_a_solve_that_raises_inside_casadi_is_contained():
    """An evaluation that raises inside CasADi (here the single-shooting Hessian's Python model
    derivatives, for one marked state) makes the mapped batch call raise 'Evaluation failed'.
    The solver must contain it: the batch is solved row by row, the other samples solve, the
    raising one is retried, then counted as FAILED; nothing raises, actions stay in bounds."""
    layer, ok = _plan_layers_raising_at_marked_states()
    x = torch.zeros(3, 3, dtype=torch.float64)
    x[1, 0] = 100.0
    u, v = layer(x)
    np.testing.assert_array_equal(layer.last_result.status, [qmpc.Status.SOLVED, qmpc.Status.FAILED, 0])
    assert layer.counters["failed"] == 1
    assert (torch.abs(u) <= 1).all() and torch.isfinite(u).all()
    u_ok, v_ok = ok(x[[0, 2]])
    torch.testing.assert_close(u[[0, 2]], u_ok)
    torch.testing.assert_close(v[[0, 2]], v_ok)


def test_retry_tries_the_same_then_the_other_plugin_by_default():
    q = make_network("PICNN", 4, 2, 0)
    names = [s.class_name() for s in qmpc.ArgminLayer(q, -1, 1).solver.retry_solvers]
    assert names == ["Sqpmethod", "IpoptInterface"]
    names = [s.class_name() for s in qmpc.ArgminLayer(q, -1, 1, solver="ipopt").solver.retry_solvers]
    assert names == ["IpoptInterface", "Sqpmethod"]
    same = qmpc.ArgminLayer(q, -1, 1, retry_plugin="same").solver
    assert same.retry_solvers == [same.nlpsol]
    assert [s.class_name() for s in qmpc.ArgminLayer(q, -1, 1, retry_plugin="ipopt").solver.retry_solvers] == [
        "IpoptInterface"
    ]
    with pytest.raises(qmpc.InputError, match="retry_plugin"):
        qmpc.ArgminLayer(q, -1, 1, retry_plugin="snopt")


def test_multiple_shooting_converges_without_convexification():
    """``convexify="auto"`` leaves sqpmethod's Hessian alone for horizons > 1: with eigen-clip it
    stopped at non-stationary points through a nonlinear model (see SolverOptions.convexify).
    Here: an MLP model with curvature, every sample must pass the KKT certificate first time."""
    from qmpc.dynamics import DynamicsModel

    torch.manual_seed(0)
    q = make_network("PICNN", 6, 2, 0)
    m = DynamicsModel(6, 2, hidden=[16]).double()
    with torch.no_grad():
        m.delta_scale.fill_(0.3)
    x = torch.randn(8, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    _, c, _, _ = linear_model(6, 2)
    layer = qmpc.ArgminLayer(q, -1.0, 1.0, horizon=6, dynamics=m.casadi_function(), stage_cost=c, discount=0.95)
    assert layer.solver.options.convexify == "none"
    layer(x, grad_mode="none")
    assert (layer.last_result.status == qmpc.Status.SOLVED).all(), layer.last_result.status
    assert qmpc.ArgminLayer(q, -1.0, 1.0).solver.options.convexify == "eigen-clip"


def test_a_single_state_plan_that_raises_inside_casadi_is_contained():
    """The one-state path (a controller's plan, evaluated through CasADi's buffers) contains an
    evaluation that raises as the batch's does: FAILED after the retries, no exception, an action
    in bounds; a state where nothing raises gets the batch's plan."""
    layer, _ = _plan_layers_raising_at_marked_states()
    bad = torch.zeros(1, 3, dtype=torch.float64)
    bad[0, 0] = 100.0
    u, _ = layer(bad)
    assert layer.last_result.status[0] == qmpc.Status.FAILED
    assert (torch.abs(u) <= 1).all() and torch.isfinite(u).all()
    good = torch.tensor([[0.3, -0.2, 0.1], [0.0, 0.0, 0.0]], dtype=torch.float64)
    u_batch, v_batch = layer(good)
    for i in range(2):
        u_one, v_one = layer(good[i : i + 1])
        assert layer.last_result.status[0] == qmpc.Status.SOLVED
        torch.testing.assert_close(u_one, u_batch[i : i + 1], rtol=0, atol=1e-12)
        torch.testing.assert_close(v_one, v_batch[i : i + 1], rtol=0, atol=1e-12)


def test_a_one_state_evaluation_that_reports_failure_by_its_return_code_raises():
    """Evaluated through CasADi's buffers, a function that reports failure by a return code (not
    an exception) leaves its last outputs in the buffer: the one-state path must raise, as a call
    does, rather than read them as this evaluation's."""
    from qmpc.solver import _Buffered

    class Flaky(ca.Callback):
        def __init__(self):
            ca.Callback.__init__(self)
            self.fail = False
            self.construct("flaky", {})

        def get_n_in(self):
            return 1

        def get_n_out(self):
            return 1

        def has_eval_buffer(self):
            return True

        def eval_buffer(self, arg, res):
            if self.fail:
                return 1
            np.frombuffer(res[0], dtype=np.float64)[:] = 2.0 * np.frombuffer(arg[0], dtype=np.float64)
            return 0

    flaky = Flaky()
    x = ca.MX.sym("x")
    fn = ca.Function("f", [x], [flaky(x)])
    one = _Buffered(fn)
    np.testing.assert_array_equal(one(np.array([1.5]))[0], [[3.0]])
    flaky.fail = True
    with pytest.raises(RuntimeError):
        fn(4.0)
    with pytest.raises(RuntimeError, match="evaluation of f failed"):
        one(np.array([4.0]))


def test_lazy_plugins_are_built_at_first_use_and_solve_as_eager_ones():
    """``SolverOptions.lazy_plugins`` (training's plan actor): no plugin instance until a solve
    reaches the plugin, and then the same solutions as a solver that built them at construction."""
    q = make_network("PICNN", 4, 2, 0).double()
    x = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    eager = qmpc.ArgminLayer(q, -1, 1, newton=False, workers=1)
    lazy = qmpc.ArgminLayer(q, -1, 1, newton=False, workers=1, lazy_plugins=True)
    assert lazy.solver._plugins is None and eager.solver._plugins is not None
    u_e, v_e = eager(x)
    u_l, v_l = lazy(x)
    assert lazy.solver._plugins is not None
    torch.testing.assert_close(u_l, u_e, rtol=0, atol=0)
    torch.testing.assert_close(v_l, v_e, rtol=0, atol=0)
    assert [s.class_name() for s in lazy.solver.retry_solvers] == ["Sqpmethod", "IpoptInterface"]
