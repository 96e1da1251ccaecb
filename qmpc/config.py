"""Run configuration: dataclasses, loaded strictly from TOML launch files.

Every field has a docstring; unknown keys, wrong types and impossible values are
:class:`~qmpc.errors.ConfigError` naming the key. ``--set section.key=value`` overrides a field
(the value is read as a TOML literal, else as a string).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qmpc.errors import ConfigError
from qmpc.networks.registry import ARCH_NAMES

__all__ = [
    "RESUMABLE_KEYS",
    "Config",
    "EnvConfig",
    "ModelConfig",
    "NetworkConfig",
    "SolverConfig",
    "TrainConfig",
    "apply_overrides",
    "check_resumed_launch",
    "check_seed",
    "config_from_dict",
    "config_to_toml",
    "load_config",
    "resumed_config",
]


@dataclass
class EnvConfig:
    id: str = "qmpc/PointMass-v0"
    """gymnasium environment id (any MuJoCo task with a Box action space, or a ``qmpc/…`` task)."""


@dataclass
class NetworkConfig:
    arch: str = field(default="QuadraticQ", metadata={"choices": ARCH_NAMES})
    """Q network architecture: ``QuadraticQ`` (convex, NAF), ``PICNN`` (convex in u), ``MLPQ`` (general)."""
    hidden: list[int] = field(default_factory=lambda: [64, 64], metadata={"item_min": 1})
    """Hidden layer widths (each >= 1)."""
    activation: str = field(default="tanh", metadata={"choices": ("tanh", "softplus", "sigmoid", "silu")})
    """Smooth activation of the state path."""
    action_curvature: float = field(default=0.01, metadata={"min": 0.0})
    """``m`` of the ``½ m ‖u‖²`` added to PICNN and MLPQ (ignored by QuadraticQ)."""
    state_dependent_curvature: bool = True
    """QuadraticQ only: the curvature in u depends on x (False: a constant matrix)."""
    layer_norm: bool = False
    """PICNN only: layer normalisation (learned scale and shift) of each state-path layer before
    its activation; Q stays convex in u (refused with the other architectures)."""
    obs_normalization: str = field(default="none", metadata={"choices": ("none", "standardize", "whiten")})
    """Fixed input normalisation of the states: ``standardize`` (per-dimension mean and std) or
    ``whiten`` (mean and covariance; decorrelates, e.g., positions and velocities). Its statistics
    come from the offline dataset, or online from the states of the random-action phase
    (``train.learning_starts``), fixed from then on."""


@dataclass
class SolverConfig:
    plugin: str = field(default="sqpmethod", metadata={"choices": ("sqpmethod", "ipopt")})
    """CasADi NLP plugin."""
    max_iter: int = field(default=50, metadata={"min": 1})
    """Iteration limit of each solve; a sample that hits it is retried cold, then masked."""
    tol: float = field(default=1e-8, metadata={"min_exclusive": 0.0})
    """The plugin's convergence tolerance."""
    workers: int = field(default=0, metadata={"min": 0})
    """Threads (or Ray actors) that split each batch (0: up to 4, one per core)."""
    backend: str = field(default="threads", metadata={"choices": ("threads", "ray")})
    """Where the parts of a TD-target batch are solved: ``threads`` of the training process, or
    ``ray`` actors (``pip install -e ".[ray]"``; a local Ray, or the cluster of ``$RAY_ADDRESS``):
    the same results, see :mod:`qmpc.distributed`."""
    warm_start: bool = True
    """Start each TD-target solve at the argmin last found at the same ``x⁺`` (kept with the
    replay buffer and its checkpoint); the target network moves slowly, so it is nearly optimal."""
    newton: bool = True
    """Solve the TD targets' and the actor's ``argmin_u Q`` by the batched projected Newton first
    (PICNN; every solution is certified by the CasADi twin, the plugin takes those that fail).
    Measured on HalfCheetah-sized batches of 256: ~20 ms against ~2.3 s for one plugin call per
    sample."""
    max_fail_frac: float = field(default=0.5, metadata={"min": 0.0, "max": 1.0})
    """The solver alarm: training stops with a :class:`~qmpc.errors.SolverError` (naming the
    fraction and the solves' statuses) when more than this fraction of the TD-target solves failed
    (masked samples) over the last ``fail_window`` updates; 1.0 never stops. Nothing is written at
    the alarm: the last checkpoint stays, and ``--resume --set`` may raise this value."""
    fail_window: int = field(default=100, metadata={"min": 1})
    """Consecutive TD updates over which ``max_fail_frac`` is measured (kept by the checkpoint:
    a resumed run counts on); the alarm waits until this many updates have run."""


@dataclass
class ModelConfig:
    learn: bool = False
    """Also fit a dynamics model ``x⁺ = f(x, u)`` (an MLP with a CasADi twin) on the same batches,
    for MPC horizons > 1 (``qmpc run --horizon 10 --model learned``)."""
    hidden: list[int] = field(default_factory=lambda: [64, 64], metadata={"item_min": 1})
    """Hidden layer widths of the dynamics model (each >= 1)."""
    activation: str = field(default="silu", metadata={"choices": ("tanh", "softplus", "sigmoid", "silu")})
    """Smooth activation of the dynamics model."""
    lr: float = field(default=1e-3, metadata={"min_exclusive": 0.0})
    """Adam learning rate of the dynamics model."""
    updates_per_step: int = field(default=4, metadata={"min": 1})
    """Gradient steps of the model per training step, each on its own batch (drawn with a
    separate RNG, so the model never changes what Q trains on). Measured on
    InvertedDoublePendulum-v5: one step per environment step left a 24 % one-step error and
    H = 3 MPC fell after ~80 steps; 20k more steps on the same buffer: 15 %, ~5× longer."""
    head_updates_per_step: int = field(default=4, metadata={"min": 1})
    """Gradient steps of the learned stage cost and termination heads per training step, on the
    first of the model's batches (more than ``updates_per_step``: on further batches of the same
    RNG). Measured on HalfCheetah-v5 (20k steps, seed 0, the run's buffer replayed): one step
    instead of four raised the cost head's held-out error from 4.7 % to 5.5 % and left the H = 3
    plans' returns as they were (1172 and 1097 against 1031 and 1140), at 1.2 of the 8 ms that
    4 + 4 steps took; fewer dynamics steps did cost returns (1 step: 521 and 456)."""
    batch_size: int = field(default=256, metadata={"min": 1})
    """Transitions per gradient step of the model."""


@dataclass
class TrainConfig:
    mode: str = field(default="online", metadata={"choices": ("online", "offline")})
    """``online``: the controller collects its own data; ``offline``: train from ``dataset`` only."""
    dataset: str = ""
    """Offline mode: path of a Minari dataset written by ``qmpc collect`` (or any Minari dataset)."""
    steps: int = field(default=20000, metadata={"min": 1})
    """Online: environment steps. Offline: gradient steps."""
    batch_size: int = field(default=256, metadata={"min": 1})
    """Transitions per gradient step."""
    lr: float = field(default=1e-3, metadata={"min_exclusive": 0.0})
    """Adam learning rate."""
    lr_schedule: str = field(default="constant", metadata={"choices": ("constant", "linear")})
    """``linear``: decay the learning rate linearly to zero over ``steps``."""
    gamma: float = field(default=0.99, metadata={"min_exclusive": 0.0, "max": 1.0})
    """Discount ``γ``."""
    tau: float = field(default=0.005, metadata={"min_exclusive": 0.0, "max": 1.0})
    """Polyak rate of the target network: ``θ' ← (1 − τ) θ' + τ θ``."""
    policy_average: float = field(default=0.0, metadata={"min": 0.0, "max": 1.0})
    """Rate ``r`` of an average of Q's weights that the evaluations, ``policy.pt`` and every
    controller built from the run use, a planning actor's (``horizon > 1``) included; the network
    trained, its TD targets and the greedy actor that explores are unchanged. After ``t`` updates
    the average moves towards Q by ``max(r, 1/(t+1))``: the mean of the first ``1/r`` iterates,
    then an exponential average over about ``1/r`` updates. It smooths the argmin policy of a Q
    that swings between updates (offline, on data that covers little of the state space). 0: Q."""
    target: str = field(default="semi", metadata={"choices": ("semi", "residual", "double", "double_detached")})
    """TD target mode: ``semi`` (detached target network), ``residual`` (through the min),
    ``double`` (online argmin scored by the target network, through ``u*``), ``double_detached``
    (the same target with ``u*`` detached, as Double DQN)."""
    critics: int = field(default=1, metadata={"min": 1})
    """Q networks trained side by side (clipped double Q for costs): the TD target's bootstrap is
    the *largest* of their target networks' values at the argmin, ``max_i Q'_i(x⁺, u*)`` (with
    ``u*`` the first network's argmin, as TD3 scores its actor's action), and each network regresses
    onto it. Only the first acts, is evaluated and is shipped in ``policy.pt``; the others cost one
    forward each. 1: one network. More than 1: ``target`` semi, double or double_detached and
    ``target_horizon = 1``."""
    learning_starts: int = field(default=1000, metadata={"min": 0})
    """Online: random actions for this many steps before learning starts."""
    updates_per_step: int = field(default=1, metadata={"min": 1})
    """Online: gradient steps per environment step."""
    exploration_noise: float = field(default=0.1, metadata={"min": 0.0})
    """Online: std of the Gaussian added to the controller's action, as a fraction of the action range."""
    exploration_color: float = field(default=0.0, metadata={"min": 0.0, "max": 2.0})
    """Online: the exploration noise's colour, the exponent β of its power spectrum ``1/f^β``
    along an episode (:mod:`qmpc.exploration`): 0 white (independent draws each step), 1 pink,
    2 red (Brownian). A coloured sequence is drawn at each episode's start, as long as the
    environment's time limit (1000 steps without one); every sample has the same std whatever β."""
    buffer_size: int = field(default=200000, metadata={"min": 1})
    """Replay buffer capacity (transitions)."""
    grad_clip: float = field(default=10.0, metadata={"min_exclusive": 0.0})
    """Max gradient norm (of Q, and of the dynamics model when it is learned)."""
    cost_scale: float = field(default=1.0, metadata={"min_exclusive": 0.0})
    """Costs are multiplied by this before the TD target (``c = −reward × cost_scale``)."""
    eval_every: int = field(default=2000, metadata={"min": 1})
    """Evaluate the greedy controller every this many steps."""
    eval_episodes: int = field(default=5, metadata={"min": 1})
    """Episodes per evaluation."""
    eval_envs: int = field(default=1, metadata={"min": 1})
    """Evaluation episodes run at once, with one batched solve of their greedy actions a step
    (:class:`~qmpc.controller.BatchController`); the same episodes and reset seeds, the actions the
    controller's to the solvers' tolerance. 1: the controller, one episode after another. Only for
    evaluations of the greedy controller (``horizon`` 1): plans always run one episode at a time.
    Measured with the shipped controllers, 10 episodes, on 2 busy cores: HalfCheetah-v5 15.2 s at 1,
    3.8 s at 10 (returns 4820.7 and 4828.5); Hopper-v5 3.5 and 1.6 s. The actions differ by ≤ 2e-7
    (Hopper, one episode), but where an episode can fall such differences grow: Hopper's mean
    return was 600.0 at 1 and 727.5 at 10 (compare evaluations at one setting)."""
    checkpoint_every: int = field(default=2000, metadata={"min": 1})
    """Write a checkpoint every this many steps (and at the end)."""
    log_every: int = field(default=100, metadata={"min": 1})
    """Write training metrics every this many steps."""
    dtype: str = field(default="float32", metadata={"choices": ("float32", "float64")})
    """Network dtype (solves and sensitivities always run in float64)."""
    horizon: int = field(default=1, metadata={"min": 1})
    """Online: the horizon ``H`` the controller acts and is evaluated with. 1: the greedy argmin of
    Q; ``H > 1``: a plan of ``H`` actions through the learned model (``model.learn``; the task's
    exact model for qmpc tasks) with its stage cost (symbolic where the task has one, else learned)
    and learned termination, Q the cost-to-go at its last state, so that the replay buffer holds
    the planner's own data. ``qmpc run`` plans at this horizon by default."""
    horizon_warmup: int = field(default=0, metadata={"min": 0})
    """Online, ``horizon > 1``: steps after ``learning_starts`` over which the acting horizon grows
    linearly from 1 to ``horizon`` (TD-MPC's schedule); 0: the full horizon from the start."""
    plan_refresh: int = field(default=10, metadata={"min": 1})
    """Online, ``horizon > 1``: steps between rebuilds of the acting plan from the current Q, model
    and heads (a rebuild takes ~60 ms; in between the plan uses them as they were at its last
    rebuild, and they are saved with it, so that a resumed run plans exactly as the uninterrupted one)."""
    trust_region: float = field(default=0.0, metadata={"min": 0.0})
    """Plans (``horizon > 1`` here, and ``qmpc run --horizon H`` on this run's checkpoints by
    default): every action of a plan stays within this fraction of the action range of the step's
    greedy plan (Q's argmin followed along the model), so that a plan cannot steer to states where
    Q is wrong (:class:`~qmpc.controller.Controller`'s ``trust_region``). 0: none."""
    plan_termination: bool = True
    """Plans (acting and evaluating at ``horizon > 1``, ``target_horizon > 1``, and ``qmpc run`` on
    this run's checkpoints by default): the learned termination weights each stage and Q by the
    predicted probability of still being alive, so that a plan that ends the episode is costly.
    false: the plans ignore termination (an ablation; the heads are still trained)."""
    rollout_td: int = field(default=0, metadata={"min": 0})
    """Steps ``K`` of the model-rolled TD loss (0: off). With ``K > 0`` each update also fits Q at the
    states the learned model predicts ``k = 1 … K`` steps ahead of the batch's states under the
    buffer's own actions (the states a plan queries Q at), against the TD targets of the real
    transitions there; chains that cross an episode's end are masked. Needs ``model.learn``."""
    target_horizon: int = field(default=1, metadata={"min": 1})
    """The TD target's horizon ``H``: ``y = c + γ (1 − d) V_H(x⁺)`` with ``V_H`` the value of the best
    ``H``-step plan through the learned model, its stage cost and termination heads, the target
    network the cost-to-go at its end (:mod:`qmpc.plan_targets`); 1: ``min_v Q_target(x⁺, v)``.
    ``H > 1`` needs ``model.learn``; ``target``: ``semi``, ``double`` (Q's plan scored by the
    target network, the gradient through the plan) or ``double_detached`` (without it)."""
    n_step: int = field(default=1, metadata={"min": 1})
    """The TD target's number of real transitions ``n``: ``y = Σ_{k<m} γᵏ c_k + γᵐ (1 − d) min_v
    Q_target(x_m, v)``, ``m ≤ n`` the transitions that follow in the sample's episode (fewer at its
    end, where it terminated or was cut, or at the buffer's newest transition); 1: the one-step
    target. Off-policy, the sum is of the buffer's own actions, not of Q's argmins (no correction):
    a bias that grows with ``n`` and with how far the behaviour was from greedy. ``n > 1`` with
    ``rollout_td`` or ``target_horizon > 1`` is refused."""
    target_bounds: bool = False
    """Clamp each TD target's bootstrap value to the discounted range the replay data allows,
    ``[min(0, c_min) / (1 − γ), max(0, c_max) / (1 − γ)]``, ``c_min, c_max`` the smallest and largest
    cost the buffer has held (in Q's units): the TD fixed point on this data lies inside, so a value
    outside is Q's own extrapolation fed back into its targets (how Q diverged on Walker2d-v5 trained
    at H = 3 with two updates a step). ``train/target_clamped_frac``: the fraction of targets it
    moved. false: no clamp (every launch file measured before it was added)."""
    behaviour_weight: float = field(default=0.0, metadata={"min": 0.0})
    """Offline: ``β`` of the behaviour-regularised argmin (:mod:`qmpc.networks.behaviour`). The TD
    targets' and the controller's action is ``argmin_u Q(x, u) + ½ β ‖(u − π_β(x)) / s‖²`` (``s``
    half the action range, ``π_β`` cloned from the dataset before training and saved with the
    checkpoint); the targets score it with Q alone, ``Q_target(x⁺, u*)`` (as TD3+BC does its
    actor's action). 0: the plain argmin. Not with ``target = "residual"`` or plans (``horizon``,
    ``target_horizon`` > 1)."""
    behaviour_scale: str = field(default="range", metadata={"choices": ("range", "residual", "value")})
    """Offline: ``s`` of the behaviour penalty, per action dimension: ``range``, half the action
    range; ``residual``, the root mean square of the dataset's actions around ``π_β`` (at least
    1/100 of half the range), which makes the penalty ``β`` times the negative log-likelihood of a
    Gaussian behaviour policy: strong on narrow data, weak on data that covers the box; ``value``,
    the residual scale over ``√V``, ``V`` the dataset's mean ``|cost-to-go|`` (Monte Carlo to each
    episode's end, in Q's units: ``cost_scale``, ``gamma``), so that ``β`` is relative to the size
    of Q on that data, as TD3+BC normalises its λ by the mean ``|Q|``: one ``β`` for tasks and
    datasets whose costs differ in size."""
    behaviour_steps: int = field(default=5000, metadata={"min": 1})
    """Adam steps of ``π_β``'s least-squares fit to the dataset's actions (``batch_size``, ``lr``)."""
    behaviour_hidden: list[int] = field(default_factory=lambda: [64, 64], metadata={"item_min": 1})
    """Hidden widths of ``π_β`` (SiLU; a tanh squashes its output into the action box)."""
    conservative_weight: float = field(default=0.0, metadata={"min": 0.0})
    """Offline: ``α`` of the conservative term added to the TD loss, ``α · mean(Q(x, u) − Q(x, ũ(x)))``
    over the batch's data actions ``u`` and the controller's action ``ũ(x)`` at the same states (the
    regularised argmin, detached): Q pushed up where the controller would act and down where the
    data acted (CQL's term, with the argmin as its sampled action). Costs one more batched solve
    per update. 0: off."""
    torch_threads: int = field(default=1, metadata={"min": 1})
    """torch's intra-op threads. The networks are small: measured on 2 cores with three runs side
    by side, the default 2 threads made each torch backward 30x slower (spinning threads contend
    with the solver's workers and the other runs) and the whole run 6x slower than 1 thread."""


SEED_LIMIT = 2**32
"""Seeds are ``0 <= seed < 2**32``, a range every consumer accepts: numpy's ``default_rng`` and
gymnasium's ``reset`` refuse negative seeds, ``torch.manual_seed`` those of 2**64 and more, a TOML
integer (``config.toml``) is below 2**63, numpy's legacy ``RandomState`` below 2**32; the seeds
derived from it (``seed + 10000 + episode``) stay well within them."""


def check_seed(seed: Any, what: str = "seed") -> int:
    """``seed`` if it is an int in ``[0, 2**32)``, else a :class:`ConfigError` naming ``what``."""
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < SEED_LIMIT:
        raise ConfigError(f"expected {what} to be an integer in [0, 2**32), got {seed!r}")
    return seed


@dataclass
class Config:
    seed: int = 0
    """Seed of torch, numpy and the environments (``0 <= seed < 2**32``)."""
    run_dir: str = ""
    """Run directory (empty: ``runs/<env>-<target>-seed<seed>``)."""
    env: EnvConfig = field(default_factory=EnvConfig)
    """The task."""
    network: NetworkConfig = field(default_factory=NetworkConfig)
    """The Q network."""
    solver: SolverConfig = field(default_factory=SolverConfig)
    """The CasADi solver of the min."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The training loop."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The learned dynamics model (optional)."""

    def __post_init__(self) -> None:
        check_seed(self.seed)

    def resolved_run_dir(self) -> Path:
        if self.run_dir:
            return Path(self.run_dir)
        name = self.env.id.replace("/", "-")
        return Path("runs") / f"{name}-{self.train.target}-seed{self.seed}"


def _check_value(key: str, value: Any, tp: Any, meta: dict) -> Any:
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        (inner,) = set(typing.get_args(tp)) - {Ellipsis}
        if not isinstance(value, list | tuple):
            raise ConfigError(f"expected {key} to be a list, got {value!r}")
        item_meta = {"min": meta["item_min"]} if "item_min" in meta else {}
        return [_check_value(f"{key}[{i}]", v, inner, item_meta) for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"unsupported config type for {key}")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"expected {key} to be true or false, got {value!r}")
    elif tp is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"expected {key} to be an integer, got {value!r}")
    elif tp is float:
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise ConfigError(f"expected {key} to be a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"expected {key} to be a finite number, got {value!r}")
    elif tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"expected {key} to be a string, got {value!r}")
    if "choices" in meta and value not in meta["choices"]:
        raise ConfigError(f"expected {key} in {meta['choices']}, got {value!r}")
    if "min" in meta and value < meta["min"]:
        raise ConfigError(f"expected {key} >= {meta['min']}, got {value!r}")
    if "min_exclusive" in meta and value <= meta["min_exclusive"]:
        raise ConfigError(f"expected {key} > {meta['min_exclusive']}, got {value!r}")
    if "max" in meta and value > meta["max"]:
        raise ConfigError(f"expected {key} <= {meta['max']}, got {value!r}")
    return value


def _build(cls: type, data: dict, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"expected a table for {prefix.rstrip('.') or 'the config'}, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown config key {prefix}{unknown[0]!s}: expected one of {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _check_value(f"{prefix}{name}", value, tp, dict(fields[name].metadata))
    return cls(**kwargs)


def config_from_dict(data: dict) -> Config:
    """A :class:`Config` from nested dicts; missing fields take their defaults."""
    return _build(Config, data, "")


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``section.key=value`` overrides to a nested dict (values read as TOML literals)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"expected --set key=value, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        parts = key.strip().split(".")
        d = data
        for p in parts[:-1]:
            d = d.setdefault(p, {})
            if not isinstance(d, dict):
                raise ConfigError(f"expected {key} to name a field inside a table, got a value at {p!r}")
        d[parts[-1]] = value
    return data


RESUMABLE_KEYS = (
    "run_dir",
    "train.steps",
    "train.eval_every",
    "train.eval_episodes",
    "train.eval_envs",
    "train.checkpoint_every",
    "train.log_every",
    "solver.max_fail_frac",
)
"""Fields that ``--set`` may change when a run resumes (where it lives, how long it trains, how
often it logs, evaluates and checkpoints, and the solver alarm's threshold, e.g. to go on past
an alarm); any other field must keep the checkpoint's value."""


def resumed_config(saved: dict, overrides: list[str]) -> Config:
    """The config of a resumed run: the checkpoint's ``saved`` config with the ``key=value``
    ``overrides`` of :data:`RESUMABLE_KEYS` applied. An override of any other key that changes
    its value is a :class:`ConfigError` naming the key (one that repeats the value is fine)."""
    data = apply_overrides(copy.deepcopy(saved), list(overrides))
    cfg = config_from_dict(data)  # unknown keys and bad values first
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if key not in RESUMABLE_KEYS and _lookup(data, key) != _lookup(saved, key):
            raise ConfigError(
                f"expected only {', '.join(RESUMABLE_KEYS)} to change on --resume, got {key} "
                f"({_lookup(saved, key)!r} in the checkpoint -> {_lookup(data, key)!r}); start a new run to change it"
            )
    return cfg


def check_resumed_launch(launch: Config, run: Config, where: str | Path) -> None:
    """On ``--resume``: the launch file's config ``launch`` (after ``--set``) must be the config of
    the ``run`` it resumes (:func:`resumed_config`; the run directory ``where``), but for
    :data:`RESUMABLE_KEYS`, which take the run's values unless ``--set`` changes them (a run
    extended by ``--set train.steps`` resumes with its launch file alone). Any other field that
    differs (another task, network, learning rate…) is a :class:`ConfigError` naming each, with
    both values: resuming would otherwise go on with the run's config and ignore the file."""
    a, b = _flat(dataclasses.asdict(launch)), _flat(dataclasses.asdict(run))
    differ = [k for k in a.keys() | b.keys() if k not in RESUMABLE_KEYS and a.get(k) != b.get(k)]
    if differ:
        order = list(a) + [k for k in b if k not in a]
        diffs = "; ".join(
            f"{k} = {toml_value(a.get(k))} in the launch file, {toml_value(b.get(k))} in the run"
            for k in sorted(differ, key=order.index)
        )
        raise ConfigError(
            f"expected the launch file of the run in {where} on --resume (only {', '.join(RESUMABLE_KEYS)} may "
            f"differ), got {diffs}: resume with the run's own launch file (its config.toml), or start a new run "
            "in another run_dir"
        )


def _flat(data: dict, prefix: str = "") -> dict[str, Any]:
    """A nested config dict as ``{"section.key": value}``."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _lookup(data: dict, key: str) -> Any:
    for p in key.split("."):
        if not isinstance(data, dict) or p not in data:
            return None
        data = data[p]
    return float(data) if isinstance(data, int | float) and not isinstance(data, bool) else data


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a TOML launch file strictly (see module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"expected a launch file, got no file at {path}")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"expected valid TOML in {path}, got: {e}") from None
    return config_from_dict(apply_overrides(data, overrides or []))


def toml_value(v: Any) -> str:
    """``v`` as a TOML literal (the launch files' and ``--set``'s syntax)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list | tuple):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return repr(v)


def config_to_toml(cfg: Config) -> str:
    """The resolved config as TOML (every field explicit), as saved next to the checkpoint."""
    lines = []
    top = dataclasses.asdict(cfg)
    for k, v in top.items():
        if not isinstance(v, dict):
            lines.append(f"{k} = {toml_value(v)}")
    for k, v in top.items():
        if isinstance(v, dict):
            lines.append(f"\n[{k}]")
            lines += [f"{kk} = {toml_value(vv)}" for kk, vv in v.items()]
    return "\n".join(lines) + "\n"
