"""Training the cost-to-go with TD learning, online or offline, in one loop that reads top to bottom.

A run directory holds ``config.toml`` (the resolved config), ``checkpoint.pt`` (written
atomically every ``checkpoint_every`` steps; ``resume=True`` continues exactly where it stopped:
network, target, optimiser, replay buffer, RNGs and the environment's MuJoCo state),
``metrics.csv`` (``step,tag,value``), TensorBoard events in ``tb/`` and ``learning_curve.png``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import socket
import time
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import mujoco
import numpy as np
import torch
from tqdm import tqdm

from qmpc.bridge import ArgminLayer
from qmpc.checkpoint import CheckpointError, load_checkpoint, policy_of, save_checkpoint
from qmpc.config import Config, config_to_toml, resumed_config
from qmpc.controller import Controller
from qmpc.data import ReplayBuffer, as_numpy, atomic_write, ensure_dir, input_normalization, load_minari
from qmpc.dynamics import DynamicsModel
from qmpc.env import EnvSpec, env_spec, make_env
from qmpc.errors import ConfigError, OutputError
from qmpc.losses import td_loss
from qmpc.metrics import MetricsLogger, plot_learning_curve, read_metrics
from qmpc.networks import QNetwork, build_network
from qmpc.runner import discounted_costs, run_episodes

__all__ = [
    "Evaluation",
    "MetricsLogger",
    "RunSummary",
    "evaluate",
    "plot_learning_curve",
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
        n.arch, spec.obs_dim, spec.act_dim, n.hidden, n.activation, n.action_curvature, n.state_dependent_curvature
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
    controller: Controller, env, episodes: int, seed: int, gamma: float = 0.99, cost_scale: float = 1.0
) -> Evaluation:
    """The greedy controller over ``episodes`` episodes, and its Q against Monte-Carlo costs."""
    eps, _ = run_episodes(controller, env, episodes, seed=seed)
    steps = sum(e.length for e in eps)
    gaps = []
    q = controller.q
    p = next(q.parameters())
    for e in eps:
        g, valid = discounted_costs(cost_scale * e.costs, gamma, e.terminated)
        if valid.any():
            with torch.no_grad():
                x = torch.as_tensor(e.observations[:-1][valid], dtype=p.dtype, device=p.device)
                u = torch.as_tensor(e.actions[valid], dtype=p.dtype, device=p.device)
                gaps.append(q(x, u).double().cpu().numpy().reshape(-1) - g[valid])
    return Evaluation(
        float(np.mean([e.ret for e in eps])),
        float(np.mean([e.length for e in eps])),
        sum(e.fallback for e in eps) / max(1, steps),
        float(np.mean(np.concatenate(gaps))) if gaps else float("nan"),
    )


def _env_state(env) -> dict[str, Any]:
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


def _set_env_state(env, st: dict[str, Any]) -> None:
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


def _check_resumable(ckpt: dict, cfg: Config, spec: EnvSpec) -> None:
    missing = [k for k in ("q_target", "optimizer", "scheduler", "buffer", "rng", "env_state", "loop") if k not in ckpt]
    if missing:
        raise CheckpointError(f"expected a full training checkpoint to resume from, got one without {missing}")
    if ckpt["spec"]["env_id"] != spec.env_id or ckpt["network"]["arch"] != cfg.network.arch:
        raise CheckpointError(
            f"expected a checkpoint of {spec.env_id} / {cfg.network.arch}, got {ckpt['spec']['env_id']} / "
            f"{ckpt['network']['arch']}"
        )


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
    (``key=value`` as ``--set``) of :data:`~qmpc.config.RESUMABLE_KEYS`. The run directory is
    locked for the whole run (:class:`RunLock`): a second run on it is refused."""
    run_dir = ensure_dir(cfg.resolved_run_dir(), "the run directory")
    with RunLock(run_dir):
        remove_stale_temps(run_dir)
        return _train(cfg, run_dir, resume, progress, stop_at, overrides)


def _train(
    cfg: Config, run_dir: Path, resume: bool, progress: bool, stop_at: int | None, overrides: Sequence[str]
) -> RunSummary:
    t_start = time.perf_counter()
    tc = cfg.train
    ckpt_path = run_dir / "checkpoint.pt"
    if resume:
        ckpt = load_checkpoint(ckpt_path)
        if not isinstance(ckpt.get("config"), dict):
            raise CheckpointError(f"expected a training checkpoint with its config at {ckpt_path}, got none")
        cfg = resumed_config(ckpt["config"], list(overrides))
        tc = cfg.train
    elif ckpt_path.exists():
        raise ConfigError(f"expected a new run directory, got an existing checkpoint in {run_dir} (use --resume)")
    atomic_write(run_dir / "config.toml", lambda tmp: Path(tmp).write_text(config_to_toml(cfg)))

    # -- seeding, environments, networks ------------------------------------------------
    torch.set_num_threads(tc.torch_threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    env = make_env(cfg.env.id, seed=cfg.seed)
    eval_env = make_env(cfg.env.id, seed=cfg.seed + 10_000)
    spec = env_spec(env)
    buffer = ReplayBuffer(spec.obs_dim, spec.act_dim, tc.buffer_size)
    q = build_q(cfg, spec)
    if tc.mode == "offline":
        if not tc.dataset:
            raise ConfigError("expected train.dataset (a Minari dataset path) in offline mode, got ''")
        data = load_minari(tc.dataset, spec.obs_dim, spec.act_dim, spec.env_id)
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
    q_target = copy.deepcopy(q)
    dyn, dyn_opt, dyn_ready = None, None, False
    model_rng = np.random.default_rng([cfg.seed, 1])  # the model's batches: Q's stay the same
    if cfg.model.learn:
        dyn = DynamicsModel(spec.obs_dim, spec.act_dim, cfg.model.hidden, cfg.model.activation)
        dyn = dyn.to(getattr(torch, tc.dtype))
        dyn_opt = torch.optim.Adam(dyn.parameters(), lr=cfg.model.lr)
    opt = torch.optim.Adam(q.parameters(), lr=tc.lr)
    decay = (lambda k: max(0.0, 1.0 - k / (tc.steps * tc.updates_per_step))) if tc.lr_schedule == "linear" else None
    sched = torch.optim.lr_scheduler.LambdaLR(opt, decay or (lambda k: 1.0))
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
    q_eval = copy.deepcopy(q).double()
    evaluator = Controller(q_eval, spec.low, spec.high, max_iter=cfg.solver.max_iter, env_id=spec.env_id)
    act_range = spec.high - spec.low

    step, episode, fails, solves, wall_before = 0, 0, 0.0, 0, 0.0
    eval_steps: list[int] = []
    eval_returns: list[float] = []
    obs, _ = env.reset(seed=cfg.seed)
    ep_return, ep_len = 0.0, 0
    acc: dict[str, list[float]] = {}  # training metrics of the current logging window
    if resume:
        _check_resumable(ckpt, cfg, spec)
        q.load_state_dict(ckpt["q"])
        q_target.load_state_dict(ckpt["q_target"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        buffer.load_state_dict(ckpt["buffer"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        rng.bit_generator.state = ckpt["rng"]["numpy"]
        _set_env_state(env, ckpt["env_state"])
        s = ckpt["loop"]
        step, episode, fails, solves = s["step"], s["episode"], s["fails"], s["solves"]
        wall_before = s.get("wall_s", 0.0)
        obs, ep_return, ep_len = as_numpy(s["obs"]), s["ep_return"], s["ep_len"]
        eval_steps, eval_returns = s["eval_steps"], s["eval_returns"]
        acc = {k: list(v) for k, v in s.get("acc", {}).items()}  # older checkpoints: window lost
        if tc.steps < step:
            raise ConfigError(f"expected train.steps >= {step} (the checkpoint's step) on --resume, got {tc.steps}")
        if dyn is not None:
            dyn.load_state_dict(ckpt["model"]["state"])
            dyn_opt.load_state_dict(ckpt["model_optimizer"])
            dyn_ready = s["model_ready"]
            model_rng.bit_generator.state = ckpt["rng"]["model"]
    logger = MetricsLogger(run_dir, resume_step=step if resume else None)

    def checkpoint() -> None:
        full = {
            "config": dataclasses.asdict(cfg),
            "spec": {
                "env_id": spec.env_id,
                "obs_dim": spec.obs_dim,
                "act_dim": spec.act_dim,
                "low": spec.low.tolist(),
                "high": spec.high.tolist(),
            },
            "network": _network_kwargs(cfg),
            "gamma": tc.gamma,
            "cost_scale": tc.cost_scale,
            "q": q.state_dict(),
            "q_target": q_target.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "buffer": buffer.state_dict(),
            "rng": {
                "torch": torch.get_rng_state(),
                "numpy": rng.bit_generator.state,
                "model": model_rng.bit_generator.state,
            },
            "env_state": _env_state(env),
            "loop": {
                "step": step,
                "episode": episode,
                "fails": fails,
                "solves": solves,
                "obs": torch.tensor(obs),
                "ep_return": ep_return,
                "ep_len": ep_len,
                "eval_steps": eval_steps,
                "eval_returns": eval_returns,
                "model_ready": dyn_ready,
                "acc": {k: list(v) for k, v in acc.items()},
                "wall_s": wall_before + time.perf_counter() - t_start,
            },
        }
        if dyn is not None:
            full["model"] = {"kwargs": dyn.kwargs(), "state": dyn.state_dict()}
            full["model_optimizer"] = dyn_opt.state_dict()
        save_checkpoint(ckpt_path, full)
        save_checkpoint(run_dir / "policy.pt", policy_of(full))  # what a controller needs: small, to ship

    bar = tqdm(
        total=tc.steps,
        initial=step,
        disable=not progress,
        unit="step",
        dynamic_ncols=True,
        desc=f"{spec.env_id} {tc.mode} {tc.target}",
    )
    while step < tc.steps:
        t_step = time.perf_counter()
        if tc.mode == "online" and step == tc.learning_starts and cfg.network.obs_normalization != "none":
            # fixed from the states of the random-action phase (before Q acts or learns)
            norm = input_normalization(buffer.obs[: len(buffer)], cfg.network.obs_normalization)
            for net in (q, q_target):
                net.set_input_normalization(*norm)
        # 1. act and store (online)
        if tc.mode == "online":
            if step < tc.learning_starts:
                a = rng.uniform(spec.low, spec.high)
            else:
                with _timed(acc, "time/act_ms"):
                    u, _ = actor(torch.as_tensor(obs, dtype=torch.float64)[None])
                a = u[0].numpy() + tc.exploration_noise * act_range * rng.normal(size=spec.act_dim)
                a = np.clip(a, spec.low, spec.high)
            with _timed(acc, "time/env_ms"):
                next_obs, r, term, trunc, _ = env.step(a)
            buffer.add(obs, a, -float(r) * tc.cost_scale, next_obs, term)
            obs, ep_return, ep_len = next_obs, ep_return + float(r), ep_len + 1
            if term or trunc:
                # at step + 1, like every row logged in this iteration (all before its checkpoint)
                logger.log(step + 1, {"train/episode_return": ep_return, "train/episode_length": ep_len})
                obs, _ = env.reset()
                ep_return, ep_len, episode = 0.0, 0, episode + 1

        # 2. learn
        if tc.mode == "offline" or step >= tc.learning_starts:
            for _ in range(tc.updates_per_step):
                batch = buffer.sample(tc.batch_size, rng)
                with _timed(acc, "time/td_loss_ms"):  # the TD-target solves and the forward pass
                    w0 = buffer.warm_starts(batch.index, spec.low, spec.high) if cfg.solver.warm_start else None
                    res = td_loss(q, q_target, online, target, batch, tc.gamma, tc.target, w0=w0)
                    buffer.store_argmins(batch.index, res.next_argmin, res.next_ok)
                with _timed(acc, "time/update_ms"):  # backward (through the solves), Adam, Polyak
                    opt.zero_grad()
                    res.loss.backward()
                    torch.nn.utils.clip_grad_norm_(q.parameters(), tc.grad_clip)
                    opt.step()
                    sched.step()
                    with torch.no_grad():
                        for p, pt in zip(q.parameters(), q_target.parameters(), strict=True):
                            pt.lerp_(p, tc.tau)
                t_model = time.perf_counter()
                if dyn is not None:
                    if not dyn_ready:  # normalisation from the data in the buffer when learning starts
                        n = len(buffer)
                        dyn.fit_normalization(*(torch.from_numpy(a[:n]) for a in (buffer.obs, buffer.next_obs)))
                        dyn_ready = True
                    for _ in range(cfg.model.updates_per_step):
                        mb = buffer.sample(cfg.model.batch_size, model_rng)
                        m_loss = dyn.loss(*(t.to(dyn.x_shift.dtype) for t in (mb.obs, mb.act, mb.next_obs)))
                        dyn_opt.zero_grad()
                        m_loss.backward()
                        torch.nn.utils.clip_grad_norm_(dyn.parameters(), tc.grad_clip)
                        dyn_opt.step()
                    acc.setdefault("model/loss", []).append(float(m_loss.detach()))
                    acc.setdefault("time/model_ms", []).append((time.perf_counter() - t_model) * 1e3)
                fails += res.fail_frac * tc.batch_size
                solves += tc.batch_size
                for k, v in (
                    ("train/td_loss", float(res.loss.detach())),
                    ("train/q_mean", res.q_mean),
                    ("train/target_mean", res.target_mean),
                    ("solver/fail_frac", res.fail_frac),
                    ("solver/solve_ms", res.solve_ms),
                ):
                    acc.setdefault(k, []).append(float(v))
        step += 1
        bar.update(1)
        acc.setdefault("time/step_ms", []).append((time.perf_counter() - t_step) * 1e3)

        # 3. log, evaluate, checkpoint
        if step % tc.log_every == 0 and acc:
            logger.log(step, {k: float(np.mean(v)) for k, v in acc.items()})
            acc.clear()
        if step % tc.eval_every == 0 or step == tc.steps:
            t_eval = time.perf_counter()
            q_eval.load_state_dict(q.state_dict())
            ev = evaluate(evaluator, eval_env, tc.eval_episodes, cfg.seed + 10_000, tc.gamma, tc.cost_scale)
            ret = ev.ret
            eval_ms = (time.perf_counter() - t_eval) * 1e3
            eval_steps.append(step)
            eval_returns.append(ret)
            logger.log(
                step,
                {
                    "eval/return": ret,
                    "eval/length": ev.length,
                    "eval/fallback_frac": ev.fallback_frac,
                    "eval/q_bias": ev.q_bias,
                    "time/eval_ms": eval_ms,
                },
            )
            bar.set_postfix(eval_return=f"{ret:.1f}", fail=f"{fails / max(1, solves):.3f}")
            plot_learning_curve(run_dir)
        if step % tc.checkpoint_every == 0 or step == tc.steps:
            checkpoint()
        if stop_at is not None and step >= stop_at:
            break
    bar.close()
    logger.close()
    seconds = wall_before + time.perf_counter() - t_start
    return RunSummary(run_dir, step, eval_steps, eval_returns, fails / max(1, solves), seconds)


@contextmanager
def _timed(acc: dict[str, list[float]], tag: str):
    """Add the wall time of the block, in milliseconds, to ``acc[tag]`` (logged as ``time/…_ms``)."""
    t0 = time.perf_counter()
    yield
    acc.setdefault(tag, []).append((time.perf_counter() - t0) * 1e3)


def _network_kwargs(cfg: Config) -> dict:
    n = cfg.network
    return {
        "arch": n.arch,
        "hidden": list(n.hidden),
        "activation": n.activation,
        "action_curvature": n.action_curvature,
        "state_dependent_curvature": n.state_dependent_curvature,
    }
