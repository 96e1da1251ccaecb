"""Issue 17, item 3: what ``pyproject.toml`` declares matches what the code uses."""

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

FEATURES = [
    # (distribution, text in the source, lowest version that has it, what it is)
    (
        "numpy",
        "numpy._core",
        "2.0",
        "numpy._core (numpy.core before 2.0; 1.26's stub re-exports numpy.core's objects, whose names do not "
        "match the numpy._core.multiarray._reconstruct that numpy-2 pickles of old checkpoints reference)",
    ),
    ("numpy", "np.dtypes.", "1.25", "numpy.dtypes"),
    ("torch", "torch.serialization.safe_globals(", "2.5", "the torch.serialization.safe_globals context manager"),
    ("torch", "add_safe_globals(", "2.4", "torch.serialization.add_safe_globals"),
    ("torch", "get_unsafe_globals_in_checkpoint(", "2.6", "torch.serialization.get_unsafe_globals_in_checkpoint"),
    ("torch", "from torch.func import", "2.0", "torch.func"),
    ("python", "import tomllib", "3.11", "tomllib"),
]
"""Features whose lowest version is above an older floor; a feature found in ``qmpc/`` sets the
package's floor, one found only in ``tests/`` the floor of the ``test`` extra (or the package's)."""


def _declared_floor(name: str, extra: str | None = None) -> Version | None:
    """The lowest version ``pyproject.toml`` accepts for ``name`` (None: no ``>=`` bound)."""
    if name == "python":
        specs = [PYPROJECT["project"]["requires-python"]]
    else:
        reqs = PYPROJECT["project"]["dependencies"]
        if extra:
            reqs = reqs + PYPROJECT["project"]["optional-dependencies"][extra]
        specs = [str(r.specifier) for r in map(Requirement, reqs) if r.name == name]
    floors = [Version(v) for s in specs for v in re.findall(r">=\s*([\w.]+)", s)]
    return max(floors, default=None)


def _sources(where: str) -> dict[str, str]:
    return {str(p.relative_to(ROOT)): p.read_text() for p in sorted((ROOT / where).rglob("*.py"))}


def test_feature_table_names_real_features():
    """The table's texts name things that exist (a misspelt one would never be found)."""
    import numpy as np
    import torch

    assert hasattr(torch.serialization, "safe_globals") and hasattr(torch.serialization, "add_safe_globals")
    assert hasattr(torch.serialization, "get_unsafe_globals_in_checkpoint") and hasattr(np, "dtypes")
    from numpy._core.multiarray import _reconstruct  # noqa: F401


@pytest.mark.parametrize("dist", sorted({f[0] for f in FEATURES}))
def test_declared_minimum_versions_cover_the_features_used(dist):
    package, tests = _sources("qmpc"), {**_sources("tests"), **_sources("benchmarks"), **_sources("examples")}
    tests = {k: v for k, v in tests.items() if k != "tests/test_repository_consistency.py"}  # this table
    for sources, extra in ((package, None), (tests, "test")):
        features = [(Version(v), text, what) for d, text, v, what in FEATURES if d == dist]
        used = [(v, what, f) for v, text, what in features for f, s in sources.items() if text in s]
        if not used:
            continue
        need, what, file = max(used)
        have = _declared_floor(dist, extra)
        assert have is not None, f"expected a lower bound for {dist} in pyproject.toml, got none"
        assert have >= need, (
            f"expected {dist} >= {need} in pyproject.toml{f' (the {extra} extra)' if extra else ''}: "
            f"{file} uses {what}; got >= {have}"
        )


def test_dependencies_are_ranges_not_pins():
    for r in map(Requirement, PYPROJECT["project"]["dependencies"]):
        assert not any(s.operator in ("==", "===") for s in r.specifier), f"expected a range for {r.name}, got {r}"
