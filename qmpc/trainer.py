"""Training the cost-to-go with TD learning, online or offline, in one loop that reads top to bottom.

:func:`train` runs :func:`_step` until ``train.steps``: act and step the environment (online),
learn (a TD update, and the dynamics model's fit), then log, evaluate and checkpoint as they fall
due. Everything the loop changes lives in a :class:`~qmpc.train_state.TrainState`, whose
``state_dict`` is the checkpoint. The solver alarm (``solver.max_fail_frac``) stops a run whose
TD-target solves keep failing, with a :class:`~qmpc.errors.SolverError`.

A run directory holds ``config.toml`` (the resolved config), ``checkpoint.pt`` (written
atomically every ``checkpoint_every`` steps; ``resume=True`` continues exactly where it stopped:
network, target, optimiser, replay buffer, RNGs, the environment's MuJoCo state and the actor's
warm start), ``metrics.csv`` (``step,tag,value``), TensorBoard events in ``tb/`` and
``learning_curve.png`` (:mod:`qmpc.metrics`).
"""

from __future__ import annotations

import copy
import json
import os
import socket
import time
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from qmpc.bridge import ArgminLayer
from qmpc.checkpoint import CheckpointError, load_checkpoint, policy_of, save_checkpoint
from qmpc.config import Config, check_resumed_launch, config_to_toml, resumed_config
from qmpc.controller import BatchController, Controller
from qmpc.data import (
    Batch,
    ReplayBuffer,
    atomic_write,
    batch_rollouts,
    check_dataset,
    ensure_dir,
    input_normalization,
    load_minari,
)
from qmpc.distributed import raise_if_terminated
from qmpc.dynamics import DynamicsModel, OutcomeModel
from qmpc.env import EnvSpec, env_spec, make_env
from qmpc.errors import ConfigError, OutputError, SolverError
from qmpc.losses import TDResult, conservative_gap, critic_losses, model_rolled_batch, td_loss
from qmpc.metrics import MetricsLogger, plot_learning_curve, read_metrics
from qmpc.networks import QNetwork, build_network
from qmpc.networks.behaviour import BehaviourPolicy
from qmpc.plan_actor import PlanActor, acting_horizon, plan_controller
from qmpc.plan_targets import PlanTargets
from qmpc.runner import discounted_costs, run_episodes
from qmpc.solver import Status
from qmpc.train_state import TrainState

__all__ = [
    "Evaluation",
    "MetricsLogger",
    "QGap",
    "RunSummary",
    "evaluate",
    "plot_learning_curve",
    "q_gaps",
    "read_metrics",
    "train",
]


class RunSummary(NamedTuple):
    run_dir: Path
    steps: int
    eval_steps: list[int]
    eval_returns: list[float]
    fail_frac: float
    """Fraction of all TD-target solves that failed and were masked."""
    seconds: float
    """Wall time of the whole run, resumes included (time after the last checkpoint before a kill
    is not counted)."""


# ---------------------------------------------------------------------------------------
# Pieces of the loop
# ---------------------------------------------------------------------------------------


def build_q(cfg: Config, spec: EnvSpec) -> QNetwork:
    n = cfg.network
    q = build_network(
        n.arch,
        spec.obs_dim,
        spec.act_dim,
        n.hidden,
        n.activation,
        n.action_curvature,
        n.state_dependent_curvature,
        n.layer_norm,
    )
    return q.to(getattr(torch, cfg.train.dtype))


class Evaluation(NamedTuple):
    """What :func:`evaluate` measured, means over the episodes."""

    ret: float
    """Return (sum of rewards, i.e. −cost)."""
    length: float
    fallback_frac: float
    """Fraction of steps that fell back to the shifted plan."""
    q_bias: float
    """Mean of ``Q(x_t, u_t) − G_t`` over the visited state–action pairs whose Monte-Carlo cost
    ``G_t`` (discounted, in the trained units) is known (:func:`~qmpc.runner.discounted_costs`):
    negative when Q is optimistic (predicts less cost than the policy incurs). NaN if none."""


def evaluate(
    controller: Controller | BatchController,
    env,
    episodes: int,
    seed: int,
    gamma: float = 0.99,
    cost_scale: float = 1.0,
    envs: Sequence | None = None,
) -> Evaluation:
    """The greedy controller over ``episodes`` episodes (reset seeds ``seed + i``) in ``env``, and
    its Q against Monte-Carlo costs. A :class:`~qmpc.controller.BatchController` acts in ``envs``
    instead, as many episodes at once as there are of them (:func:`~qmpc.data.batch_rollouts`)."""
    if isinstance(controller, BatchController):
        before = controller.stats["fallback"]
        eps = batch_rollouts(list(envs or ()), controller, seed, episodes=episodes)
        runs = [
            _Evaluated(float(np.sum(e.rewards)), -e.rewards, e.observations, e.actions, e.terminations[-1]) for e in eps
        ]
        fallbacks = controller.stats["fallback"] - before
    else:
        done, _ = run_episodes(controller, env, episodes, seed=seed)
        runs = [_Evaluated(e.ret, e.costs, e.observations, e.actions, e.terminated) for e in done]
        fallbacks = sum(e.fallback for e in done)
    gaps = [err[valid] for err, _, valid in q_gaps(controller.q, runs, gamma, cost_scale) if valid.any()]
    lengths = [len(run.costs) for run in runs]
    return Evaluation(
        float(np.mean([run.ret for run in runs])),
        float(np.mean(lengths)),
        fallbacks / max(1, sum(lengths)),
        float(np.mean(np.concatenate(gaps))) if gaps else float("nan"),
    )


def q_gaps(q: torch.nn.Module, episodes: Sequence, gamma: float, cost_scale: float) -> list[QGap]:
    """Per episode: Q's value of each action taken against the discounted cost-to-go then paid.

    ``episodes`` hold ``costs (T,)`` (−rewards), ``observations (T + 1, obs_dim)``, ``actions
    (T, act_dim)`` and ``terminated``. ``G_t = Σ_k γ^k cost_scale · c_{t+k}`` in Q's units, nothing
    after a termination; steps whose discounted tail a truncation cuts short are not ``valid``, and
    Q is evaluated only on the valid steps (the others' errors are NaN)."""
    p = next(q.parameters())
    out = []
    for e in episodes:
        g, valid = discounted_costs(cost_scale * np.asarray(e.costs), gamma, e.terminated)
        err = np.full(len(g), np.nan)
        if valid.any():
            with torch.no_grad():
                x = torch.as_tensor(np.asarray(e.observations)[:-1][valid], dtype=p.dtype, device=p.device)
                u = torch.as_tensor(np.asarray(e.actions)[valid], dtype=p.dtype, device=p.device)
                err[valid] = q(x, u).double().cpu().numpy().reshape(-1) - g[valid]
        out.append(QGap(err, g, valid))
    return out


class QGap(NamedTuple):
    """One episode's Q − G (:func:`q_gaps`)."""

    error: np.ndarray
    """``(T,)`` Q(x_t, u_t) − G_t in Q's units; NaN where ``valid`` is False."""
    cost_to_go: np.ndarray
    """``(T,)`` G_t, the discounted scaled cost-to-go paid from step t."""
    valid: np.ndarray
    """``(T,)`` bool: G_t is known (its tail is not cut short by a truncation)."""


class _Evaluated(NamedTuple):
    """One evaluation episode, as :func:`evaluate` reads it."""

    ret: float
    """The return (sum of rewards)."""
    costs: np.ndarray
    """``(T,)`` stage costs (−rewards)."""
    observations: np.ndarray
    """``(T + 1, obs_dim)``."""
    actions: np.ndarray
    """``(T, act_dim)``."""
    terminated: bool
    """Whether the episode ended by termination (not truncation)."""


# ---------------------------------------------------------------------------------------
# The run directory
# ---------------------------------------------------------------------------------------


class RunLock:
    """``<run_dir>/.lock`` (JSON: the owner's ``pid`` and ``host``) while a run writes there.

    Created atomically with its content (a hard link of a finished temp file), so a reader never
    sees a half-written lock. A lock whose owner is a dead process on this host is stale and is
    taken over; any other is a :class:`OutputError` naming the owner. Released on exit, errors too."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ".lock"
        self.me = {"pid": os.getpid(), "host": socket.gethostname()}

    def __enter__(self) -> RunLock:
        tmp = self.path.with_name(f".lock.{self.me['pid']}.tmp")
        tmp.write_text(json.dumps(self.me))
        try:
            for _ in range(3):
                try:
                    os.link(tmp, self.path)
                    return self
                except FileExistsError:
                    self._take_over_if_stale()
            raise OutputError(f"expected to lock {self.path.parent}, got a lock that keeps coming back ({self.path})")
        finally:
            tmp.unlink(missing_ok=True)

    def _take_over_if_stale(self) -> None:
        try:
            owner = json.loads(self.path.read_text())
            pid, host = int(owner["pid"]), str(owner["host"])
        except FileNotFoundError:
            return  # released meanwhile: try again
        except (ValueError, KeyError, TypeError):
            pid, host = None, None  # unreadable: written by no RunLock, so no live run
        if pid is not None and (host != self.me["host"] or _alive(pid)):
            raise OutputError(
                f"expected no other run in {self.path.parent}, got one running (pid {pid} on {host}; lock file "
                f"{self.path}): wait for it to finish, or remove the lock file if that run is gone"
            )
        self.path.unlink(missing_ok=True)

    def __exit__(self, *exc) -> None:
        try:
            if json.loads(self.path.read_text()) == self.me:
                self.path.unlink()
        except (OSError, ValueError):
            pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


_RUN_FILES = ("checkpoint.pt", "policy.pt", "metrics.csv", "config.toml", "learning_curve.png")


def remove_stale_temps(run_dir: Path) -> list[Path]:
    """Delete the temp files that :func:`~qmpc.data.atomic_write` leaves when killed mid-write
    (``.checkpoint.pt.XXXX`` …); call with the run directory locked, so none is in use."""
    stale = [f for f in run_dir.iterdir() if f.is_file() and any(f.name.startswith(f".{n}.") for n in _RUN_FILES)]
    for f in stale:
        f.unlink(missing_ok=True)
    return stale


# ---------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------


def train(
    cfg: Config,
    resume: bool = False,
    progress: bool = True,
    stop_at: int | None = None,
    overrides: Sequence[str] = (),
) -> RunSummary:
    """Train a cost-to-go per ``cfg``; ``stop_at`` ends the loop early without a final
    checkpoint (what a kill does; used by the tests of ``resume``).

    With ``resume`` the config comes from the checkpoint, changed only by ``overrides``
    (``key=value`` as ``--set``) of :data:`~qmpc.config.RESUMABLE_KEYS`; ``cfg`` (the launch file
    with those overrides) must be the run's but for those keys, else a :class:`ConfigError` names
    the fields that differ (it would resume another run than the file describes). The run directory is
    locked for the whole run (:class:`RunLock`): a second run on it is refused. torch's thread
    count is ``train.torch_threads`` during the run and the caller's again after it, errors too."""
    run_dir = ensure_dir(cfg.resolved_run_dir(), "the run directory")
    threads = torch.get_num_threads()
    try:
        with RunLock(run_dir):
            remove_stale_temps(run_dir)
            return _train(cfg, run_dir, resume, progress, stop_at, overrides)
    finally:
        torch.set_num_threads(threads)


class _Run(NamedTuple):
    """What the steps of one launch work with besides the :class:`TrainState` (nothing here is saved
    but the actor's warm start, which the state holds in :attr:`TrainState.layers`)."""

    run_dir: Path
    online: ArgminLayer
    """``argmin_u Q``: the TD targets of ``residual`` and the ``double`` modes (batched)."""
    target: ArgminLayer
    """``argmin_u Q_target``: the TD targets of ``semi`` (batched)."""
    actor: ArgminLayer
    """``argmin_u Q`` at the current state, warm-started at its last action."""
    evaluator: Controller
    """The greedy controller of the evaluations (on a float64 copy of Q)."""
    eval_env: Any
    logger: MetricsLogger
    bar: tqdm
    plan_targets: PlanTargets | None = None
    """``V_H`` of the TD targets (``train.target_horizon > 1``): copies of the networks, no state."""
    batch_evaluator: BatchController | None = None
    """``train.eval_envs > 1``: the evaluator's network acting in :attr:`eval_envs` at once."""
    eval_envs: tuple = ()
    """The environments of :attr:`batch_evaluator`."""


def _batch_evaluation(cfg: Config, evaluator: Controller) -> tuple[BatchController | None, tuple]:
    """``train.eval_envs > 1``: a :class:`BatchController` on the evaluator's network (whose weights
    each evaluation loads) and its environments; else none."""
    n = cfg.train.eval_envs
    if n == 1:
        return None, ()
    batch = BatchController(evaluator.q, evaluator.low, evaluator.high, n, max_iter=cfg.solver.max_iter)
    return batch, tuple(make_env(cfg.env.id, seed=cfg.seed + 10_000) for _ in range(n))


def _train(
    cfg: Config, run_dir: Path, resume: bool, progress: bool, stop_at: int | None, overrides: Sequence[str]
) -> RunSummary:
    t_start = time.perf_counter()
    cfg, ckpt = _open_run(cfg, run_dir, resume, overrides)
    torch.set_num_threads(cfg.train.torch_threads)
    st, eval_env = _new_state(cfg, t_start)
    st.prepare_behaviour(ckpt)  # before the layers, which copy π_β
    solvers = _build_solvers(cfg, st.spec, st.acting(st.q), st.acting(st.q_target))
    st.layers["actor"] = solvers[2]  # its warm start is saved
    if ckpt is not None:
        st.load_state_dict(ckpt)
    logger = MetricsLogger(run_dir, resume_step=st.step if resume else None)
    tc = cfg.train
    bar = tqdm(
        total=tc.steps,
        initial=st.step,
        disable=not progress,
        unit="step",
        dynamic_ncols=True,
        desc=f"{st.spec.env_id} {tc.mode} {tc.target}",
    )
    run = _Run(run_dir, *solvers, eval_env, logger, bar, _plan_targets(cfg, st), *_batch_evaluation(cfg, solvers[3]))
    try:
        while st.step < tc.steps:
            try:
                _step(st, run)
            except Exception:  # a SIGTERM's SystemExit raised inside C code surfaces as another error
                raise_if_terminated()
                raise
            raise_if_terminated()
            if stop_at is not None and st.step >= stop_at:
                break
    finally:
        bar.close()
        logger.close()
    return RunSummary(run_dir, st.step, st.eval_steps, st.eval_returns, st.fails / max(1, st.solves), st.wall_s())


def _open_run(cfg: Config, run_dir: Path, resume: bool, overrides: Sequence[str]) -> tuple[Config, dict | None]:
    """The run's config (on ``resume``, the checkpoint's with ``overrides``, once ``cfg`` is found to
    be the same run's: :func:`~qmpc.config.check_resumed_launch`), written to ``config.toml``, and
    the checkpoint to resume from (None for a new run)."""
    ckpt_path = run_dir / "checkpoint.pt"
    ckpt = None
    if resume:
        ckpt = load_checkpoint(ckpt_path)
        if not isinstance(ckpt.get("config"), dict):
            raise CheckpointError(f"expected a training checkpoint with its config at {ckpt_path}, got none")
        run_cfg = resumed_config(ckpt["config"], list(overrides))
        check_resumed_launch(cfg, run_cfg, run_dir)
        cfg = run_cfg
    elif ckpt_path.exists():
        raise ConfigError(f"expected a new run directory, got an existing checkpoint in {run_dir} (use --resume)")
    atomic_write(run_dir / "config.toml", lambda tmp: Path(tmp).write_text(config_to_toml(cfg)))
    return cfg, ckpt


def _new_state(cfg: Config, started: float) -> tuple[TrainState, Any]:
    """The state of a new run (seeded; an offline run's buffer filled) and the evaluation environment."""
    tc = cfg.train
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    env = make_env(cfg.env.id, seed=cfg.seed)
    eval_env = make_env(cfg.env.id, seed=cfg.seed + 10_000)
    _check_planning(cfg, env)
    _check_offline_terms(cfg)
    spec = env_spec(env)
    buffer = ReplayBuffer(spec.obs_dim, spec.act_dim, tc.buffer_size, plan_steps=tc.target_horizon)
    q = build_q(cfg, spec)
    _prepare_data(cfg, spec, buffer, q)
    q_target = copy.deepcopy(q).requires_grad_(False)  # moved by Polyak averaging only, never by a gradient
    critics = _new_critics(cfg, spec, q)
    model_rng = np.random.default_rng([cfg.seed, 1])  # the model's batches: Q's stay the same
    model, model_opt, outcome, outcome_opt = None, None, None, None
    if cfg.model.learn:
        model = DynamicsModel(spec.obs_dim, spec.act_dim, cfg.model.hidden, cfg.model.activation)
        model = model.to(getattr(torch, tc.dtype))
        model_opt = torch.optim.Adam(model.parameters(), lr=cfg.model.lr, fused=True)
        outcome, outcome_opt = _new_outcome(cfg, spec)
    opt = torch.optim.Adam([*q.parameters(), *critics.parameters()], lr=tc.lr, fused=True)
    decay = (lambda k: max(0.0, 1.0 - k / (tc.steps * tc.updates_per_step))) if tc.lr_schedule == "linear" else None
    sched = torch.optim.lr_scheduler.LambdaLR(opt, decay or (lambda k: 1.0))
    obs, _ = env.reset(seed=cfg.seed)
    st = TrainState(
        cfg, spec, env, q, q_target, opt, sched, buffer, rng, model_rng, model, model_opt, obs=obs, started=started
    )
    st.outcome, st.outcome_optimizer = outcome, outcome_opt
    st.critics, st.critic_targets = critics, copy.deepcopy(critics).requires_grad_(False)
    if tc.policy_average > 0:  # moved by TrainState.update_average only
        st.q_average = copy.deepcopy(q).requires_grad_(False)
    if tc.behaviour_weight > 0:  # fitted by TrainState.prepare_behaviour
        with torch.random.fork_rng(devices=[]):
            st.behaviour = BehaviourPolicy(spec.obs_dim, spec.act_dim, tc.behaviour_hidden, "silu", spec.low, spec.high)
    st.plan_actor = PlanActor(tc, eval_env) if tc.horizon > 1 else None  # reads eval_env's model, never steps it
    return st, eval_env


def _new_critics(cfg: Config, spec: EnvSpec, q: QNetwork) -> torch.nn.ModuleList:
    """The ``train.critics − 1`` Q networks beside ``q``, each initialised from its own seed (torch's
    global RNG, and so everything a run draws from it, is the same as with one critic), with
    ``q``'s input normalisation."""
    out = torch.nn.ModuleList()
    for i in range(1, cfg.train.critics):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed + 104729 * i)
            critic = build_q(cfg, spec)
        critic.set_input_normalization(*(b.detach().double().numpy() for b in (q.obs_shift, q.obs_transform)))
        out.append(critic)
    return out


def _new_outcome(cfg: Config, spec: EnvSpec) -> tuple[OutcomeModel, torch.optim.Optimizer]:
    """The learned stage cost and termination heads (``model.learn``) and their optimiser, with the
    dynamics model's widths and learning rate. Initialised from their own seed: torch's global RNG
    (and so everything a run draws from it) is the same as without them."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + 7919)
        heads = OutcomeModel(spec.obs_dim, spec.act_dim, cfg.model.hidden, cfg.model.activation)
    heads = heads.to(getattr(torch, cfg.train.dtype))
    return heads, torch.optim.Adam(heads.parameters(), lr=cfg.model.lr, fused=True)


def _check_planning(cfg: Config, env) -> None:
    """``train.horizon > 1`` and ``train.rollout_td`` need a model to plan or roll with."""
    tc, learned = cfg.train, cfg.model.learn
    if tc.horizon > 1 and tc.mode != "online":
        raise ConfigError(f"expected train.horizon = 1 offline (nothing acts), got {tc.horizon}")
    if tc.horizon > 1 and not (learned or hasattr(env.unwrapped, "casadi_model")):
        raise ConfigError(
            f"expected model.learn = true with train.horizon = {tc.horizon} (the plan runs through the learned model; "
            f"{cfg.env.id} has no exact one), got false"
        )
    if tc.rollout_td and not learned:
        raise ConfigError(f"expected model.learn = true with train.rollout_td = {tc.rollout_td}, got false")
    if tc.target_horizon > 1 and not learned:
        raise ConfigError(f"expected model.learn = true with train.target_horizon = {tc.target_horizon}, got false")
    if tc.n_step > 1 and (tc.rollout_td or tc.target_horizon > 1):
        raise ConfigError(
            f"expected train.n_step = 1 with train.rollout_td = {tc.rollout_td} and train.target_horizon = "
            f"{tc.target_horizon} (their targets are one-step), got {tc.n_step}"
        )
    if tc.critics > 1 and (tc.target == "residual" or tc.target_horizon > 1):
        raise ConfigError(
            f"expected train.target semi, double or double_detached and train.target_horizon = 1 with train.critics = "
            f"{tc.critics}, got {tc.target!r} and {tc.target_horizon} (the other critics score a one-step argmin)"
        )
    if tc.target_horizon > 1 and tc.target == "residual":
        raise ConfigError(
            f"expected train.target semi, double or double_detached with train.target_horizon = "
            f"{tc.target_horizon}, got 'residual' (the gradient through an H-step min is not built)"
        )


def _check_offline_terms(cfg: Config) -> None:
    """``train.behaviour_weight`` and ``train.conservative_weight`` are offline terms; the behaviour
    penalty is in neither ``residual``'s envelope gradient nor the plans."""
    tc = cfg.train
    offline_only = {"behaviour_weight": tc.behaviour_weight, "conservative_weight": tc.conservative_weight}
    for name, v in offline_only.items():
        if v > 0 and tc.mode != "offline":
            raise ConfigError(f"expected train.mode = 'offline' with train.{name} = {v:g}, got {tc.mode!r}")
    if tc.behaviour_weight > 0 and (tc.target == "residual" or tc.horizon > 1 or tc.target_horizon > 1):
        raise ConfigError(
            f"expected train.target semi, double or double_detached and train.horizon = train.target_horizon = 1 "
            f"with train.behaviour_weight = {tc.behaviour_weight:g}, got {tc.target!r}, {tc.horizon} and "
            f"{tc.target_horizon} (the penalty is not in residual's envelope gradient nor in the plans)"
        )


def _prepare_data(cfg: Config, spec: EnvSpec, buffer: ReplayBuffer, q: QNetwork) -> None:
    """Offline: the dataset into the buffer and Q's input normalisation from its states. Online:
    check that the random-action phase can give that normalisation."""
    tc = cfg.train
    if tc.mode == "offline":
        if not tc.dataset:
            raise ConfigError("expected train.dataset (a Minari dataset path) in offline mode, got ''")
        data = load_minari(tc.dataset, spec.obs_dim, spec.act_dim, spec.env_id)
        check_dataset(data, spec.low, spec.high, tc.buffer_size, tc.dataset)  # actions in bounds, fits the buffer
        n = min(len(data["cost"]), tc.buffer_size)
        buffer.add_many(
            *(data[k][:n] for k in ("obs", "act")),
            data["cost"][:n] * tc.cost_scale,
            data["next_obs"][:n],
            data["terminated"][:n],
        )
        if cfg.network.obs_normalization != "none":
            q.set_input_normalization(*input_normalization(data["obs"][:n], cfg.network.obs_normalization))
    elif cfg.network.obs_normalization != "none" and tc.learning_starts < 2:
        raise ConfigError(
            f"expected train.learning_starts >= 2 with network.obs_normalization = "
            f"{cfg.network.obs_normalization!r} online (its statistics come from the states of the random-action "
            f"phase), got {tc.learning_starts}"
        )


def _build_solvers(
    cfg: Config, spec: EnvSpec, q: QNetwork, q_target: QNetwork
) -> tuple[ArgminLayer, ArgminLayer, ArgminLayer, Controller]:
    """The argmin layers of the TD targets (``online`` on Q, ``target`` on Q_target), the
    ``actor`` that collects data, and the ``evaluator``: the one place that builds them."""
    solver_kw = dict(
        solver=cfg.solver.plugin, max_iter=cfg.solver.max_iter, tol=cfg.solver.tol, newton=cfg.solver.newton
    )
    batched = dict(workers=cfg.solver.workers, backend=cfg.solver.backend)
    online = ArgminLayer(q, spec.low, spec.high, **batched, **solver_kw)
    target = ArgminLayer(q_target, spec.low, spec.high, **batched, **solver_kw)
    # warm-started at its last action (consecutive states are close)
    actor = ArgminLayer(
        q, spec.low, spec.high, grad_mode="none", workers=1, warm_start=cfg.solver.warm_start, **solver_kw
    )
    q_eval = copy.deepcopy(q).double()  # each evaluation loads Q's weights into it
    evaluator = Controller(q_eval, spec.low, spec.high, max_iter=cfg.solver.max_iter, env_id=spec.env_id)
    return online, target, actor, evaluator


def _step(st: TrainState, run: _Run) -> None:
    """One step of the loop: act and store (online), learn, then log, evaluate and checkpoint as due."""
    cfg, tc = st.cfg, st.cfg.train
    t_step = time.perf_counter()
    if tc.mode == "online":
        if st.step == tc.learning_starts and cfg.network.obs_normalization != "none":
            _fix_normalization(st)
        _step_env(st, _act(st, run.actor), run.logger)
    if tc.mode == "offline" or st.step >= tc.learning_starts:
        for _ in range(tc.updates_per_step):
            res = _learn(st, run)
            if st.model is not None:
                _fit_model(st)
            _record(st, res)
            _solver_alarm(st, res)
    st.step += 1
    run.bar.update(1)
    st.acc.setdefault("time/step_ms", []).append((time.perf_counter() - t_step) * 1e3)
    if st.step % tc.log_every == 0 and st.acc:
        run.logger.log(st.step, {k: float(np.mean(v)) for k, v in st.acc.items()})
        st.acc.clear()
    if st.step % tc.eval_every == 0 or st.step == tc.steps:
        _evaluate(st, run)
    if st.step % tc.checkpoint_every == 0 or st.step == tc.steps:
        _checkpoint(st, run.run_dir)


def _fix_normalization(st: TrainState) -> None:
    """Online: Q's input normalisation, fixed from the states of the random-action phase (before Q
    acts or learns)."""
    norm = input_normalization(st.buffer.obs[: len(st.buffer)], st.cfg.network.obs_normalization)
    average = [] if st.q_average is None else [st.q_average]
    for net in (st.q, st.q_target, *st.critics, *st.critic_targets, *average):
        net.set_input_normalization(*norm)


def _act(st: TrainState, actor: ArgminLayer) -> np.ndarray:
    """The action at ``st.obs``: uniform before ``learning_starts``, then the controller's (Q's
    argmin, or the plan of :func:`~qmpc.plan_actor.acting_horizon` steps once the model is fitted)
    plus Gaussian noise (white, or coloured along the episode: :mod:`qmpc.exploration`)."""
    tc, spec = st.cfg.train, st.spec
    if st.step < tc.learning_starts:
        return st.rng.uniform(spec.low, spec.high)
    with _timed(st.acc, "time/act_ms"):
        if _planning(st):
            u, info = st.plan_actor.act(st.policy, st.step, st.obs, new_episode=st.ep_len == 0)
            st.acc.setdefault("act/fallback", []).append(float(info["fallback"]))
        else:
            u = actor(torch.as_tensor(st.obs, dtype=torch.float64)[None])[0][0].numpy()
    noise = st.noise(st.rng, st.ep_len == 0)  # colour 0: st.rng.normal(size=act_dim), white
    a = u + tc.exploration_noise * (spec.high - spec.low) * noise
    return np.clip(a, spec.low, spec.high)


def _planning(st: TrainState) -> bool:
    """Whether the plan acts now: a horizon above 1 at this step, and a model fitted to plan with."""
    return (
        st.plan_actor is not None and acting_horizon(st.cfg.train, st.step) > 1 and (st.model is None or st.model_ready)
    )


def _step_env(st: TrainState, a: np.ndarray, logger: MetricsLogger) -> None:
    """Step the training environment, store the transition; at an episode's end log it and reset."""
    with _timed(st.acc, "time/env_ms"):
        next_obs, r, term, trunc, _ = st.env.step(a)
    st.buffer.add(st.obs, a, -float(r) * st.cfg.train.cost_scale, next_obs, term)
    st.obs, st.ep_return, st.ep_len = next_obs, st.ep_return + float(r), st.ep_len + 1
    if term or trunc:
        # at step + 1, like every row logged in this iteration (all before its checkpoint)
        logger.log(st.step + 1, {"train/episode_return": st.ep_return, "train/episode_length": st.ep_len})
        st.obs, _ = st.env.reset()
        st.ep_return, st.ep_len, st.episode = 0.0, 0, st.episode + 1


def _plan_targets(cfg: Config, st: TrainState) -> PlanTargets | None:
    """The H-step plan values of the TD targets (``train.target_horizon > 1``), else None."""
    tc = cfg.train
    if tc.target_horizon == 1:
        return None
    low, high = st.spec.low, st.spec.high
    return PlanTargets(
        st.q, st.q_target, st.model, st.outcome, low, high, tc.target_horizon, tc.gamma, termination=tc.plan_termination
    )


def _learn(st: TrainState, run: _Run) -> TDResult:
    """One TD update of Q on a batch from the buffer, then the Polyak step of the target network."""
    tc, acc = st.cfg.train, st.acc
    online, target = run.online, run.target
    next_values = run.plan_targets if st.model_ready and st.outcome_ready else None  # else V_1 until fitted
    batch = st.buffer.sample(tc.batch_size, st.rng)
    gamma: float | torch.Tensor = tc.gamma
    if tc.n_step > 1:  # the return of the next n transitions, the bootstrap after them
        batch, gamma = st.buffer.n_step(batch, tc.n_step, tc.gamma)
    mask = None
    if tc.rollout_td and st.model_ready:  # and Q at the model's predictions k = 1 … K steps ahead
        rolled, rolled_mask = model_rolled_batch(st.buffer, st.model, batch.index.numpy(), tc.rollout_td)
        batch = Batch(*(torch.cat(pair) for pair in zip(batch, rolled, strict=True)))
        mask = torch.cat([torch.ones(tc.batch_size, dtype=torch.bool), rolled_mask])
        acc.setdefault("train/rollout_valid", []).append(float(rolled_mask.float().mean()))
    with _timed(acc, "time/td_loss_ms"):  # the TD-target solves and the forward pass
        w0 = st.buffer.warm_starts(batch.index, st.spec.low, st.spec.high) if st.cfg.solver.warm_start else None
        if w0 is not None and next_values is None:  # the argmin layers start from the plan's first action
            w0 = w0[:, : st.spec.act_dim]
        score = st.behaviour is not None  # the regularised argmin, scored by Q_target alone
        bounds = st.buffer.value_bounds(tc.gamma) if tc.target_bounds else None
        res = td_loss(
            st.q,
            st.q_target,
            online,
            target,
            batch,
            gamma,
            tc.target,
            w0,
            mask,
            next_values,
            score,
            st.critic_targets,
            bounds,
        )
        if bounds is not None:
            acc.setdefault("train/target_clamped_frac", []).append(res.clamped_frac)
        st.buffer.store_argmins(batch.index, res.next_argmin, res.next_ok)
    loss = res.loss + critic_losses(st.critics, batch, res)
    if tc.conservative_weight > 0:
        with _timed(acc, "time/conservative_ms"):
            gap, gap_fail = conservative_gap(st.q, online, batch)
        loss = loss + tc.conservative_weight * gap
        acc.setdefault("train/conservative_gap", []).append(float(gap.detach()))
        acc.setdefault("solver/conservative_fail_frac", []).append(gap_fail)
    with _timed(acc, "time/update_ms"):  # backward (through the solves), Adam, Polyak
        st.optimizer.zero_grad()
        loss.backward()
        for net in (st.q, *st.critics):  # each critic's gradient clipped on its own
            torch.nn.utils.clip_grad_norm_(net.parameters(), tc.grad_clip)
        st.optimizer.step()
        st.scheduler.step()
        with torch.no_grad():  # one fused call over every tensor (measured bit-identical to a loop of lerp_)
            torch._foreach_lerp_(
                [*st.q_target.parameters(), *st.critic_targets.parameters()],
                [*st.q.parameters(), *st.critics.parameters()],
                tc.tau,
            )
        st.update_average()
    return res


def _fit_model(st: TrainState) -> None:
    """The dynamics model's gradient steps of one update, on batches of its own RNG, and the
    learned stage cost and termination heads' (``model.head_updates_per_step``) on the same batches."""
    t_model = time.perf_counter()
    mc, buffer, model, heads = st.cfg.model, st.buffer, st.model, st.outcome
    n = len(buffer)
    if not st.model_ready:  # normalisation from the data in the buffer when learning starts
        model.fit_normalization(*(torch.from_numpy(a[:n]) for a in (buffer.obs, buffer.next_obs)))
        st.model_ready = True
    if heads is not None and not st.outcome_ready:  # (also: resumed from a checkpoint without heads)
        heads.fit_normalization(*(torch.from_numpy(a[:n]).to(heads.x_shift.dtype) for a in (buffer.obs, buffer.cost)))
        st.outcome_ready = True
    grad_clip = st.cfg.train.grad_clip
    head_updates = mc.head_updates_per_step if heads is not None else 0
    for k in range(max(mc.updates_per_step, head_updates)):
        mb = buffer.sample(mc.batch_size, st.model_rng)
        xs = [t.to(model.x_shift.dtype) for t in (mb.obs, mb.act, mb.next_obs)]
        if k < mc.updates_per_step:
            m_loss = model.loss(*xs)
            st.model_optimizer.zero_grad()
            m_loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            st.model_optimizer.step()
        if k < head_updates:
            dt = heads.x_shift.dtype
            c_loss, t_loss = heads.losses(*(t.to(dt) for t in (*xs, mb.cost, mb.terminated)))
            st.outcome_optimizer.zero_grad()
            (c_loss + t_loss).backward()
            torch.nn.utils.clip_grad_norm_(heads.parameters(), grad_clip)
            st.outcome_optimizer.step()
    st.acc.setdefault("model/loss", []).append(float(m_loss.detach()))
    if heads is not None:
        st.acc.setdefault("model/cost_loss", []).append(float(c_loss.detach()))
        st.acc.setdefault("model/termination_loss", []).append(float(t_loss.detach()))
    st.acc.setdefault("time/model_ms", []).append((time.perf_counter() - t_model) * 1e3)


def _record(st: TrainState, res: TDResult) -> None:
    """Count an update's solves and add its metrics to the logging window."""
    st.fails += res.fail_frac * st.cfg.train.batch_size
    st.solves += st.cfg.train.batch_size
    for k, v in (
        ("train/td_loss", float(res.loss.detach())),
        ("train/q_mean", res.q_mean),
        ("train/target_mean", res.target_mean),
        ("solver/fail_frac", res.fail_frac),
        ("solver/solve_ms", res.solve_ms),
    ):
        st.acc.setdefault(k, []).append(float(v))
    st.solve_window.add(res.fail_frac, res.status, res.message)


def _solver_alarm(st: TrainState, res: TDResult) -> None:
    """Stop with a :class:`SolverError` when more than ``solver.max_fail_frac`` of the TD-target
    solves of the last ``solver.fail_window`` updates failed. Raised before anything of this step
    is written: the last checkpoint stays as it was."""
    window, sc = st.solve_window, st.cfg.solver
    if not window.full or window.fail_frac() <= sc.max_fail_frac:
        return
    counts = window.status_counts()
    last = ""
    if res.status is not None and res.kkt_residual is not None:
        bad = ~Status.ok(res.status)
        worst = float(np.max(res.kkt_residual[bad])) if bad.any() else float("nan")
        last = f"; last update: {int(bad.sum())} of {bad.size} failed, KKT residual up to {worst:.3g}"
    if window.message:
        last += f"; last solver message: {window.message}"
    raise SolverError(
        f"expected at most {sc.max_fail_frac:g} of the TD-target solves to fail (solver.max_fail_frac), got "
        f"{window.fail_frac():.3f} over the last {len(window)} updates (solver.fail_window) at step {st.step + 1}: "
        f"{', '.join(f'{k} {n}' for k, n in counts.items())} of {sum(counts.values())} samples{last}. Training "
        "stopped; the last checkpoint is intact (resume it with --set solver.max_fail_frac=1.0 to go on regardless)"
    )


def _evaluate(st: TrainState, run: _Run) -> None:
    """Evaluate the greedy controller of Q as it is now (its average, ``train.policy_average``); log it
    and redraw the learning curve."""
    cfg, tc = st.cfg, st.cfg.train
    t_eval = time.perf_counter()
    controller = run.evaluator
    if _planning(st):  # at the horizon the run acts with, through the model as it is now
        controller = plan_controller(tc, st.policy(), acting_horizon(tc, st.step), run.eval_env)
    else:  # (inside the behaviour penalty, whose π_β is fixed)
        getattr(controller.q, "q", controller.q).load_state_dict(st.policy_q.state_dict())
        controller = run.batch_evaluator or controller
    ev = evaluate(controller, run.eval_env, tc.eval_episodes, cfg.seed + 10_000, tc.gamma, tc.cost_scale, run.eval_envs)
    eval_ms = (time.perf_counter() - t_eval) * 1e3
    st.eval_steps.append(st.step)
    st.eval_returns.append(ev.ret)
    run.logger.log(
        st.step,
        {
            "eval/return": ev.ret,
            "eval/length": ev.length,
            "eval/fallback_frac": ev.fallback_frac,
            "eval/q_bias": ev.q_bias,
            "time/eval_ms": eval_ms,
        },
    )
    run.bar.set_postfix(eval_return=f"{ev.ret:.1f}", fail=f"{st.fails / max(1, st.solves):.3f}")
    plot_learning_curve(run.run_dir)


def _checkpoint(st: TrainState, run_dir: Path) -> None:
    """``checkpoint.pt`` (all of :meth:`TrainState.state_dict`) and ``policy.pt`` (what a controller
    needs: small, to ship)."""
    full = st.state_dict()
    save_checkpoint(run_dir / "checkpoint.pt", full)
    save_checkpoint(run_dir / "policy.pt", policy_of(full))


@contextmanager
def _timed(acc: dict[str, list[float]], tag: str):
    """Add the wall time of the block, in milliseconds, to ``acc[tag]`` (logged as ``time/…_ms``)."""
    t0 = time.perf_counter()
    yield
    acc.setdefault(tag, []).append((time.perf_counter() - t0) * 1e3)
