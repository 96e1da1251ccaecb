"""The field's offline datasets, made locally the way the field makes them (D4RL, Minari's ``mujoco/*``).

Five kinds per task (:data:`KINDS`), each a Minari dataset with id ``qmpc/<task>/<kind>-v0`` in
Minari's datasets root (``$MINARI_DATASETS_PATH``, else ``~/.minari/datasets``), so that
``train.dataset = "qmpc/invertedpendulum/medium-v0"`` and ``minari.load_dataset`` both find it:

* ``random``: uniform random actions.
* ``medium``: a policy at about a third of the expert's normalised return: a qmpc training run of
  the task's launch file (with the seed the expert was trained with), stopped at the first
  evaluation whose normalised return is in :data:`MEDIUM_BAND` (else the evaluation closest to a
  third), acting with the launch file's exploration noise. Seed 0 of a task with a recipe rolls
  out the policy that run chose, shipped in ``models/medium/`` (:attr:`Recipe.medium`: the same
  dataset on every machine, in minutes).
* ``medium-replay``: the replay buffer of that training run up to the medium policy (seed 0 of a
  recipe: a run's buffer shipped in ``models/medium/``, :attr:`Recipe.medium_replay`).
* ``expert``: the task's shipped controller (``models/<task>.pt``) with the same noise.
* ``medium-expert``: the ``medium`` and ``expert`` episodes together.

Every dataset carries the task's reference returns in its metadata (``ref_min_score``: a uniform
random policy, ``ref_max_score``: the expert controller without noise, 100 episodes each), for the
normalised score ``100 · (R − R_random) / (R_expert − R_random)`` (:func:`normalized_score`).
Everything is seeded: the same command makes the same dataset. The medium run and the reference
returns are kept under ``<root>/qmpc/.work/<task>/`` and reused by the kinds that need them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qmpc.data import (
    BatchPolicy,
    Episode,
    atomic_write,
    batch_rollouts,
    dataset_metadata,
    episode_order,
    load_episodes,
    minari_root,
    rollouts,
    save_episodes,
    write_minari,
)
from qmpc.errors import ConfigError, InputError

__all__ = [
    "KINDS",
    "MEDIUM_BAND",
    "RECIPES",
    "Recipe",
    "buffer_episodes",
    "checkpoint_batch_policy",
    "checkpoint_policy",
    "dataset_id",
    "describe_datasets",
    "make_dataset",
    "normalized_score",
    "reference_returns",
    "ship_medium_replay",
]

KINDS = ("random", "medium", "medium-replay", "expert", "medium-expert")
MEDIUM_BAND = (0.25, 0.45)
"""Normalised returns (fractions of expert − random) at which a training run's policy is medium."""
REFERENCE_EPISODES = 100
BATCH_ENVS = 100
"""The locomotion recipes' :attr:`Recipe.envs` (1M transitions each of ``medium`` and ``expert``)."""
_REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Recipe:
    """How a task's datasets are made."""

    env_id: str
    """Gymnasium id."""
    name: str
    """The task's part of the dataset id (Minari's: lower case, no separators)."""
    launch: str
    """Launch file of the medium policy's training run (relative to the repository)."""
    expert: str
    """The expert controller's checkpoint (relative to the repository)."""
    steps: int
    """Transitions of ``random``, ``medium`` and ``expert`` (D4RL: 1M for locomotion)."""
    medium_seed: int = 0
    """Seed of the medium run for dataset seed 0 (``medium_seed + seed`` for the others): the seed
    the expert checkpoint was trained with, so that medium and expert come from one training run
    (the medium policy is that run stopped early, as D4RL's are)."""
    sets: tuple[str, ...] = ()
    """Config overrides (``KEY=VALUE``) of the medium run on top of :attr:`launch`: the settings the
    expert was trained with, pinned where the launch file has moved on since."""
    envs: int = 1
    """Environments the controllers' rollouts (``medium``, ``expert``, the expert's reference) run
    at once, with one batched solve of all their argmins a step (:func:`checkpoint_batch_policy`);
    1: one environment and the controller's own solve a step (how the IP and IDP datasets of
    ``docs/benchmarks.md`` were made; ``envs`` changes which noise each step draws)."""
    medium: str | None = None
    """The medium policy shipped with the repository (``models/medium/<task>.pt``; where its run's
    search stopped, ``<task>.json`` next to it): the ``medium`` dataset of seed 0 (and so
    ``medium-expert``'s) rolls it out instead of training the run, so that it is the same on every
    machine. A training run is not: its floating-point path differs between machines, and IP's
    step-like learning curve made again elsewhere stopped at step 2000 where the first one stopped
    at 3000. It is the policy that this recipe's run chose on the machine the datasets of
    ``docs/benchmarks.md`` were made on. ``medium-replay`` still trains the run (it is the run's
    replay buffer; :attr:`medium_replay` ships that), as do other seeds, a launch file or a budget
    of the caller's."""
    medium_replay: str | None = None
    """The ``medium-replay`` dataset of seed 0 shipped with the repository
    (``models/medium/<task>_replay.npz``, :func:`~qmpc.data.save_episodes`: the replay buffer of a
    medium run of this recipe and the note of its search), written as it is instead of training the
    run, so that it is the same on every machine (a run made again elsewhere stops at another step:
    IDP's at 7 750 transitions where another machine's stopped at 8 250). Its run is not the one
    that chose :attr:`medium` where the two machines differed: the note says where it stopped.
    Made by :func:`ship_medium_replay` from a run this recipe trained."""


RECIPES = {
    r.env_id: r
    for r in (
        Recipe(
            "InvertedPendulum-v5",
            "invertedpendulum",
            "launch/inverted_pendulum.toml",
            "models/inverted_pendulum.pt",
            100_000,
            medium_seed=3,  # models/inverted_pendulum.pt is seed 3's run of the launch file
            sets=("network.layer_norm=false",),  # as it was then (the datasets of docs/benchmarks.md)
            medium="models/medium/inverted_pendulum.pt",
            medium_replay="models/medium/inverted_pendulum_replay.npz",
        ),
        Recipe(
            "InvertedDoublePendulum-v5",
            "inverteddoublependulum",
            "launch/inverted_double_pendulum.toml",
            "models/inverted_double_pendulum.pt",
            100_000,
            # models/inverted_double_pendulum.pt is seed 0's run of the launch file before session 13
            sets=("train.critics=1", "model.updates_per_step=4", "model.head_updates_per_step=4"),
            medium="models/medium/inverted_double_pendulum.pt",
            medium_replay="models/medium/inverted_double_pendulum_replay.npz",
        ),
        Recipe(
            "Hopper-v5",
            "hopper",
            "launch/hopper.toml",
            "models/hopper.pt",
            1_000_000,
            envs=BATCH_ENVS,
            medium="models/medium/hopper.pt",
            medium_replay="models/medium/hopper_replay.npz",
        ),
        Recipe(
            "HalfCheetah-v5",
            "halfcheetah",
            "launch/half_cheetah.toml",
            "models/half_cheetah.pt",
            1_000_000,
            sets=("model.updates_per_step=4",),  # models/half_cheetah.pt: seed 0 before the model's schedule
            envs=BATCH_ENVS,
            medium="models/medium/half_cheetah.pt",
            medium_replay="models/medium/half_cheetah_replay.npz",
        ),
    )
}


def dataset_id(env_id: str, kind: str) -> str:
    """``qmpc/<task>/<kind>-v0``, e.g. ``qmpc/invertedpendulum/medium-v0``."""
    _check_kind(kind)
    name = RECIPES[env_id].name if env_id in RECIPES else re.sub(r"[^a-z0-9]", "", env_id.split("-v")[0].lower())
    return f"qmpc/{name}/{kind}-v0"


def normalized_score(ret: float | np.ndarray, random_return: float, expert_return: float) -> float | np.ndarray:
    """``100 · (R − R_random) / (R_expert − R_random)``: 0 is the random policy, 100 the expert."""
    return 100.0 * (np.asarray(ret, np.float64) - random_return) / (expert_return - random_return)


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ConfigError(f"expected a dataset kind in {KINDS}, got {kind!r}")


def _repo_file(rel: str | None, what: str, option: str) -> Path:
    if rel is None:
        raise ConfigError(f"expected {option} for a task without a recipe (tasks with one: {', '.join(RECIPES)})")
    path = Path(rel) if Path(rel).is_absolute() or Path(rel).exists() else _REPO / rel
    if not path.is_file():
        raise InputError(f"expected {what} at {path} (a source checkout's file, or give {option}), got none")
    return path


@dataclass
class _Job:
    """One ``make_dataset`` call, resolved."""

    env_id: str
    root: Path
    work: Path
    seed: int
    steps: int
    launch: Path | None
    expert: Path | None
    noise: float
    train_steps: int | None
    eval_every: int
    reference_episodes: int
    medium_seed: int
    progress: bool
    sets: tuple[str, ...] = ()
    """The recipe's :attr:`Recipe.sets` (none with a launch file of the caller's)."""
    envs: int = 1
    """:attr:`Recipe.envs`, or the caller's."""
    medium_policy: Path | None = None
    """:attr:`Recipe.medium` where it applies (seed 0, the recipe's launch file and budget), else None."""
    medium_replay: Path | None = None
    """:attr:`Recipe.medium_replay` where it applies (as :attr:`medium_policy`), else None."""

    def env(self):
        from qmpc.env import make_env

        return make_env(self.env_id, seed=self.seed)

    def out(self, kind: str) -> Path:
        return self.root / dataset_id(self.env_id, kind)


def make_dataset(
    env_id: str,
    kind: str,
    *,
    seed: int = 0,
    steps: int | None = None,
    root: str | Path | None = None,
    launch: str | Path | None = None,
    expert: str | Path | None = None,
    noise: float | None = None,
    train_steps: int | None = None,
    eval_every: int = 250,
    reference_episodes: int = REFERENCE_EPISODES,
    envs: int | None = None,
    progress: bool = True,
) -> Path:
    """Make the ``kind`` dataset of ``env_id`` (and whatever it needs that is not made yet: the
    reference returns, the medium run, the two parts of ``medium-expert``) and return its directory.

    ``steps``: transitions of ``random``/``medium``/``expert`` (default the recipe's); ``launch`` and
    ``expert``: the medium run's launch file and the expert checkpoint (default the recipe's, from
    the repository); ``noise``: exploration noise of the medium and expert policies, as a fraction
    of the action range (default the launch file's ``train.exploration_noise``); ``train_steps``:
    the medium run's budget (default the launch file's; the run's seed is the recipe's
    :attr:`Recipe.medium_seed` plus ``seed``, with ``launch`` given just ``seed``); ``eval_every``:
    how often it is evaluated; ``reference_episodes``: episodes of each reference return (the
    field's 100; fewer for tests); ``envs``: environments the controllers act in at once (default
    the recipe's :attr:`Recipe.envs`, else 1).
    An existing dataset is an :class:`InputError` (delete it to make it again)."""
    from qmpc.config import check_seed, load_config

    _check_kind(kind)
    check_seed(seed, "seed")
    recipe = RECIPES.get(env_id)
    root = Path(root) if root is not None else minari_root()
    launch_path = _repo_file(str(launch) if launch else recipe and recipe.launch, "the launch file", "--launch")
    pinned = recipe.sets if recipe and launch is None else ()
    cfg = load_config(launch_path, list(pinned))
    if cfg.env.id != env_id:
        raise ConfigError(f"expected a launch file for {env_id}, got one for {cfg.env.id} ({launch_path})")
    job = _Job(
        env_id,
        root,
        _work_dir(root, env_id, seed),
        seed,
        int(steps if steps is not None else (recipe.steps if recipe else 100_000)),
        launch_path,
        _repo_file(str(expert) if expert else recipe and recipe.expert, "the expert checkpoint", "--expert"),
        float(cfg.train.exploration_noise if noise is None else noise),
        train_steps,
        int(eval_every),
        int(reference_episodes),
        (recipe.medium_seed if recipe and launch is None else 0) + seed,
        progress,
        pinned,
        int(envs if envs is not None else (recipe.envs if recipe else 1)),
    )
    if recipe and seed == 0 and launch is None and train_steps is None:
        if recipe.medium:
            job.medium_policy = _repo_file(recipe.medium, "the shipped medium policy", "--train-steps (to train it)")
        if recipe.medium_replay:
            job.medium_replay = _repo_file(recipe.medium_replay, "the shipped medium-replay", "--train-steps")
    if min(job.steps, job.eval_every, job.reference_episodes, train_steps or 1, job.envs) < 1 or not job.noise >= 0:
        raise ConfigError(
            f"expected steps, eval_every, reference_episodes, train_steps and envs >= 1 and noise >= 0, got "
            f"{job.steps}, {job.eval_every}, {job.reference_episodes}, {train_steps}, {job.envs} and {job.noise}"
        )
    if job.out(kind).exists():
        raise InputError(f"expected no dataset {dataset_id(env_id, kind)} yet, got one at {job.out(kind)}")
    return _MAKERS[kind](job)


def _work_dir(root: Path, env_id: str, seed: int) -> Path:
    """Where ``seed``'s medium run of ``env_id`` is kept (its parent: the task's references)."""
    return root / "qmpc" / ".work" / dataset_id(env_id, "random").split("/")[1] / f"seed{seed}"


# ---------------------------------------------------------------------------------------
# References and policies
# ---------------------------------------------------------------------------------------


def reference_returns(job: _Job) -> dict[str, float]:
    """``{"random": R_random, "expert": R_expert}``: mean returns of a uniform random policy and of
    the expert controller without noise over ``job.reference_episodes`` episodes (reset seeds
    2 000 000 + i whatever the dataset's seed; cached per task next to the medium runs)."""
    path = job.work.parent / "references.json"
    if path.is_file():
        ref = json.loads(path.read_text())
        if ref.get("expert_checkpoint") == str(job.expert) and ref.get("episodes") == job.reference_episodes:
            return ref
    env = job.env()
    rng = np.random.default_rng(99)
    low, high = env.action_space.low, env.action_space.high
    n, seeds = job.reference_episodes, 2_000_000
    ref = {"random": _mean_return(env, lambda o: rng.uniform(low, high), seeds, n, "reference: random")}
    if job.envs > 1:
        envs = [job.env() for _ in range(min(job.envs, n))]
        policy = checkpoint_batch_policy(job.expert, env, 0.0, rng, len(envs))
        eps = _batch_rollouts(job, envs, policy, "reference: expert", seeds, episodes=n)
        ref["expert"] = float(np.mean([np.sum(e.rewards) for e in eps]))
    else:
        ref["expert"] = _mean_return(env, checkpoint_policy(job.expert, env, 0.0, rng), seeds, n, "reference: expert")
    ref.update(episodes=n, expert_checkpoint=str(job.expert), envs=job.envs)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(ref, indent=1)))
    return ref


def _mean_return(env, policy: Callable, seed: int, episodes: int, desc: str, progress: bool = False) -> float:
    from tqdm import tqdm

    total = 0.0
    for i in tqdm(range(episodes), desc=desc, disable=not progress, unit="episode"):
        obs, _ = env.reset(seed=seed + i)
        done = False
        while not done:
            obs, r, term, trunc, _ = env.step(np.asarray(policy(obs), np.float32))
            total += float(r)
            done = term or trunc
    return total / episodes


def checkpoint_policy(
    checkpoint: Path, env, noise: float, rng: np.random.Generator
) -> Callable[[np.ndarray], np.ndarray]:
    """The greedy controller of ``checkpoint`` plus Gaussian noise of ``noise`` × the action range
    (clipped to the bounds)."""
    from qmpc.controller import Controller
    from qmpc.env import env_spec

    spec = env_spec(env)
    ctrl = Controller.from_checkpoint(checkpoint)
    ctrl.check_task(spec.env_id, spec.obs_dim, spec.act_dim)
    span = spec.high - spec.low

    def act(obs: np.ndarray) -> np.ndarray:
        a, _ = ctrl.act(obs)
        return np.clip(a + noise * span * rng.normal(size=spec.act_dim), spec.low, spec.high)

    return act


def checkpoint_batch_policy(checkpoint: Path, env, noise: float, rng: np.random.Generator, envs: int) -> BatchPolicy:
    """:func:`checkpoint_policy` for ``envs`` environments at once (:func:`~qmpc.data.batch_rollouts`):
    the argmins of Q at all their states in one batched solve (a PICNN's: the projected Newton on
    its closed form, certified as a training run's TD targets are; a state's argmin is the same
    alone and in a batch), each warm-started from its environment's previous action, plus the
    noise, drawn ``(n, act_dim)`` a step. A state whose solve fails acts as the controller
    falls back: its previous action (the bounds' midpoint at an episode's first step);
    ``policy.failed`` counts them."""
    return _BatchGreedy(checkpoint, env, noise, rng, envs)


class _BatchGreedy:
    def __init__(self, checkpoint: Path, env, noise: float, rng: np.random.Generator, envs: int):
        from qmpc.controller import BatchController
        from qmpc.env import env_spec

        spec = env_spec(env)
        self.greedy = BatchController.from_checkpoint(checkpoint, envs)
        self.greedy.check_task(spec.env_id, spec.obs_dim, spec.act_dim)
        self.scale, self.rng = noise * (spec.high - spec.low), rng

    @property
    def failed(self) -> int:
        return self.greedy.stats["fallback"]

    def __call__(self, obs: np.ndarray, slots: np.ndarray, fresh: np.ndarray) -> np.ndarray:
        u = self.greedy(obs, slots, fresh)
        return np.clip(u + self.scale * self.rng.normal(size=u.shape), self.greedy.low, self.greedy.high)


# ---------------------------------------------------------------------------------------
# The kinds
# ---------------------------------------------------------------------------------------


def _write(job: _Job, kind: str, episodes: list[Episode], algorithm: str, extra: str = "") -> Path:
    ref = reference_returns(job)
    out = job.out(kind)
    out.parent.mkdir(parents=True, exist_ok=True)
    returns = [float(np.sum(e.rewards)) for e in episodes]
    desc = (
        f"{kind} dataset of {job.env_id}, made by qmpc (qmpc datasets make {job.env_id} {kind} --seed {job.seed}): "
        f"{algorithm}. {sum(len(e.rewards) for e in episodes)} transitions in {len(episodes)} episodes, mean "
        f"episode return {np.mean(returns):.1f}; references over {ref['episodes']} episodes: random "
        f"{ref['random']:.2f}, expert {ref['expert']:.2f} ({ref['expert_checkpoint']}, no noise).{extra}"
    )
    return write_minari(
        episodes,
        out,
        job.env(),
        algorithm,
        dataset_id(job.env_id, kind),
        ref_min_score=ref["random"],
        ref_max_score=ref["expert"],
        description=desc,
        author="qmpc",
    )


def _make_random(job: _Job) -> Path:
    env = job.env()
    rng = np.random.default_rng([job.seed, 0])
    low, high = env.action_space.low, env.action_space.high
    eps = _rollouts(job, env, lambda o: rng.uniform(low, high), 0, "random")
    return _write(job, "random", eps, "uniform random actions")


def _make_expert(job: _Job) -> Path:
    eps = _controller_rollouts(job, job.expert, 3, "expert")
    return _write(job, "expert", eps, f"qmpc controller {job.expert.name} + noise {job.noise:g}{_envs_note(job)}")


def _make_medium(job: _Job) -> Path:
    if job.medium_policy is not None:  # the recipe's, shipped: the same on every machine
        policy, note, source = job.medium_policy, job.medium_policy.with_suffix(".json"), f" ({job.medium_policy.name})"
    else:
        run = _medium_run(job)
        policy, note, source = run / "policy.pt", run / "medium.json", ""
    eps = _controller_rollouts(job, policy, 1, "medium")
    algorithm = f"qmpc controller of a training run{source} + noise {job.noise:g}{_envs_note(job)}"
    return _write(job, "medium", eps, algorithm, _medium_note(json.loads(note.read_text())))


def _envs_note(job: _Job) -> str:
    return f" ({job.envs} environments at once, one batched solve a step)" if job.envs > 1 else ""


def _controller_rollouts(job: _Job, checkpoint: Path, kind_index: int, desc: str) -> list[Episode]:
    """``job.steps`` transitions of ``checkpoint``'s controller with ``job.noise``: one environment
    (:func:`checkpoint_policy`) or ``job.envs`` at once (:func:`checkpoint_batch_policy`)."""
    env, rng = job.env(), np.random.default_rng([job.seed, kind_index])
    if job.envs == 1:
        return _rollouts(job, env, checkpoint_policy(checkpoint, env, job.noise, rng), kind_index, desc)
    envs = [job.env() for _ in range(job.envs)]
    policy = checkpoint_batch_policy(checkpoint, env, job.noise, rng, job.envs)
    return _batch_rollouts(job, envs, policy, desc, _rollout_seed(job, kind_index), steps=job.steps)


def _make_medium_replay(job: _Job) -> Path:
    if job.medium_replay is not None:  # the recipe's, shipped: the same on every machine
        eps, note = load_episodes(job.medium_replay)
        algorithm = f"the replay buffer of a qmpc training run ({job.medium_replay.name})"
        return _write(job, "medium-replay", eps, algorithm, _medium_note(note))
    eps, note = _run_buffer(_medium_run(job))
    return _write(job, "medium-replay", eps, "the replay buffer of a qmpc training run", _medium_note(note))


def _run_buffer(run: Path) -> tuple[list[Episode], dict]:
    """A medium run's replay buffer as episodes, and its search's note (``medium.json``)."""
    from qmpc.checkpoint import load_checkpoint

    ckpt = load_checkpoint(run / "checkpoint.pt")
    eps = buffer_episodes(ckpt["buffer"], float(ckpt["config"]["train"]["cost_scale"]))
    return eps, json.loads((run / "medium.json").read_text())


def ship_medium_replay(env_id: str, root: str | Path | None = None, out: str | Path | None = None) -> Path:
    """Write :attr:`Recipe.medium_replay` of ``env_id`` (to ``out``, default into the repository)
    from the medium run of seed 0 that ``qmpc datasets make ENV_ID medium-replay --train-steps N``
    (``N`` the launch file's ``train.steps``) trained under ``root``; the file it wrote."""
    recipe = RECIPES.get(env_id)
    if recipe is None or recipe.medium_replay is None:
        raise ConfigError(f"expected a task whose recipe ships a medium-replay, got {env_id!r}")
    root = Path(root) if root is not None else minari_root()
    run = _work_dir(root, env_id, 0) / "medium"
    if not (run / "medium.json").is_file():
        raise InputError(f"expected the finished medium run of seed 0 at {run}, got none (make it with --train-steps)")
    eps, note = _run_buffer(run)
    return save_episodes(out if out is not None else _REPO / recipe.medium_replay, eps, note)


def _make_medium_expert(job: _Job) -> Path:
    from qmpc.data import read_episodes

    parts = []
    for kind in ("medium", "expert"):
        if not job.out(kind).exists():
            _MAKERS[kind](job)
        parts += read_episodes(job.out(kind))
    return _write(job, "medium-expert", parts, "the medium and expert datasets together")


def _rollout_seed(job: _Job, kind_index: int) -> int:
    """The reset seed of a kind's first episode (episode ``i``: this plus ``i``)."""
    return 10_000_000 * job.seed + 1_000_000 * kind_index


def _rollouts(job: _Job, env, policy: Callable, kind_index: int, desc: str) -> list[Episode]:
    from tqdm import tqdm

    with tqdm(total=job.steps, desc=f"{job.env_id} {desc}", disable=not job.progress, unit="step") as bar:
        return rollouts(env, policy, job.steps, seed=_rollout_seed(job, kind_index), progress=bar.update)


def _batch_rollouts(job: _Job, envs: list, policy, desc: str, seed: int, **limit: int) -> list[Episode]:
    from tqdm import tqdm

    total = limit.get("steps")
    with tqdm(total=total, desc=f"{job.env_id} {desc}", disable=not job.progress, unit="step") as bar:
        return batch_rollouts(envs, policy, seed, progress=bar.update, **limit)


_MAKERS: dict[str, Callable[[_Job], Path]] = {
    "random": _make_random,
    "medium": _make_medium,
    "medium-replay": _make_medium_replay,
    "expert": _make_expert,
    "medium-expert": _make_medium_expert,
}


# ---------------------------------------------------------------------------------------
# The medium run
# ---------------------------------------------------------------------------------------


MIN_INTERVAL = 10
"""The finest evaluation interval of the medium run's search (training steps)."""


def _medium_run(job: _Job) -> Path:
    """The directory with the medium policy (``policy.pt``, ``checkpoint.pt`` with its replay
    buffer, ``medium.json``): a training run of ``job.launch`` evaluated every ``job.eval_every``
    steps, stopped at the first evaluation in :data:`MEDIUM_BAND`. Where one interval jumps over
    the band (a step-like learning curve), the run goes back to the evaluation before the jump and
    retraces it (deterministically: a resumed run is bit-identical) with evaluations five times as
    often, down to :data:`MIN_INTERVAL`. At the run's budget, or past the band at that finest
    interval, without an evaluation in the band: the evaluation closest to a third. Made once per
    task and seed; an interrupted one continues from its last checkpoint, keeping its search state
    and the best candidate so far."""
    from qmpc.checkpoint import load_checkpoint
    from qmpc.config import load_config

    chosen, cand, run_dir, prev = (job.work / n for n in ("medium", "candidate", "run", "prev"))
    if (chosen / "medium.json").is_file():
        return chosen
    ref = reference_returns(job)
    budget = job.train_steps or load_config(job.launch, list(job.sets)).train.steps
    best = json.loads((cand / "medium.json").read_text()) if (cand / "medium.json").is_file() else None
    search = job.work / "search.json"
    state = json.loads(search.read_text()) if search.is_file() else {"interval": job.eval_every, "score": None}
    end = 0
    if (run_dir / "checkpoint.pt").is_file():
        end = int(load_checkpoint(run_dir / "checkpoint.pt")["loop"]["step"])
    while end < budget and not (best and best["in_band"]):
        if end > 0:
            _copy_run(run_dir, prev, {"step": end, "score": state["score"]})
        end = min(end + state["interval"], budget)
        ret = _train_to(job, run_dir, end, state["interval"])
        score = float(normalized_score(ret, ref["random"], ref["expert"])) / 100.0
        if best is None or abs(score - 1 / 3) < abs(best["normalized"] - 1 / 3):
            in_band = bool(MEDIUM_BAND[0] <= score <= MEDIUM_BAND[1])
            best = {"step": end, "normalized": score, "eval_return": ret, "in_band": in_band}
            _copy_run(run_dir, cand, best)
        last = state["score"]
        if last is not None and last < MEDIUM_BAND[0] and score > MEDIUM_BAND[1] and state["interval"] > MIN_INTERVAL:
            before = json.loads((prev / "medium.json").read_text())
            _copy_run(prev, run_dir, None)  # back to the evaluation before the jump
            end, score = before["step"], before["score"]
            state["interval"] = max(MIN_INTERVAL, state["interval"] // 5)
        state["score"] = score
        atomic_write(search, lambda tmp: Path(tmp).write_text(json.dumps(state)))
        if score > MEDIUM_BAND[1] and state["interval"] <= MIN_INTERVAL:
            break  # past the band at the finest interval too: the learning curve has no medium
    if best is None:
        raise InputError(f"expected an evaluation in the medium run at {run_dir}, got none (a budget of {budget})")
    shutil.rmtree(chosen, ignore_errors=True)
    cand.rename(chosen)
    return chosen


def _train_to(job: _Job, run_dir: Path, end: int, interval: int) -> float:
    """Train the medium run to step ``end`` (resumed where it has a checkpoint), evaluating and
    checkpointing every ``interval`` steps; the return of its evaluation at ``end``."""
    from qmpc.config import load_config
    from qmpc.trainer import train

    sets = [f"seed={job.medium_seed}", f"run_dir={run_dir}", f"train.steps={end}"]
    sets += [f"train.eval_every={interval}", f"train.checkpoint_every={interval}", *job.sets]
    resume = (run_dir / "checkpoint.pt").is_file()
    summary = train(
        load_config(job.launch, sets), resume=resume, progress=job.progress, overrides=sets[2:] if resume else ()
    )
    return float(summary.eval_returns[-1])


def _copy_run(run_dir: Path, to: Path, note: dict | None) -> None:
    """The run's checkpoint, policy, config and metrics (with ``note`` as ``medium.json``),
    replacing ``to``'s whole (a copy next to it, then renamed)."""
    tmp = to.with_name(to.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in ("checkpoint.pt", "policy.pt", "config.toml", "metrics.csv", "medium.json"):
        if (run_dir / name).is_file() and not (note is not None and name == "medium.json"):
            shutil.copy2(run_dir / name, tmp / name)
    if note is not None:
        (tmp / "medium.json").write_text(json.dumps(note))
    if to.is_dir() and to.name == "run":  # the live run: keep its event files and plots
        for name in ("checkpoint.pt", "policy.pt", "config.toml", "metrics.csv"):
            os.replace(tmp / name, to / name)
        shutil.rmtree(tmp)
        return
    shutil.rmtree(to, ignore_errors=True)
    tmp.rename(to)


def _medium_note(m: dict) -> str:
    """The description's sentence on the medium policy, from its search's result (``medium.json``)."""
    band = "" if m["in_band"] else f" (no evaluation fell within {MEDIUM_BAND} of expert; the closest to a third)"
    return (
        f" The medium policy: the training run at step {m['step']}, evaluation return {m['eval_return']:.1f}, "
        f"normalised {100 * m['normalized']:.1f}{band}."
    )


def buffer_episodes(buffer: dict, cost_scale: float) -> list[Episode]:
    """A replay buffer's :meth:`~qmpc.data.ReplayBuffer.state_dict` as episodes, oldest first
    (rewards ``= −cost / cost_scale``): an episode ends where a transition terminated or the next
    one does not start at its ``next_obs``; one that ends without terminating is truncated."""
    n, pos = int(buffer["size"]), int(buffer["pos"])
    arrays = {k: np.asarray(buffer[k]) for k in ("obs", "act", "cost", "next_obs", "terminated")}
    order, ends = episode_order(n, pos, arrays["obs"], arrays["next_obs"], arrays["terminated"])
    obs, act, cost, nxt, term = (arrays[k][order] for k in ("obs", "act", "cost", "next_obs", "terminated"))
    episodes, start = [], 0
    for e in ends:
        sl = slice(start, e + 1)
        terminated = term[sl] > 0
        truncated = np.zeros_like(terminated)
        truncated[-1] = not terminated[-1]
        o = np.concatenate([obs[sl], nxt[e : e + 1]])
        episodes.append(Episode(o, act[sl], -cost[sl].astype(np.float64) / cost_scale, terminated, truncated))
        start = e + 1
    return episodes


def describe_datasets(root: str | Path | None = None) -> str:
    """A table of the ``qmpc/*`` datasets under ``root`` (default :func:`~qmpc.data.minari_root`):
    id, transitions, episodes, mean episode return and the reference returns."""
    root = Path(root) if root is not None else minari_root()
    rows = []
    for meta in sorted((root / "qmpc").glob("*/*-v*/data/metadata.json")):
        m = dataset_metadata(meta.parents[1])
        rows.append(
            f"{m.get('dataset_id', meta.parents[1].name):<42} {m.get('total_steps', 0):>9} "
            f"{m.get('total_episodes', 0):>8}"
            f" {m.get('ref_min_score', float('nan')):>10.2f} {m.get('ref_max_score', float('nan')):>10.2f}"
        )
    head = f"{'dataset':<42} {'steps':>9} {'episodes':>8} {'R_random':>10} {'R_expert':>10}"
    return "\n".join([f"qmpc datasets in {root}:", head, *rows]) if rows else f"no qmpc datasets in {root}"
