"""MPC through a learned dynamics model, next to the greedy controller, on the shipped Reacher
checkpoint (Q and model trained together by ``qmpc train launch/reacher.toml``).

    python examples/mpc_learned_model.py [--episodes 10] [--horizon 10]

Prints the per-episode table of both controllers and returns their mean returns (sums of
rewards, i.e. −total cost: higher is better). The same in the shell:
``qmpc run models/reacher.pt --horizon 10 --model learned``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

import qmpc
from qmpc.env import make_env
from qmpc.runner import format_episodes, run_episodes

CHECKPOINT = Path(__file__).resolve().parents[1] / "models" / "reacher.pt"


def main(episodes: int = 10, horizon: int = 10) -> dict[int, float]:
    out = {}
    for h in (1, horizon):
        # horizon 1 is argmin_u Q(x, u); horizon h > 1 plans h − 1 steps through the learned model
        # with Reacher's stage cost (qmpc.costs) and Q as the cost-to-go of the last step
        ctrl = qmpc.Controller.from_checkpoint(CHECKPOINT, horizon=h, model="learned")
        eps, _ = run_episodes(ctrl, make_env(ctrl.env_id), episodes, seed=100)
        print(f"horizon {h}:\n{format_episodes(eps)}\n")
        out[h] = float(np.mean([e.ret for e in eps]))
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--episodes", type=int, default=10)
    ap.add_argument("--horizon", type=int, default=10)
    args = ap.parse_args()
    print(main(args.episodes, args.horizon))
