"""Issue 17: a refactor of the training code must not change a bit of what training computes.

Short runs of two launch files (InvertedPendulum-v5 with train.target = "double" and a learned
dynamics model; the point mass with "semi") are fingerprinted by ``tests/fingerprint.py`` (SHA-256
of the final weights, the target network, Adam's state and the model; the evaluation returns; the
logged TD losses) and compared with the fingerprints pinned in ``tests/data/``.

History: pinned from the code before issue 17's refactor (commit ca0b627) and unchanged through it;
the IP fingerprint was pinned again once, on purpose, when the batched Newton began to solve batches
of every size (the actor's single state included: a state's argmin no longer depends on its batch).
Both were pinned again on purpose in session 12 (issue 21's faster TD targets: the closed form's
gradient by the reverse pass, its values in place of the network's, fused Adam): rounding-level
changes (the logged TD losses agree to 7 digits, the argmins and values of 2048 closed-loop states of
models/half_cheetah.pt and models/inverted_double_pendulum.pt to 1e-14).
"""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHORT = [
    "train.steps=300",
    "train.learning_starts=100",
    "train.eval_every=150",
    "train.checkpoint_every=150",
    "train.eval_episodes=1",
    "train.log_every=50",
]
"""The overrides of the pinned runs (each takes a few seconds)."""


def _fingerprint_module():
    spec = importlib.util.spec_from_file_location("fingerprint", ROOT / "tests" / "fingerprint.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("name", ["inverted_pendulum", "point_mass"])
def test_training_is_bit_identical_to_the_pinned_fingerprint(tmp_path, name):
    launch = ROOT / "launch" / f"{name}.toml"
    pinned_path = ROOT / "tests" / "data" / f"fingerprint_{name}.json"
    got = _fingerprint_module().fingerprint(str(launch), [f"run_dir={tmp_path / name}", *SHORT])
    pinned = json.loads(pinned_path.read_text())
    differ = sorted(k for k in pinned.keys() | got.keys() if pinned.get(k) != got.get(k))
    sets = " ".join(f"--set {o}" for o in SHORT)
    assert not differ, (
        f"training {launch.name} differs from its pinned fingerprint {pinned_path.relative_to(ROOT)} in {differ}: "
        f"pinned { ({k: pinned.get(k) for k in differ}) }, got { ({k: got.get(k) for k in differ}) }. "
        "A change of the code changed what training computes. Only if the cause is an upgrade of CasADi, torch, "
        "numpy or MuJoCo (check: the same test on the commit before your change, with the new versions, fails "
        f"too), regenerate it: python tests/fingerprint.py launch/{name}.toml --set run_dir=/tmp/fp/{name} {sets} "
        f"--out {pinned_path.relative_to(ROOT)}"
    )
