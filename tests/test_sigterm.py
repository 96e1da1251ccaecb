"""A SIGTERM ends a training run even where a library drops the ``SystemExit`` its handler
raised: Ray's waits in C++ run the signal handlers and, in some paths, swallow what they raise;
``qmpc train --set solver.backend=ray`` then went on training after a SIGTERM (1 run in ~20,
``tests/test_ray_processes.py``'s SIGTERM test timed out in CI)."""

from __future__ import annotations

import os
import signal
import sys

import pytest

from qmpc import distributed
from qmpc.config import config_from_dict
from qmpc.trainer import train


def _cfg(run_dir):
    return config_from_dict(
        {
            "seed": 1,
            "run_dir": str(run_dir),
            "network": {"arch": "PICNN", "hidden": [8]},
            "train": {"mode": "online", "steps": 60, "batch_size": 8, "learning_starts": 12, "eval_every": 60,
                      "eval_episodes": 1, "checkpoint_every": 30, "log_every": 10},
        }
    )  # fmt: skip


@pytest.fixture
def ray_like_sigterm():
    """SIGTERM handled as ``ray.init`` leaves it (``sys.exit``), then given to qmpc's handler as
    :func:`qmpc.distributed.connect` does; restored afterwards."""
    before = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))
    distributed._python_sigterm()
    yield
    signal.signal(signal.SIGTERM, before)
    distributed._Sigterm.signum = None


def _sigterm_here() -> None:
    """SIGTERM to this process, and bytecodes for its handler to run at (it raises ``SystemExit``)."""
    os.kill(os.getpid(), signal.SIGTERM)
    for _ in range(1000):  # the handler runs at the next bytecode boundaries
        pass


def test_a_sigterm_whose_exit_a_library_swallowed_still_ends_the_run(tmp_path, monkeypatch, ray_like_sigterm):
    import qmpc.trainer as trainer

    step, calls = trainer._step, []

    def swallowing_step(st, run):  # the signal arrives inside a call that drops SystemExit
        calls.append(st.step)
        if len(calls) == 20:
            try:
                _sigterm_here()
            except SystemExit:
                pass
        step(st, run)

    monkeypatch.setattr(trainer, "_step", swallowing_step)
    with pytest.raises(SystemExit) as e:
        train(_cfg(tmp_path / "run"), progress=False)
    assert e.value.code == signal.SIGTERM
    assert len(calls) == 20, f"the run went on for {len(calls) - 20} more steps after the SIGTERM"
    assert not (tmp_path / "run" / ".lock").exists()


def test_a_sigterm_that_surfaces_as_another_error_still_exits_with_its_status(tmp_path, monkeypatch, ray_like_sigterm):
    """The handler's ``SystemExit`` raised inside a C call becomes another exception on its way out
    (CI: ``SystemError: <function DM.__array__ …> returned a result with an exception set`` from
    CasADi's SWIG layer, and the driver exited 1 instead of 15)."""
    import qmpc.trainer as trainer

    step, calls = trainer._step, []

    def step_interrupted_in_c(st, run):
        calls.append(st.step)
        if len(calls) == 20:
            try:
                _sigterm_here()
            except SystemExit as e:
                raise SystemError("<function DM.__array__> returned a result with an exception set") from e
        step(st, run)

    monkeypatch.setattr(trainer, "_step", step_interrupted_in_c)
    with pytest.raises(SystemExit) as e:
        train(_cfg(tmp_path / "run"), progress=False)
    assert e.value.code == signal.SIGTERM
    assert isinstance(e.value.__context__, SystemError)  # what surfaced stays visible in the traceback
    assert not (tmp_path / "run" / ".lock").exists()
