"""Issue 19: a plan kept near what Q knows. ``Controller(trust_region=ρ)`` bounds every action of
the plan to within ``ρ · (high − low)`` of the greedy plan of the same step (Q's argmin followed
along the model); ρ → 0 is the greedy controller, a large ρ the free plan."""

from pathlib import Path

import numpy as np
import pytest

import qmpc
from qmpc.cli import main
from qmpc.env import make_env
from qmpc.errors import InputError

REACHER = Path(__file__).resolve().parents[1] / "models" / "reacher.pt"


def _deviations(rho: float, steps: int = 12) -> tuple[list[float], dict]:
    """Largest |plan's first action − greedy action| per step of the plan's own rollout."""
    greedy = qmpc.Controller.from_checkpoint(REACHER)
    plan = qmpc.Controller.from_checkpoint(REACHER, horizon=3, model="learned", trust_region=rho)
    env = make_env("Reacher-v5")
    obs, _ = env.reset(seed=3)
    out = []
    for _ in range(steps):
        a, _ = plan.act(obs)
        out.append(float(np.abs(a - greedy.act(obs)[0]).max()))
        obs, *_ = env.step(a)
    return out, plan.stats


def test_a_vanishing_trust_region_is_the_greedy_controller():
    dev, stats = _deviations(1e-9)
    assert max(dev) < 1e-6 and stats["fallback"] == 0


def test_the_plan_stays_within_its_trust_region_and_moves_inside_it():
    free, _ = _deviations(0.0)
    rho = 0.02  # Reacher's actions span [-1, 1]: 0.04
    dev, stats = _deviations(rho)
    assert stats["fallback"] == 0
    assert max(dev) <= 2 * rho + 1e-9
    assert max(free) > 2 * rho  # the free plan goes further: the bound is active
    assert max(dev) > 2 * rho - 1e-6  # and the constrained plan goes to it


@pytest.mark.parametrize("rho", [-0.1, float("nan"), float("inf"), True, "0.1"])
def test_a_bad_trust_region_is_refused(rho):
    with pytest.raises(InputError, match="trust_region"):
        qmpc.Controller.from_checkpoint(REACHER, horizon=3, model="learned", trust_region=rho)


def test_a_trust_region_needs_a_single_shooting_plan():
    with pytest.raises(InputError, match="horizon 1"):
        qmpc.Controller.from_checkpoint(REACHER, horizon=1, trust_region=0.1)
    with pytest.raises(InputError, match="multiple shooting"):
        qmpc.Controller.from_checkpoint(REACHER, horizon=3, model="learned", shooting="multiple", trust_region=0.1)


def test_run_refuses_a_negative_trust_region(tmp_path, capsys):
    assert main(["run", str(REACHER), "--horizon", "3", "--trust-region", "-1", "--plot", str(tmp_path / "p.png")]) != 0
    assert "expected --trust-region to be a finite number >= 0, got -1" in capsys.readouterr().err


def test_run_plans_with_a_trust_region(tmp_path, capsys):
    args = ["run", str(REACHER), "--horizon", "3", "--trust-region", "0.05", "--episodes", "1", "--budget-ms", "0"]
    assert main([*args, "--plot", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").exists()


def test_the_greedy_plan_follows_a_change_of_the_network_between_steps():
    # the H + 1 greedy solves of a step sync with the network once, at the step's start
    import torch

    plan = qmpc.Controller.from_checkpoint(REACHER, horizon=3, model="learned", trust_region=1e-9)
    env = make_env("Reacher-v5")
    obs, _ = env.reset(seed=3)
    before, _ = plan.act(obs)
    with torch.no_grad():  # an update between two control steps
        for p in plan.q.parameters():
            p.mul_(1.3)
    after, _ = plan.act(obs)
    fresh, _ = qmpc.Controller(plan.q, plan.low, plan.high).act(obs)
    assert np.abs(after - before).max() > 1e-3  # the change moved the greedy action
    np.testing.assert_allclose(after, fresh, atol=1e-6)


def _greedy_calls(plan) -> list[int]:
    """Counts the greedy solves of each step of ``plan`` (:func:`_steps` appends a 0 per step)."""
    calls = []
    solve = plan._greedy_action  # compiled or CasADi's: one greedy action each

    def counted(*a, **k):
        calls[-1] += 1
        return solve(*a, **k)

    plan._greedy_action = counted
    return calls


def _steps(plan, env, obs, n: int, calls: list[int], refs: list | None = None):
    """``n`` closed-loop steps of ``plan`` from ``obs``; ``refs`` gets each step's state and greedy
    plan ``(H, nu)``. Returns the last observation."""
    for _ in range(n):
        calls.append(0)
        a, _ = plan.act(obs)
        if refs is not None:
            refs.append((obs, plan._ref[1].reshape(-1, plan.q.act_dim).copy()))
        obs, *_ = env.step(a)
    return obs


def test_the_greedy_plan_is_carried_between_steps_with_two_solves():
    # from an episode's second step: the previous greedy plan shifted, its first action solved
    # anew at the state and its last at the state the model predicts under the others
    plan = qmpc.Controller.from_checkpoint(REACHER, horizon=5, model="learned", trust_region=0.05)
    calls, refs = _greedy_calls(plan), []
    env = make_env("Reacher-v5")
    _steps(plan, env, env.reset(seed=3)[0], 3, calls, refs)
    assert calls == [5, 2, 2]
    (_, old), (x, new) = refs[-2:]
    np.testing.assert_array_equal(new[1:-1], old[2:])  # the middle: carried
    greedy = qmpc.Controller(plan.q, plan.low, plan.high)
    np.testing.assert_allclose(new[0], greedy.act(x)[0], atol=1e-6)  # the first: greedy at the state
    P, theta = plan.problem, plan.planner.problem_theta()
    xk = x
    for k in range(P.N):
        xk = P.model_step(xk, new[k], k, theta)
    greedy.reset()
    np.testing.assert_allclose(new[-1], greedy.act(xk)[0], atol=1e-6)  # the last: at the predicted state


def test_a_new_episode_or_a_changed_network_solves_the_whole_greedy_plan():
    import torch

    plan = qmpc.Controller.from_checkpoint(REACHER, horizon=4, model="learned", trust_region=0.05)
    calls = _greedy_calls(plan)
    env = make_env("Reacher-v5")
    obs = _steps(plan, env, env.reset(seed=3)[0], 2, calls)
    plan.reset()  # an episode's start
    obs = _steps(plan, env, obs, 1, calls)
    with torch.no_grad():  # an update between two control steps
        for p in plan.q.parameters():
            p.mul_(1.1)
    obs = _steps(plan, env, obs, 1, calls)
    plan.warm_plan = plan.warm_plan  # a plan set from outside
    _steps(plan, env, obs, 1, calls)
    assert calls == [4, 2, 4, 4, 4]


def test_a_controller_that_does_not_carry_solves_the_whole_greedy_plan_every_step():
    # what training's plan actor builds (carry_greedy=False): its launch files were measured so
    plan = qmpc.Controller.from_checkpoint(REACHER, horizon=3, model="learned", trust_region=0.05, carry_greedy=False)
    calls = _greedy_calls(plan)
    env = make_env("Reacher-v5")
    _steps(plan, env, env.reset(seed=3)[0], 3, calls)
    assert calls == [3, 3, 3]
