"""Regenerate ``qmpc/data/golden.json`` (run only on purpose: the point of the file is to catch a
CasADi or torch upgrade that changes these numbers).

    python tests/make_golden.py
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from qmpc.check import _golden_layer, golden_outputs, make_network

CASES = [
    ("quadratic_h1_mixed", "QuadraticQ", 1, [-0.2, -1.0], [0.1, 1.0]),
    ("picnn_h1_mixed", "PICNN", 1, [-0.2, -2.0], [0.05, 2.0]),
    ("mlpq_h3_mixed", "MLPQ", 3, [-0.1, -2.0], [0.1, 2.0]),
]


def main() -> None:
    cases = []
    for name, arch, horizon, low, high in CASES:
        q = make_network(arch, 3, 2, seed=7, hidden=(4,))
        g = torch.Generator().manual_seed(7)
        case = {
            "name": name,
            "arch": arch,
            "obs_dim": 3,
            "act_dim": 2,
            "hidden": [4],
            "action_curvature": 0.5,
            "horizon": horizon,
            "model_seed": 7,
            "discount": 0.9,
            "low": low,
            "high": high,
            "theta": q.flat_parameters().tolist(),
            "x": torch.randn(3, 3, generator=g, dtype=torch.float64).tolist(),
        }
        layer, x = _golden_layer(case)
        case["expected"] = golden_outputs(layer, x)
        print(name, "status", layer.last_result.status, "u*", np.round(case["expected"]["u_star"], 4).tolist())
        cases.append(case)
    path = Path(__file__).resolve().parents[1] / "qmpc" / "data" / "golden.json"
    path.write_text(
        json.dumps({"about": "seeded solver/sensitivity outputs; see tests/make_golden.py", "cases": cases})
    )
    print("wrote", path)


if __name__ == "__main__":
    main()
