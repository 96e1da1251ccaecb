"""The H-step MPC that acts while Q trains (``train.horizon > 1``): the planner's own data.

A :class:`PlanActor` holds a :class:`~qmpc.controller.Controller` built from the run's policy as it
was at its last rebuild (Q, the learned model and the stage cost and termination heads; see
:meth:`~qmpc.train_state.TrainState.policy`), rebuilt every ``train.plan_refresh`` steps (a
rebuild takes ~60 ms), and the plan it shifts from step to step. Both are its state: a resumed
run rebuilds the same controller from the saved policy and starts from the same plan.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from qmpc.config import TrainConfig
from qmpc.controller import Controller
from qmpc.data import as_numpy

__all__ = ["PlanActor", "acting_horizon", "plan_controller"]


def acting_horizon(tc: TrainConfig, step: int) -> int:
    """The horizon the controller acts with at ``step``: ``train.horizon``, grown linearly from 1
    over the ``train.horizon_warmup`` steps after ``learning_starts``."""
    if tc.horizon == 1 or tc.horizon_warmup == 0:
        return tc.horizon
    done = (step - tc.learning_starts + 1) / tc.horizon_warmup
    return int(np.clip(1 + np.floor(done * (tc.horizon - 1)), 1, tc.horizon))


def plan_controller(
    tc: TrainConfig, policy: dict[str, Any], horizon: int, env: Any, lazy_plugins: bool = True
) -> Controller:
    """The controller a run plans with at ``horizon``, acting or evaluating: from the run's
    ``policy`` (:meth:`~qmpc.train_state.TrainState.policy`), within ``train.trust_region`` for
    ``horizon > 1``, weighing the learned termination unless ``train.plan_termination`` is false;
    the whole greedy plan every step (``carry_greedy=False``: nothing outside :class:`PlanActor`'s
    state, so a resumed run acts as the unstopped one). ``lazy_plugins``: the NLP plugins built at
    their first use (it is rebuilt every ``plan_refresh`` steps, and compiled plans seldom need them);
    False only to measure what that saves (``benchmarks/bench_plan_actor.py``)."""
    rho = tc.trust_region if horizon > 1 else 0.0
    termination = "auto" if tc.plan_termination else "none"
    return Controller.from_policy(
        policy,
        horizon=horizon,
        env=env,
        where="the run",
        trust_region=rho,
        termination=termination,
        carry_greedy=False,
        lazy_plugins=lazy_plugins,
    )


class PlanActor:
    """Acts with the plan of :func:`acting_horizon` steps (see the module docstring).

    Args:
        tc: the run's training config (``horizon``, ``horizon_warmup``, ``plan_refresh``,
            ``learning_starts``).
        env: an environment of the task (read for its model and stage cost, never stepped).
    """

    def __init__(self, tc: TrainConfig, env: Any):
        self.tc, self.env = tc, env
        self.controller: Controller | None = None
        self.source: dict[str, Any] | None = None
        """The policy the controller was built from (tensors cloned at the rebuild)."""

    def act(self, policy, step: int, obs: np.ndarray, new_episode: bool) -> tuple[np.ndarray, dict[str, Any]]:
        """The plan's first action at ``obs`` (no exploration noise) and the controller's ``info``.
        ``policy()`` gives the run's policy as it is now (called only when the controller is
        rebuilt at this step)."""
        horizon = acting_horizon(self.tc, step)
        due = (step - self.tc.learning_starts) % self.tc.plan_refresh == 0
        if self.controller is None or due or self.controller.problem.horizon != horizon:
            plan = self._kept_plan(horizon)
            self.source = policy()
            self._build(horizon)
            self.controller.warm_plan = plan
        if new_episode:
            self.controller.reset()
        return self.controller.act(obs)

    def _kept_plan(self, horizon: int) -> np.ndarray | None:
        """The current plan, kept across a rebuild at the same horizon."""
        c = self.controller
        return None if c is None or c.problem.horizon != horizon or c.warm_plan is None else c.warm_plan.copy()

    def _build(self, horizon: int) -> None:
        self.controller = plan_controller(self.tc, self.source, horizon, self.env)

    def state_dict(self) -> dict[str, Any] | None:
        """The policy of the last rebuild, its horizon and the current plan (None before the first)."""
        if self.controller is None:
            return None
        plan = self.controller.warm_plan
        return {
            "source": self.source,
            "horizon": self.controller.problem.horizon,
            "plan": None if plan is None else torch.from_numpy(plan.copy()),
        }

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Rebuild the controller of :meth:`state_dict` (None: none yet)."""
        if state is None:
            self.controller, self.source = None, None
            return
        self.source = state["source"]
        self._build(int(state["horizon"]))
        self.controller.warm_plan = None if state["plan"] is None else as_numpy(state["plan"]).copy()
