"""What a training run is at a step, and the one place that says what its checkpoint holds.

:class:`TrainState` holds everything the loop of :mod:`qmpc.trainer` changes as it goes: the
networks, optimisers, replay buffer, RNGs, the training environment, the loop's counters and the
warm start of the actor's solver. :meth:`TrainState.state_dict` is the checkpoint
(``qmpc.checkpoint``'s format: its ``config``, ``spec``, ``network`` and ``q`` are what
:func:`~qmpc.checkpoint.policy_of` and :func:`~qmpc.checkpoint.network_from_checkpoint` read) and
:meth:`TrainState.load_state_dict` restores all of it, so a resumed run continues bit for bit. A
new piece of state is added to both, and nowhere else.
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import mujoco
import numpy as np
import torch

from qmpc.bridge import ArgminLayer
from qmpc.checkpoint import CheckpointError
from qmpc.config import Config
from qmpc.data import ReplayBuffer, as_numpy
from qmpc.dynamics import DynamicsModel, OutcomeModel
from qmpc.env import EnvSpec
from qmpc.errors import ConfigError
from qmpc.exploration import ColoredNoise
from qmpc.networks import QNetwork
from qmpc.networks.behaviour import BehaviourPolicy, BehaviourRegularizedQ
from qmpc.plan_actor import PlanActor
from qmpc.solver import Status

__all__ = ["SolveWindow", "TrainState"]

RESUME_KEYS = ("q_target", "optimizer", "scheduler", "buffer", "rng", "env_state", "loop")
"""What a checkpoint needs beyond a policy's keys to resume training from."""


class SolveWindow:
    """The TD-target solves of the last ``size`` updates (the solver alarm's window): each
    update's failed fraction and how many of its samples ended in each :class:`~qmpc.solver.Status`."""

    def __init__(self, size: int):
        self.fail_fracs: deque[float] = deque(maxlen=size)
        self.counts: deque[dict[str, int]] = deque(maxlen=size)
        self.message = ""
        """The solver's last failure message (its plugin's return status)."""

    def __len__(self) -> int:
        return len(self.fail_fracs)

    @property
    def full(self) -> bool:
        return len(self.fail_fracs) == self.fail_fracs.maxlen

    def add(self, fail_frac: float, status: np.ndarray | None, message: str = "") -> None:
        """One update: its failed fraction, its solves' ``status`` codes (None: unknown) and the
        solver's failure message (kept until a newer one)."""
        self.message = message or self.message
        self.fail_fracs.append(float(fail_frac))
        codes = np.bincount(np.asarray(status, dtype=np.int64), minlength=len(Status)) if status is not None else []
        self.counts.append({Status(s).name: int(n) for s, n in enumerate(codes) if n})

    def fail_frac(self) -> float:
        """Mean failed fraction over the window."""
        return float(np.mean(self.fail_fracs)) if self.fail_fracs else 0.0

    def status_counts(self) -> dict[str, int]:
        """Samples of each status over the window, in :class:`~qmpc.solver.Status` order."""
        total = {s.name: sum(c.get(s.name, 0) for c in self.counts) for s in Status}
        return {k: n for k, n in total.items() if n}

    def state_dict(self) -> dict[str, list]:
        return {"fail_frac": list(self.fail_fracs), "status": [dict(c) for c in self.counts], "message": self.message}

    def load_state_dict(self, s: dict[str, list]) -> None:
        self.fail_fracs.clear()
        self.counts.clear()
        self.fail_fracs.extend(s.get("fail_frac", []))
        self.counts.extend(dict(c) for c in s.get("status", []))
        self.message = str(s.get("message", ""))


@dataclass(eq=False)
class TrainState:
    """Everything a training run changes as it goes (see the module docstring)."""

    cfg: Config
    spec: EnvSpec
    env: Any
    """The training environment: its RNG, time-limit counter and MuJoCo state are saved."""
    q: QNetwork
    q_target: QNetwork
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    buffer: ReplayBuffer
    rng: np.random.Generator
    """Random actions, exploration noise and Q's batches. (torch's global RNG is saved too.)"""
    model_rng: np.random.Generator
    """The dynamics model's batches: a separate stream, so the model never changes Q's batches."""
    model: DynamicsModel | None = None
    """The learned dynamics model (``model.learn``), else None."""
    model_optimizer: torch.optim.Optimizer | None = None
    model_ready: bool = False
    """The model's normalisation has been fitted (from the buffer, when learning starts)."""
    outcome: OutcomeModel | None = None
    """The learned stage cost and termination heads (``model.learn``), else None."""
    outcome_optimizer: torch.optim.Optimizer | None = None
    outcome_ready: bool = False
    """The heads' normalisation has been fitted (from the buffer, when learning starts)."""
    solve_window: SolveWindow | None = None
    """The solver alarm's window (``solver.fail_window`` updates; made from the config if None)."""
    acc: dict[str, list[float]] = field(default_factory=dict)
    """Training metrics of the current logging window (a checkpoint can fall inside one)."""
    step: int = 0
    episode: int = 0
    fails: float = 0.0
    """Failed TD-target solves so far (sum of each batch's failed fraction × batch size)."""
    solves: int = 0
    """TD-target solves so far."""
    obs: np.ndarray | None = None
    """The training environment's current observation."""
    ep_return: float = 0.0
    ep_len: int = 0
    eval_steps: list[int] = field(default_factory=list)
    eval_returns: list[float] = field(default_factory=list)
    wall_before: float = 0.0
    """Wall time of the run's earlier launches (up to the checkpoint this one resumed from)."""
    started: float = field(default_factory=time.perf_counter)
    """``time.perf_counter()`` when this launch started."""
    layers: dict[str, ArgminLayer] = field(default_factory=dict)
    """The argmin layers whose warm start (:meth:`~qmpc.bridge.ArgminLayer.warm_start_state`, the
    last solution) the next solve starts from: the trainer's ``actor``. Saved, so that the first
    solve after a resume starts where the uninterrupted run's does."""

    behaviour: BehaviourPolicy | None = None
    """``π_β`` of the behaviour-regularised argmin (``train.behaviour_weight > 0``), fitted before
    training (:meth:`prepare_behaviour`) and fixed after; else None."""

    critics: torch.nn.ModuleList = field(default_factory=torch.nn.ModuleList)
    """The Q networks besides :attr:`q` (``train.critics − 1`` of them) and their target networks
    (:attr:`critic_targets`): empty with one critic."""
    critic_targets: torch.nn.ModuleList = field(default_factory=torch.nn.ModuleList)

    q_average: QNetwork | None = None
    """The average of :attr:`q`'s weights that controllers use (``train.policy_average > 0``;
    :meth:`update_average`), saved as the checkpoint's ``q`` (and :attr:`q` as ``q_train``); else None."""
    averaged: int = 0
    """Updates folded into :attr:`q_average` so far."""

    noise: ColoredNoise = field(init=False)
    """The exploration noise (``train.exploration_color``, one sequence as long as an episode of
    :attr:`env`): a coloured sequence and the position in it are saved, so that a run resumed
    within an episode adds the same noise. Colour 0 (white) keeps no sequence."""

    plan_actor: PlanActor | None = None
    """The H-step MPC that acts (``train.horizon > 1``): the policy of its last rebuild and its
    plan are saved, so that the first step after a resume plans as the uninterrupted run's does."""

    def __post_init__(self) -> None:
        if self.solve_window is None:
            self.solve_window = SolveWindow(self.cfg.solver.fail_window)
        length = self.env.spec.max_episode_steps or 1000
        self.noise = ColoredNoise(self.cfg.train.exploration_color, self.spec.act_dim, length)  # draws nothing here

    @property
    def policy_q(self) -> QNetwork:
        """The network whose argmin controllers use: :attr:`q_average` if there is one, else :attr:`q`."""
        return self.q if self.q_average is None else self.q_average

    def update_average(self) -> None:
        """Move :attr:`q_average` towards :attr:`q` by ``max(r, 1/(t+1))`` after ``t`` earlier
        updates (``r = train.policy_average``): the running mean of the first ``1/r`` iterates,
        then an exponential average. Nothing without an average."""
        if self.q_average is None:
            return
        rate = max(self.cfg.train.policy_average, 1.0 / (self.averaged + 1))
        with torch.no_grad():
            torch._foreach_lerp_(list(self.q_average.parameters()), list(self.q.parameters()), rate)
        self.averaged += 1

    def wall_s(self) -> float:
        """Wall time of the whole run so far, resumes included."""
        return self.wall_before + time.perf_counter() - self.started

    def policy(self, copy: bool = True) -> dict[str, Any]:
        """What a controller is built from (:data:`~qmpc.checkpoint.POLICY_KEYS`): the config, task,
        network, units, Q and, with ``model.learn``, the model and heads, as they are now (``copy``:
        tensors cloned, so that training does not change them)."""
        cfg, spec = self.cfg, self.spec

        def tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
            return {k: v.detach().clone() if copy else v for k, v in module.state_dict().items()}

        out = {
            "config": dataclasses.asdict(cfg),
            "spec": {
                "env_id": spec.env_id,
                "obs_dim": spec.obs_dim,
                "act_dim": spec.act_dim,
                "low": spec.low.tolist(),
                "high": spec.high.tolist(),
            },
            "network": network_kwargs(cfg),
            "gamma": cfg.train.gamma,
            "cost_scale": cfg.train.cost_scale,
            "q": tensors(self.policy_q),
        }
        if self.model is not None:
            out["model"] = {"kwargs": self.model.kwargs(), "state": tensors(self.model)}
        if self.outcome is not None:
            out["outcome"] = {"kwargs": self.outcome.kwargs(), "state": tensors(self.outcome)}
        if self.behaviour is not None:
            b = self.behaviour
            out["behaviour"] = {
                "kwargs": {"hidden": list(b.hidden), "activation": b.activation},
                "weight": self.cfg.train.behaviour_weight,
                "state": tensors(b),
            }
        return out

    def prepare_behaviour(self, ckpt: dict[str, Any] | None) -> None:
        """``π_β`` as the run uses it: the checkpoint's (a resumed run), else fitted now to the
        replay buffer's actions (the dataset), with its own seed so that the rest of the run draws
        what it would without it. Call before the argmin layers are built: they copy ``π_β``."""
        if self.behaviour is None:
            return
        if ckpt is not None:
            if "behaviour" not in ckpt:
                raise CheckpointError(
                    "expected the behaviour policy in a checkpoint of train.behaviour_weight > 0, got none"
                )
            self.behaviour.load_state_dict(ckpt["behaviour"]["state"])
            return
        tc, n = self.cfg.train, len(self.buffer)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.seed + 4099)
            self.behaviour.fit(
                self.buffer.obs[:n],
                self.buffer.act[:n],
                tc.behaviour_steps,
                tc.batch_size,
                tc.lr,
                self.cfg.seed + 4099,
                tc.behaviour_scale,
                self.buffer.mean_cost_to_go(tc.gamma) if tc.behaviour_scale == "value" else 1.0,
            )

    def acting(self, q: QNetwork) -> QNetwork:
        """The network whose argmin acts and makes the TD targets: ``q`` itself, or ``q`` behind
        the behaviour penalty (:class:`~qmpc.networks.behaviour.BehaviourRegularizedQ`, sharing
        ``q``'s weights)."""
        if self.behaviour is None:
            return q
        return BehaviourRegularizedQ(q, self.behaviour, self.cfg.train.behaviour_weight)

    def state_dict(self) -> dict[str, Any]:
        """The full training checkpoint (a policy plus what resuming needs)."""
        full = {
            **self.policy(copy=False),
            "q_target": self.q_target.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "buffer": self.buffer.state_dict(),
            "rng": {
                "torch": torch.get_rng_state(),
                "numpy": self.rng.bit_generator.state,
                "model": self.model_rng.bit_generator.state,
            },
            "env_state": env_state(self.env),
            "loop": {
                "step": self.step,
                "episode": self.episode,
                "fails": self.fails,
                "solves": self.solves,
                "obs": torch.tensor(self.obs),
                "ep_return": self.ep_return,
                "ep_len": self.ep_len,
                "eval_steps": list(self.eval_steps),
                "eval_returns": list(self.eval_returns),
                "model_ready": self.model_ready,
                "outcome_ready": self.outcome_ready,
                "acc": {k: list(v) for k, v in self.acc.items()},
                "wall_s": self.wall_s(),
                "solve_window": self.solve_window.state_dict(),
                "noise": _noise_tensors(self.noise),
            },
            "warm_starts": {name: _warm_tensors(layer.warm_start_state()) for name, layer in self.layers.items()},
        }
        if self.model is not None:
            full["model_optimizer"] = self.model_optimizer.state_dict()
        if self.outcome is not None:
            full["outcome_optimizer"] = self.outcome_optimizer.state_dict()
        if self.plan_actor is not None:
            full["plan_actor"] = self.plan_actor.state_dict()
        if self.q_average is not None:  # "q" (the policy's) is the average
            full["q_train"] = self.q.state_dict()
            full["loop"]["averaged"] = self.averaged
        if len(self.critics):
            full["critics"] = self.critics.state_dict()
            full["critic_targets"] = self.critic_targets.state_dict()
        return full

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        """Continue from a checkpoint of :meth:`state_dict` (read by :func:`~qmpc.checkpoint.load_checkpoint`,
        which checked that its numbers are finite) of the same task and architecture."""
        self._check_resumable(ckpt)
        if self.q_average is None:
            self.q.load_state_dict(ckpt["q"])
        else:
            self.q.load_state_dict(ckpt["q_train"])
            self.q_average.load_state_dict(ckpt["q"])
        self.q_target.load_state_dict(ckpt["q_target"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.buffer.load_state_dict(ckpt["buffer"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        self.rng.bit_generator.state = ckpt["rng"]["numpy"]
        set_env_state(self.env, ckpt["env_state"])
        s = ckpt["loop"]
        self.step, self.episode, self.fails, self.solves = s["step"], s["episode"], s["fails"], s["solves"]
        self.wall_before = s.get("wall_s", 0.0)
        self.obs, self.ep_return, self.ep_len = as_numpy(s["obs"]), s["ep_return"], s["ep_len"]
        self.eval_steps, self.eval_returns = s["eval_steps"], s["eval_returns"]
        self.acc = {k: list(v) for k, v in s.get("acc", {}).items()}  # older checkpoints: window lost
        self.solve_window.load_state_dict(s.get("solve_window", {}))  # older checkpoints: an empty one
        self.averaged = s.get("averaged", 0)
        if s.get("noise") is not None:  # older checkpoints saved None: drawn anew
            self.noise.load_state_dict({k: as_numpy(v) if torch.is_tensor(v) else v for k, v in s["noise"].items()})
        warm = ckpt.get("warm_starts", {})  # older checkpoints: none, the next solves start cold
        for name, layer in self.layers.items():
            w = warm.get(name)
            layer.load_warm_start_state(None if w is None else {k: as_numpy(v) for k, v in w.items()})
        if self.cfg.train.steps < self.step:
            raise ConfigError(
                f"expected train.steps >= {self.step} (the checkpoint's step) on --resume, got {self.cfg.train.steps}"
            )
        if self.model is not None:
            self.model.load_state_dict(ckpt["model"]["state"])
            self.model_optimizer.load_state_dict(ckpt["model_optimizer"])
            self.model_ready = s["model_ready"]
            self.model_rng.bit_generator.state = ckpt["rng"]["model"]
        if self.plan_actor is not None:
            self.plan_actor.load_state_dict(ckpt.get("plan_actor"))
        if len(self.critics):
            self.critics.load_state_dict(ckpt["critics"])
            self.critic_targets.load_state_dict(ckpt["critic_targets"])
        if self.outcome is not None and "outcome" in ckpt:  # older checkpoints: the heads start afresh
            self.outcome.load_state_dict(ckpt["outcome"]["state"])
            self.outcome_optimizer.load_state_dict(ckpt["outcome_optimizer"])
            self.outcome_ready = s.get("outcome_ready", True)

    def _check_resumable(self, ckpt: dict[str, Any]) -> None:
        missing = [k for k in RESUME_KEYS if k not in ckpt]
        if missing:
            raise CheckpointError(f"expected a full training checkpoint to resume from, got one without {missing}")
        env_id, arch = self.spec.env_id, self.cfg.network.arch
        if len(self.critics) and "critics" not in ckpt:
            raise CheckpointError(
                f"expected the other critics in a checkpoint of train.critics = {len(self.critics) + 1}, got none"
            )
        if self.q_average is not None and "q_train" not in ckpt:
            raise CheckpointError(
                f"expected the trained Q (q_train) in a checkpoint of train.policy_average = "
                f"{self.cfg.train.policy_average}, got none: the run was trained without an average"
            )
        if ckpt["spec"]["env_id"] != env_id or ckpt["network"]["arch"] != arch:
            raise CheckpointError(
                f"expected a checkpoint of {env_id} / {arch}, got {ckpt['spec']['env_id']} / {ckpt['network']['arch']}"
            )


def _warm_tensors(state: dict[str, np.ndarray] | None) -> dict[str, torch.Tensor] | None:
    """A layer's warm start as tensors (a checkpoint holds tensors only). A non-finite one (a
    diverged solve) is not kept: a checkpoint holds finite numbers only, so it resumes cold."""
    if state is None or not all(np.isfinite(a).all() for a in state.values()):
        return None
    return {k: torch.from_numpy(a) for k, a in state.items()}


def network_kwargs(cfg: Config) -> dict:
    """The checkpoint's ``network``: what :func:`~qmpc.checkpoint.network_from_checkpoint` builds."""
    n = cfg.network
    return {
        "arch": n.arch,
        "hidden": list(n.hidden),
        "activation": n.activation,
        "action_curvature": n.action_curvature,
        "state_dependent_curvature": n.state_dependent_curvature,
        "layer_norm": n.layer_norm,
    }


def _noise_tensors(noise: ColoredNoise) -> dict[str, Any]:
    """A coloured noise's state with its sequence as a tensor (colour 0 keeps no sequence)."""
    state = noise.state_dict()
    if state["sequence"] is not None:
        state["sequence"] = torch.from_numpy(state["sequence"])
    return state


def env_state(env) -> dict[str, Any]:
    """What continuing an episode of ``env`` exactly needs: its RNG, its time-limit counter and,
    for a MuJoCo task, the simulator's state."""
    u = env.unwrapped
    st: dict[str, Any] = {"np_random": u.np_random.bit_generator.state}
    try:
        st["elapsed"] = env.get_wrapper_attr("_elapsed_steps")
    except AttributeError:
        pass
    if hasattr(u, "data") and isinstance(u.data, mujoco.MjData):
        d = u.data
        st["mujoco"] = {k: torch.tensor(getattr(d, k)) for k in ("qpos", "qvel", "act", "ctrl", "qacc_warmstart")}
        st["mujoco"]["time"] = float(d.time)
    return st


def set_env_state(env, st: dict[str, Any]) -> None:
    """Restore what :func:`env_state` saved."""
    u = env.unwrapped
    u.np_random.bit_generator.state = st["np_random"]
    if "elapsed" in st:
        env.set_wrapper_attr("_elapsed_steps", st["elapsed"])
    if "mujoco" in st:
        d = u.data
        for k, v in st["mujoco"].items():
            if k == "time":
                d.time = v
            else:
                getattr(d, k)[:] = as_numpy(v)
        mujoco.mj_forward(u.model, d)
