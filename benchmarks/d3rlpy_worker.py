"""Train one d3rlpy offline-RL algorithm on an ``.npz`` dataset and evaluate it; run with the python
of the d3rlpy venv (``benchmarks/offline_peers.py``: ``ensure_venv``, ``run_peer``), never qmpc's.

    python d3rlpy_worker.py --data DATA.npz --env InvertedPendulum-v5 --algo {bc,td3plusbc,iql,cql,rebrac}
        --steps N --eval-every K --eval-episodes 10 --eval-seed 10000 --seed S --out RESULT.json [--threads 1]
        [--device cpu|cuda]

DATA.npz (D4RL layout): ``observations (N, obs_dim)``, ``actions (N, act_dim)``, ``rewards (N,)``,
``terminals (N,)`` (1.0 where the episode terminated at that transition), ``timeouts (N,)`` (1.0
where it was cut without terminating; the last transition must end an episode). As in D4RL, a
transition's next observation is the next row's, so d3rlpy skips the last transition of each cut
episode.

Hyperparameters: d3rlpy's reproduction scripts for the D4RL MuJoCo tasks
(https://github.com/takuseno/d3rlpy, ``reproductions/offline/``; d3rlpy 2.x versions, with
``--compile``):

- ``iql`` (iql.py): actor and critic learning rates 3e-4, the actor's Adam with cosine annealing
  over the run (``T_max`` = the script's 500 000 = its ``n_steps``; here ``--steps``), batch 256,
  expectile 0.7, ``weight_temp`` 3.0, ``max_weight`` 100, ``ReturnBasedRewardScaler(multiplier=1000)``
  (rewards × 1000 / (max − min episode return)); default networks (256, 256), gamma 0.99.
- ``td3plusbc`` (td3_plus_bc.py): learning rates 3e-4, batch 256, target smoothing sigma 0.2 and
  clip 0.5, alpha 2.5, actor update every 2 steps, ``StandardObservationScaler``; default networks.
- ``cql`` (cql.py): actor 1e-4, critic 3e-4, temperature 1e-4 learning rates, fixed conservative
  weight (``alpha_learning_rate=0``) 5.0 (the script's 10.0 is for ``*-medium-v0`` datasets only),
  batch 256, 10 action samples, actor and critic networks (256, 256, 256).
- ``rebrac`` (rebrac.py): learning rates 1e-3, batch 1024, gamma 0.99, actor (256, 256, 256), critic
  (256, 256, 256) with layer norm, target smoothing sigma 0.2 and clip 0.5, actor update every 2
  steps, ``actor_beta`` = ``critic_beta`` = 0.01 (the script's default for a dataset outside its
  per-dataset table), ``StandardObservationScaler``.
- ``bc``: there is no reproduction script for BC; d3rlpy's ``BCConfig`` defaults: learning rate 1e-3,
  batch 100, deterministic policy (mean squared error), network (256, 256).

Added for every algorithm (not in the scripts, whose D4RL tasks all have actions in [−1, 1]): a
``MinMaxActionScaler`` to the environment's action bounds, so the tanh-squashed policies cover the
whole action space. The evaluation is not d3rlpy's but qmpc's protocol: ``gymnasium.make(env)``,
episode ``i`` reset with seed ``eval_seed + i``, the deterministic policy's action clipped to the
action space, rewards summed until terminated or truncated; the return is the mean over episodes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

ALGOS = ("bc", "td3plusbc", "iql", "cql", "rebrac")
KEYS = ("observations", "actions", "rewards", "terminals", "timeouts")


class DataError(Exception):
    """The dataset or the command line cannot be used (reported on stderr, exit status 2)."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(description="Train and evaluate one d3rlpy offline-RL algorithm.")
    p.add_argument("--data", type=Path, required=True, help="the .npz dataset (D4RL layout)")
    p.add_argument("--env", required=True, help="gymnasium environment id, e.g. InvertedPendulum-v5")
    p.add_argument("--algo", choices=ALGOS, required=True)
    p.add_argument("--steps", type=int, required=True, help="gradient steps")
    p.add_argument("--eval-every", type=int, required=True, help="evaluate every K gradient steps (and at the end)")
    p.add_argument("--eval-episodes", type=int, default=10)
    p.add_argument("--eval-seed", type=int, default=10000, help="episode i is reset with seed eval_seed + i")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True, help="the result JSON (written atomically)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--device", default="cpu", help="torch device of the networks: cpu (default) or cuda[:N]")
    args = p.parse_args(argv)
    for name in ("steps", "eval_every", "eval_episodes", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    return args


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------


def load_npz(path: Path, obs_dim: int, act_dim: int) -> dict[str, np.ndarray]:
    """The arrays of the dataset at ``path`` as float32, checked (:class:`DataError` otherwise)."""
    if not path.is_file():
        raise DataError(f"expected a dataset file at {path}, got none")
    if not zipfile.is_zipfile(path):
        raise DataError(f"expected an .npz (zip) file at {path}, got another kind of file")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in KEYS if k not in z.files]
            if missing:
                raise DataError(f"expected keys {list(KEYS)} in {path}, missing {missing} (has {z.files})")
            d = {k: np.asarray(z[k], np.float32) for k in KEYS}
    except DataError:
        raise
    except Exception as e:  # not a zip, a damaged member, an object array
        raise DataError(f"expected a readable .npz at {path}, got: {type(e).__name__}: {e}") from None
    _check_arrays(d, obs_dim, act_dim)
    return d


def _check_arrays(d: dict[str, np.ndarray], obs_dim: int, act_dim: int) -> None:
    """:class:`DataError` unless the shapes fit the environment, values are finite and the flags
    mark episodes (0/1, never both, the last transition ending an episode)."""
    lengths = {k: len(d[k]) if d[k].ndim else None for k in KEYS}
    if len(set(lengths.values())) != 1:
        raise DataError(f"expected the same number of rows in every array, got {lengths}")
    n = len(d["rewards"])
    want = {"observations": (n, obs_dim), "actions": (n, act_dim), "rewards": (n,), "terminals": (n,), "timeouts": (n,)}
    got = {k: d[k].shape for k in KEYS}
    if got != want or n == 0:
        raise DataError(f"expected shapes {want} (N > 0, dimensions of the environment), got {got}")
    bad = [k for k in KEYS if not np.isfinite(d[k]).all()]
    if bad:
        raise DataError(f"expected finite values, got NaN/Inf in {bad}")
    for k in ("terminals", "timeouts"):
        if not np.isin(d[k], (0.0, 1.0)).all():
            raise DataError(f"expected {k} of 0.0 and 1.0 only, got {np.unique(d[k])[:5]}")
    if (d["terminals"] * d["timeouts"]).any():
        raise DataError("expected terminals and timeouts never both 1.0 at one transition")
    if d["terminals"][-1] + d["timeouts"][-1] == 0:
        raise DataError("expected the last transition to end an episode (terminals or timeouts 1.0), got neither")


def episode_returns(d: dict[str, np.ndarray]) -> np.ndarray:
    """Each episode's return over the transitions d3rlpy samples (all but the last of a cut
    episode), as d3rlpy's ``ReturnBasedRewardScaler`` computes it."""
    ends = np.flatnonzero(d["terminals"] + d["timeouts"])
    starts = np.r_[0, ends[:-1] + 1]
    last = ends + 1 - (d["timeouts"][ends] > 0)
    return np.array([d["rewards"][s:e].sum() for s, e in zip(starts, last, strict=True)], np.float64)


def make_dataset(d: dict[str, np.ndarray]) -> Any:
    """The ``d3rlpy.dataset.MDPDataset`` of the arrays; :class:`DataError` when no transition is
    left to sample."""
    import d3rlpy

    ds = d3rlpy.dataset.MDPDataset(
        observations=d["observations"],
        actions=d["actions"],
        rewards=d["rewards"],
        terminals=d["terminals"],
        timeouts=d["timeouts"],
        action_space=d3rlpy.ActionSpace.CONTINUOUS,
        action_size=d["actions"].shape[1],
    )
    if ds.transition_count == 0:
        raise DataError("expected transitions to train on, got only one-step cut episodes")
    return ds


# --------------------------------------------------------------------------------------
# Algorithms
# --------------------------------------------------------------------------------------


def make_config(algo: str, steps: int, low: np.ndarray, high: np.ndarray, returns: np.ndarray) -> tuple[Any, str]:
    """The d3rlpy config of ``algo`` (hyperparameters: the module docstring) and a note ('' if
    none) on anything adapted to the data."""
    import d3rlpy

    enc = d3rlpy.models.VectorEncoderFactory
    common = {"action_scaler": d3rlpy.preprocessing.MinMaxActionScaler(minimum=low, maximum=high)}
    std_obs = d3rlpy.preprocessing.StandardObservationScaler
    if algo == "bc":
        return d3rlpy.algos.BCConfig(**common), ""
    if algo == "td3plusbc":
        cfg = d3rlpy.algos.TD3PlusBCConfig(
            actor_learning_rate=3e-4,
            critic_learning_rate=3e-4,
            batch_size=256,
            target_smoothing_sigma=0.2,
            target_smoothing_clip=0.5,
            alpha=2.5,
            update_actor_interval=2,
            observation_scaler=std_obs(),
            **common,
        )
        return cfg, ""
    if algo == "iql":
        return iql_config(steps, returns, common)
    if algo == "cql":
        cfg = d3rlpy.algos.CQLConfig(
            actor_learning_rate=1e-4,
            critic_learning_rate=3e-4,
            temp_learning_rate=1e-4,
            actor_encoder_factory=enc([256, 256, 256]),
            critic_encoder_factory=enc([256, 256, 256]),
            batch_size=256,
            n_action_samples=10,
            alpha_learning_rate=0.0,
            conservative_weight=5.0,
            **common,
        )
        return cfg, ""
    cfg = d3rlpy.algos.ReBRACConfig(
        actor_learning_rate=1e-3,
        critic_learning_rate=1e-3,
        batch_size=1024,
        gamma=0.99,
        actor_encoder_factory=enc([256, 256, 256]),
        critic_encoder_factory=enc([256, 256, 256], use_layer_norm=True),
        target_smoothing_sigma=0.2,
        target_smoothing_clip=0.5,
        update_actor_interval=2,
        actor_beta=0.01,
        critic_beta=0.01,
        observation_scaler=std_obs(),
        **common,
    )
    return cfg, ""


def iql_config(steps: int, returns: np.ndarray, common: dict[str, Any]) -> tuple[Any, str]:
    """IQL's config. The reward scale 1000 / (max − min episode return) is set from ``returns``;
    where all episodes have the same return (e.g. every one of an expert's reaches the time limit)
    it is undefined and 1000 / max(|return|) is used instead, with a note."""
    import d3rlpy

    hi, lo, note = float(returns.max()), float(returns.min()), ""
    if hi - lo <= 1e-6 * max(1.0, abs(hi)):
        note = f"iql: all episode returns equal ({hi:g}); reward scale 1000/max(|return|, 1) instead of 1000/(max-min)"
        hi, lo = max(abs(hi), 1.0), 0.0
    optim = d3rlpy.optimizers.AdamFactory(
        lr_scheduler_factory=d3rlpy.optimizers.CosineAnnealingLRFactory(T_max=steps),
    )
    cfg = d3rlpy.algos.IQLConfig(
        actor_learning_rate=3e-4,
        critic_learning_rate=3e-4,
        actor_optim_factory=optim,
        batch_size=256,
        weight_temp=3.0,
        max_weight=100.0,
        expectile=0.7,
        reward_scaler=d3rlpy.preprocessing.ReturnBasedRewardScaler(return_max=hi, return_min=lo, multiplier=1000.0),
        **common,
    )
    return cfg, note


# --------------------------------------------------------------------------------------
# Training and evaluation
# --------------------------------------------------------------------------------------


def evaluate(algo: Any, env_id: str, episodes: int, seed: int) -> list[float]:
    """The return of each of ``episodes`` episodes of the deterministic policy, episode ``i`` reset
    with seed ``seed + i``, actions clipped to the action space."""
    import gymnasium

    env = gymnasium.make(env_id)
    low, high = env.action_space.low, env.action_space.high
    rets = []
    try:
        for i in range(episodes):
            obs, _ = env.reset(seed=seed + i)
            done, ret = False, 0.0
            while not done:
                act = np.clip(algo.predict(obs[None])[0], low, high)
                obs, r, term, trunc, _ = env.step(act)
                ret, done = ret + float(r), bool(term or trunc)
            rets.append(ret)
    finally:
        env.close()
    return rets


def train(algo: Any, dataset: Any, args: argparse.Namespace) -> tuple[list[int], list[list[float]]]:
    """Run ``args.steps`` gradient steps with d3rlpy's ``fit`` (no logs, no progress bar),
    evaluating every ``args.eval_every`` steps and after the last; the evaluation steps and each
    evaluation's episode returns."""
    import d3rlpy

    steps: list[int] = []
    rets: list[list[float]] = []

    def callback(a: Any, epoch: int, total_step: int) -> None:
        if total_step % args.eval_every == 0 or total_step == args.steps:
            steps.append(total_step)
            rets.append(evaluate(a, args.env, args.eval_episodes, args.eval_seed))

    algo.fit(
        dataset,
        n_steps=args.steps,
        n_steps_per_epoch=args.steps,
        experiment_name=f"{args.algo}_{args.seed}",
        with_timestamp=False,
        logger_adapter=d3rlpy.logging.NoopAdapterFactory(),
        show_progress=False,
        save_interval=args.steps + 1,
        callback=callback,
    )
    return steps, rets


def quiet_d3rlpy() -> None:
    """Send d3rlpy's structlog messages below warnings nowhere and the rest to stderr (d3rlpy
    prints its info messages to stdout)."""
    import logging

    import structlog

    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )


def hyperparameters(config: Any) -> dict:
    """The d3rlpy config as a JSON-able dict (after training: the scalers are fitted then, and
    d3rlpy cannot serialize an unfitted one)."""
    try:
        return json.loads(config.serialize())
    except Exception as e:  # a d3rlpy/dataclasses-json version that serializes differently
        return {"unserializable": f"{type(e).__name__}: {e}", "repr": repr(config)}


def versions() -> dict[str, str]:
    """The versions of the packages that make the result."""
    import importlib.metadata as m

    return {k: m.version(k) for k in ("d3rlpy", "torch", "gymnasium", "mujoco")}


def device_name(device: str) -> str:
    """``device`` as the result records it: ``cpu`` or the GPU's name (e.g. ``cuda:0 (NVIDIA H100 80GB HBM3)``)."""
    import torch

    if device == "cpu":
        return "cpu"
    return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"


def write_json(path: Path, obj: dict) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (temporary file + ``os.replace``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # a plain new file's mode, not mkstemp's 0600
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def run(args: argparse.Namespace, t0: float) -> dict:
    """Load, train, evaluate; the result (see the module docstring). ``wall_s``: seconds since
    ``t0`` (``time.perf_counter``), so with the imports of d3rlpy and torch."""
    import d3rlpy
    import gymnasium
    import torch

    torch.set_num_threads(args.threads)
    quiet_d3rlpy()
    try:
        env = gymnasium.make(args.env)
    except Exception as e:
        raise DataError(f"expected a gymnasium environment id, got {args.env!r}: {type(e).__name__}: {e}") from None
    low, high = env.action_space.low.astype(np.float32), env.action_space.high.astype(np.float32)
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    env.close()
    data = load_npz(args.data, obs_dim, act_dim)
    dataset = make_dataset(data)
    d3rlpy.seed(args.seed)
    config, note = make_config(args.algo, args.steps, low, high, episode_returns(data))
    algo = config.create(device=False if args.device == "cpu" else args.device)
    steps, rets = train(algo, dataset, args)
    return {
        "algo": args.algo,
        "env": args.env,
        "seed": args.seed,
        "steps": steps,
        "returns": [float(np.mean(r)) for r in rets],
        "episode_returns": rets,
        "wall_s": time.perf_counter() - t0,
        "versions": versions(),
        "device": device_name(args.device),
        "transitions": int(dataset.transition_count),
        "hyperparameters": hyperparameters(config),
        "notes": [note] if note else [],
    }


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; the exit status (0 ok, 2 unusable input)."""
    t0 = time.perf_counter()
    args = parse_args(argv)
    args.data, args.out = args.data.resolve(), args.out.resolve()
    cwd = os.getcwd()
    try:
        with tempfile.TemporaryDirectory(prefix="d3rlpy-worker-") as tmp:
            os.chdir(tmp)  # whatever d3rlpy or MuJoCo write into the working directory goes away
            try:
                result = run(args, t0)
            finally:
                os.chdir(cwd)
    except DataError as e:
        print(f"d3rlpy_worker: error: {e}", file=sys.stderr)
        return 2
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
