"""The built-in default job (``qmpc demo``): learn the cost-to-go of the point mass offline from
random data, compare it with the Riccati ground truth, and run it in closed loop.

1. collect random transitions of ``qmpc/PointMass-v0`` as a Minari dataset;
2. train a ``QuadraticQ`` offline with TD targets through the CasADi argmin;
3. report the relative error of its Hessian in ``(x, u)`` against the exact LQR Q-function;
4. run the learned controller (horizon 1, and horizon 5 through the exact model) next to the
   LQR controller ``u = clip(−K x)``, print a table and write plots.

Its outputs are ``OUT/data``, ``OUT/run`` and ``OUT/rollout.png``; ``OUT/.qmpc-demo`` marks the
directory as the demo's, whose outputs a later demo replaces. Outputs in a directory without the
mark (a user's dataset or run) are never deleted unless asked (``--overwrite``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

from qmpc.checkpoint import load_checkpoint, network_from_checkpoint
from qmpc.config import config_from_dict
from qmpc.controller import Controller
from qmpc.data import collect
from qmpc.env import make_env
from qmpc.errors import InputError
from qmpc.lqr import dare, lqr_q_matrix
from qmpc.networks import QNetwork
from qmpc.runner import format_episodes, plot_rollout, run_episodes
from qmpc.trainer import train

__all__ = ["DEMO_CONFIG", "DEMO_MARKER", "DEMO_OUTPUTS", "prepare_out_dir", "riccati_hessian_error", "run_demo"]

DEMO_OUTPUTS = ("data", "run", "rollout.png")
"""What the demo writes in its output directory (and replaces when it runs again)."""
DEMO_MARKER = ".qmpc-demo"
"""The file that marks an output directory as the demo's."""

DEMO_CONFIG = {
    "seed": 0,
    "env": {"id": "qmpc/PointMass-v0"},
    "network": {
        "arch": "QuadraticQ",
        "hidden": [],
        "activation": "tanh",
        "action_curvature": 0.01,
        "state_dependent_curvature": False,
        "layer_norm": False,
        "obs_normalization": "whiten",
    },
    "solver": {
        "plugin": "sqpmethod",
        "max_iter": 50,
        "tol": 1e-8,
        "workers": 0,
        "warm_start": True,
        "newton": True,
        "max_fail_frac": 0.5,
        "fail_window": 100,
    },
    "train": {
        "mode": "offline",
        "steps": 3000,
        "batch_size": 256,
        "lr": 0.03,
        "lr_schedule": "linear",
        "gamma": 0.9,
        "tau": 0.1,
        "target": "semi",
        "learning_starts": 0,
        "updates_per_step": 1,
        "exploration_noise": 0.1,
        "buffer_size": 200000,
        "grad_clip": 10.0,
        "cost_scale": 1.0,
        "eval_every": 1000,
        "eval_episodes": 5,
        "checkpoint_every": 2000,
        "log_every": 100,
        "dtype": "float64",
    },
}
"""The demo's training configuration (``launch/point_mass_offline.toml`` holds the same)."""


def riccati_hessian_error(q: QNetwork, env, gamma: float) -> float:
    """Relative Frobenius error of the Hessian of ``q`` in ``(x, u)`` (at the origin) against
    the exact LQR Q-function ``[x; u]ᵀ M [x; u]`` of the point mass, whose Hessian is ``2M``."""
    u = env.unwrapped
    A, B = u.linear_dynamics()
    M = lqr_q_matrix(A, B, u.Qc, u.R, gamma)
    nx = A.shape[0]
    z = torch.zeros(M.shape[0], dtype=torch.float64)
    qd = q.double()
    H = torch.autograd.functional.hessian(lambda zz: qd(zz[None, :nx], zz[None, nx:])[0], z).numpy()
    return float(np.linalg.norm(H - 2 * M) / np.linalg.norm(2 * M))


class _LQR:
    """``u = clip(−K x)``, with the Controller's ``act``/``reset`` interface, for reference."""

    def __init__(self, K, low, high):
        self.K, self.low, self.high = K, low, high
        self.reset()

    def reset(self):
        self.stats = {"steps": 0, "failed": 0, "overrun": 0, "fallback": 0}

    def act(self, obs):
        return np.clip(-self.K @ obs, self.low, self.high), {"solve_ms": 0.0}


def prepare_out_dir(out: str | Path, overwrite: bool = False) -> Path:
    """Make ``out`` the demo's output directory: remove the :data:`DEMO_OUTPUTS` that an earlier
    demo wrote there (the directory holds :data:`DEMO_MARKER`), or with ``overwrite`` whatever
    is at those names, and mark the directory. Anything else in ``out`` is left alone. Outputs
    that no demo wrote are an :class:`InputError` (nothing is deleted)."""
    from qmpc.data import ensure_dir

    out = Path(out)
    marker = out / DEMO_MARKER
    found = [out / name for name in DEMO_OUTPUTS if (out / name).exists() or (out / name).is_symlink()]
    if found and not overwrite and not marker.is_file():
        names = ", ".join(str(p) for p in found)
        raise InputError(
            f"expected --out {out} to be a new directory or an earlier qmpc demo's (marked by {marker}), "
            f"got {names} not written by qmpc demo; choose another --out, or pass --overwrite to delete them"
        )
    ensure_dir(out, "the demo's output directory (--out)")
    for p in found:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    marker.write_text(json.dumps({"written_by": "qmpc demo", "outputs": list(DEMO_OUTPUTS)}) + "\n")
    return out


def run_demo(
    out: Path,
    steps: int = 3000,
    data_steps: int = 10000,
    progress: bool = True,
    episodes: int = 5,
    overwrite: bool = False,
) -> int:
    """Run the demo in ``out`` (see the module docstring); ``overwrite``: replace ``out/data``,
    ``out/run`` and ``out/rollout.png`` even when no demo wrote them."""
    out = prepare_out_dir(out, overwrite)
    cfg_dict = {
        **DEMO_CONFIG,
        "run_dir": str(out / "run"),
        "train": {**DEMO_CONFIG["train"], "steps": steps, "dataset": str(out / "data")},
    }
    cfg = config_from_dict(cfg_dict)
    env = make_env(cfg.env.id, seed=cfg.seed)
    print("qmpc demo: learn the cost-to-go of a point mass (cost = −reward, minimised) from random data")
    rng = np.random.default_rng(cfg.seed)
    low, high = env.action_space.low.astype(float), env.action_space.high.astype(float)
    collect(env, lambda o: rng.uniform(low, high), data_steps, out / "data", seed=cfg.seed)
    print(f"1. collected {data_steps} random transitions -> {out / 'data'} (Minari)")

    s = train(cfg, progress=progress)
    print(
        f"2. trained QuadraticQ offline for {s.steps} steps in {s.seconds:.0f} s "
        f"(failed solves masked: {100 * s.fail_frac:.2f} %)"
    )

    ckpt = s.run_dir / "checkpoint.pt"
    q = network_from_checkpoint(load_checkpoint(ckpt))
    err = riccati_hessian_error(q, env, cfg.train.gamma)
    print(f"3. Hessian of the learned Q vs the Riccati Q-function: relative error {100 * err:.2f} %")

    u = env.unwrapped
    A, B = u.linear_dynamics()
    _, K = dare(A, B, u.Qc, u.R, cfg.train.gamma)
    f, c = u.casadi_model()
    rows = []
    for name, ctrl in (
        ("learned Q, horizon 1", Controller.from_checkpoint(ckpt)),
        ("learned Q, horizon 5", Controller.from_checkpoint(ckpt, horizon=5, dynamics=f, stage_cost=c)),
        ("LQR u = clip(-Kx)", _LQR(K, low, high)),
    ):
        eps, _ = run_episodes(ctrl, env, episodes, seed=1000)
        rows.append((name, eps))
        if name.startswith("learned Q, horizon 1"):
            print(format_episodes(eps))
            plot_rollout(eps[0], low, high, out / "rollout.png", title=f"point mass, {name}")
    print("4. closed loop, mean return over", episodes, "episodes (= −total cost; higher is better):")
    for name, eps in rows:
        r = np.array([e.ret for e in eps])
        ms = np.concatenate([e.solve_ms for e in eps])
        print(f"   {name:<22} {r.mean():9.3f} ± {r.std():.3f}   controller p50 {np.percentile(ms, 50):.2f} ms")
    print(f"plots: {s.run_dir / 'learning_curve.png'}, {out / 'rollout.png'}; checkpoint: {ckpt}")
    return 0
