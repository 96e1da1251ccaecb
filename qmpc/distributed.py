"""Solves on Ray actors: the ``backend="ray"`` of :class:`~qmpc.bridge.ArgminLayer`.

A batch of 8 samples or more is split as the threaded backend splits it (``min(workers, B // 8)``
parts) and each part is evaluated by one of ``workers`` Ray actors (shared by the layers of the
process; smaller evaluations, single rows and cold retries stay in the calling process).

No solver and no twin of the network is sent (CasADi callbacks do not pickle): each actor
receives the network (architecture and ``state_dict``) and the layer's
:class:`~qmpc.problem.MPCSpec` once (bounds, horizon, and the model's ``dynamics`` and
``stage_cost``, CasADi SX/MX functions, which pickle), builds its own twin, problem and solver
(:meth:`qmpc.problem.ControlProblem.of_network`, the same code as the layer), and then receives

* the flat weights ``theta`` (one float64 vector in Ray's object store) when they change, since
  they are a parameter of the problem, and
* the ``state_dict`` when the twin itself must be rebuilt (the input normalisation changed, or
  the weights are baked in).

Each sample is evaluated by the same CasADi function on the same inputs as with threads, so the
results (solutions, values, statuses, sensitivities) are the same (tested to 1e-12; identical to
the bit in every case measured). An actor (or node) that is lost is replaced: the batch at hand is
solved in the calling process, with a warning.

Cluster: with no Ray running, the first layer starts a local one (all cores of this machine).
To use a cluster, start it (``ray start --head`` on one machine, ``ray start --address HEAD:6379``
on the others, qmpc installed on each) and either set ``RAY_ADDRESS=HEAD:6379`` or call
:func:`connect` (``ray.init``) before building the layers. Ray is an optional dependency:
``pip install -e ".[ray]"``.
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import threading
import warnings
from pathlib import Path
from typing import Any

import casadi as ca
import numpy as np
import torch

from qmpc.errors import InputError
from qmpc.networks import QNetwork
from qmpc.problem import ControlProblem, MPCSpec
from qmpc.solver import BatchedSolver, SolverOptions

__all__ = ["RayRunner", "cluster_line", "connect", "import_ray"]


def import_ray():
    """The ``ray`` module, or an :class:`InputError` saying how to install it."""
    try:
        import ray
    except ImportError:
        raise InputError('expected Ray for backend="ray" / qmpc sweep, got no ray: pip install -e ".[ray]"') from None
    return ray


def _check_reachable(address: str) -> None:
    """``HOST:PORT`` must accept a TCP connection (Ray's own connect retries for minutes)."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InputError(f"expected a Ray address as HOST:PORT (port 1-65535) or 'auto', got {address!r}")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as e:
        raise InputError(f"expected a running Ray cluster at {address}, got no connection ({e})") from None


def _auto_address() -> str:
    """``"auto"``: ``$RAY_ADDRESS``, else the cluster that ``ray start`` last started on this
    machine (the address it wrote to ``ray_current_cluster`` in Ray's temporary directory); never
    another process's private Ray, which Ray's own ``"auto"`` joins when it finds no such file."""
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"]
    try:
        from ray._common.utils import get_ray_address_file
    except ImportError:  # Ray < 2.47
        from ray._private.utils import get_ray_address_file
    path = Path(get_ray_address_file(None))
    try:
        address = path.read_text().strip()
    except OSError:
        address = ""
    if not address:
        raise InputError(
            f"expected a Ray cluster started by `ray start --head` on this machine for address 'auto', got none "
            f"({path} names none): start one, or give its HOST:PORT"
        )
    try:
        _check_reachable(address)
    except InputError as e:
        raise InputError(f"address 'auto' is {address!r}, the last cluster `ray start` wrote to {path}: {e}") from None
    return address


class _Local:
    """What this process knows of its connection: the address it joined, or that it started the
    local Ray (stopped by :func:`_at_exit` and watched by a watchdog process)."""

    address: str | None = None
    started = False
    at_exit = False
    watchdog: subprocess.Popen | None = None
    """Held for the life of the process: the watchdog reads the end of its stdin as this process's end."""


def connect(address: str | None = None, num_cpus: int | None = None) -> Any:
    """Connect to Ray once per process: to ``address`` (``HOST:PORT``, ``"auto"``: the cluster
    started on this machine by ``ray start``; default ``$RAY_ADDRESS``), else start a local Ray
    with ``num_cpus`` (default: all cores). Returns the ``ray`` module. An unreachable address
    is an :class:`InputError` before Ray tries to connect.

    A local Ray started here is this process's: it is shut down when the process exits (before
    Ray's own exit handler, so that nothing calls into Ray after it), and a watchdog process
    stops whatever is left of it if the process is killed (``kill -9``)."""
    ray = import_ray()
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address == "auto":
        address = _auto_address()
    elif address:
        _check_reachable(address.removeprefix("ray://"))
    if ray.is_initialized():
        return ray
    kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    if not _Local.at_exit:  # registered after Ray's: runs first
        atexit.register(_at_exit)
        _Local.at_exit = True
    try:
        if address:
            ray.init(address=address, **kw)
        else:
            before = _children()
            ray.init(address="local", num_cpus=num_cpus, **kw)  # never a cluster left by `ray start`
            _watch(sorted(_children() - before))
    except ConnectionError as e:
        raise InputError(f"expected a running Ray cluster at {address!r}, got: {e}") from None
    _Local.address, _Local.started = address, not address
    _python_sigterm()
    return ray


class _Sigterm:
    """The SIGTERM this process received, if any (see :func:`raise_if_terminated`)."""

    signum: int | None = None


def _on_sigterm(signum: int, frame: Any) -> None:
    """Ray's own Python handler (``sys.exit(signum)``), remembering the signal: Ray's calls that
    wait in C++ run the handlers and drop what they raise in some paths, and the process then went
    on training (1 SIGTERM in ~20)."""
    _Sigterm.signum = signum
    sys.exit(signum)


def raise_if_terminated() -> None:
    """``SystemExit(15)`` if a SIGTERM was received and its ``SystemExit`` did not unwind the
    process (a loop calls this once per iteration)."""
    if _Sigterm.signum is not None:
        raise SystemExit(_Sigterm.signum)


def _python_sigterm() -> None:
    """Give SIGTERM back to a Python handler (:func:`_on_sigterm`: ``sys.exit`` as ``ray.init``
    installed), so that a terminated process unwinds and runs its exit handlers
    (:func:`_at_exit`): Ray's core worker puts a crash handler in its place that dumps a C stack
    and aborts."""
    if threading.current_thread() is not threading.main_thread():
        return
    if callable(signal.getsignal(signal.SIGTERM)):
        signal.signal(signal.SIGTERM, _on_sigterm)


def cluster_line() -> str:
    """One line: where this process's Ray is and how many of its CPUs are free now."""
    ray = import_ray()
    total = ray.cluster_resources().get("CPU", 0)
    free = ray.available_resources().get("CPU", 0)
    gcs = ray.get_runtime_context().gcs_address
    if _Local.started:
        where = f"a local Ray started by this process ({gcs})"
    elif _Local.address:
        where = f"joined the Ray cluster at {_Local.address}"
    else:
        where = f"the Ray cluster this process was already connected to ({gcs})"
    return f"{where}: {free:g} of {total:g} CPUs free"


def _at_exit() -> None:
    """At exit, before Ray's own handler: forget the actors and shut down Ray (a local Ray started
    here stops; a cluster is left running). A :class:`RayRunner` collected later finds Ray shut
    down and leaves it alone (calling into Ray then started a new one, or retried a dead GCS
    forever: ``qmpc train --set solver.backend=ray`` hung after its summary)."""
    _ACTORS.clear()
    _SESSION[0] = None
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
    _Local.address, _Local.started = None, False


def _children() -> set[int]:
    try:
        import psutil

        return {p.pid for p in psutil.Process().children()}
    except Exception:  # no psutil (Ray depends on it): no watchdog
        return set()


_WATCHDOG = r"""
import os, selectors, signal, sys, time
import psutil
signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's: it shuts Ray down itself
roots = [psutil.Process(int(p)) for p in sys.argv[1:] if psutil.pid_exists(int(p))]
seen = {}
def scan():
    for r in roots:
        try:
            for p in [r, *r.children(recursive=True)]:
                seen.setdefault(p.pid, p)
        except psutil.Error:
            pass
sel = selectors.DefaultSelector()
sel.register(sys.stdin, selectors.EVENT_READ)
while any(r.is_running() for r in roots):
    scan()
    if sel.select(timeout=1.0) and not os.read(sys.stdin.fileno(), 4096):
        break  # the driver is gone
time.sleep(2.0)  # a clean shutdown needs no help
left = [p for p in seen.values() if p.is_running()]  # is_running: the same process (pid and start time)
for p in left:
    try:
        p.terminate()
    except psutil.Error:
        pass
for p in psutil.wait_procs(left, timeout=3.0)[1]:
    try:
        p.kill()
    except psutil.Error:
        pass
"""


def _watch(roots: list[int]) -> None:
    """Start the watchdog of a local Ray whose node processes are ``roots``: when this process
    dies (even by ``kill -9``) or the node stops, it ends every process of the node still running.
    Ray's own fate-sharing kills the node processes with this one, but its agents (the dashboard's
    and the runtime environments') then hang on their way out and stay."""
    if not roots:
        return
    try:
        _Local.watchdog = subprocess.Popen([sys.executable, "-c", _WATCHDOG, *map(str, roots)], stdin=subprocess.PIPE,
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    except OSError as e:
        warnings.warn(f"no watchdog for the local Ray ({e}): a killed process may leave Ray's agents running",
                      RuntimeWarning, stacklevel=3)  # fmt: skip


class _SolverActor:
    """One Ray actor (one CPU), shared by every layer of the process that created it: one copy of
    each layer's network, problem and solver (one thread), by the layer's key."""

    def __init__(self):
        torch.set_num_threads(1)
        self.layers: dict[int, dict] = {}

    def add(self, key: int, q: QNetwork, spec: MPCSpec, options: SolverOptions, bake: bool, newton: bool) -> None:
        layer = {"q": q, "spec": spec, "bake": bake, "newton": newton}
        self.layers[key] = {**layer, "options": dataclasses.replace(options, workers=1), "theta_key": -1}
        self._build(key)

    def _build(self, key: int) -> None:
        s = self.layers[key]
        problem = ControlProblem.of_network(s["q"], s["spec"], s["bake"], s["newton"])
        s["solver"] = BatchedSolver(problem, s["options"])

    def load(self, key: int, state_dict: dict) -> None:
        """New buffers (or baked weights): rebuild the twin and the solver."""
        self.layers[key]["q"].load_state_dict(state_dict)
        self._build(key)

    def remove(self, key: int) -> None:
        self.layers.pop(key, None)

    def node_id(self) -> str:
        """The Ray node this actor runs on."""
        import ray

        return ray.get_runtime_context().get_node_id()

    def run(self, key: int, method: str, args: list, theta_key: int, theta_box: list) -> list[np.ndarray]:
        """``BatchedSolver.<method>(*args)`` on this actor's solver of layer ``key``."""
        if method not in BatchedSolver.CHUNK_METHODS:
            raise ValueError(f"expected one of {sorted(BatchedSolver.CHUNK_METHODS)}, got {method!r}")
        s = self.layers[key]
        if theta_key != s["theta_key"] and any(isinstance(a, _Theta) for a in args):  # new weights
            import ray

            s["theta"], s["theta_key"] = ca.DM(ray.get(theta_box[0])), theta_key
        args = [s["theta"] if isinstance(a, _Theta) else a for a in args]
        out = getattr(s["solver"], method)(*args)
        return list(out) if isinstance(out, tuple) else [out]


class _Theta:
    """Stands for the current weights in an argument list sent to an actor."""


_ACTORS: list = []
"""This process's solver actors, shared by its layers (two layers with 2 workers use 2 CPUs)."""


_SESSION: list = [None]
"""The Ray session the actors of :data:`_ACTORS` belong to."""


def _session(ray) -> tuple:
    """The current Ray session (job ids start again in a new local Ray: with the node's id)."""
    ctx = ray.get_runtime_context()
    return (ctx.get_job_id(), ctx.get_node_id())


def _actors(n: int) -> list:
    """The first ``n`` of this process's actors, started if needed (in the current Ray session)."""
    ray = import_ray()
    session = _session(ray)
    if session != _SESSION[0]:  # Ray was shut down and started again: the old actors are gone
        _ACTORS.clear()
        _SESSION[0] = session
    cls = ray.remote(num_cpus=1, scheduling_strategy="SPREAD")(_SolverActor)
    while len(_ACTORS) < n:
        _ACTORS.append(cls.remote())
    return _ACTORS[:n]


START_TIMEOUT_S = 120.0
"""How long the actors may take to start (a cluster whose CPUs are all held, e.g. by the trials of
a sweep, would never place them)."""


class RayRunner:
    """A :class:`~qmpc.solver.ChunkRunner` on ``workers`` Ray actors for one layer's problem.

    Args:
        workers: number of actors (each reserves one CPU of the cluster; the actors are shared
            by the layers of this process).
        q, spec, options, bake_weights, newton: what the layer builds its problem from
            (:meth:`qmpc.problem.ControlProblem.of_network`).
    """

    _next_key = 0

    def __init__(
        self, workers: int, q: QNetwork, spec: MPCSpec, options: SolverOptions, bake_weights: bool, newton: bool
    ):
        ray = connect()
        total = int(ray.cluster_resources().get("CPU", 0))
        if workers > total:
            raise InputError(f"expected at most {total} solver actors (the Ray cluster's CPUs), got workers={workers}")
        self.workers = workers
        self.key = RayRunner._next_key
        RayRunner._next_key += 1
        self._spec = (spec, options, bake_weights, newton)
        self._q = q
        self._actors: list | None = None
        self._session = None
        self._theta_obj, self._theta_arr, self._theta_key, self._theta_box = None, None, 0, None
        self.calls = 0
        """Batched evaluations done on the actors."""
        try:
            self._start()
        except ray.exceptions.GetTimeoutError:
            self._drop()
            raise InputError(
                f"expected {workers} free CPUs in the Ray cluster for the solver actors, got none within "
                f"{START_TIMEOUT_S:g} s (held by other tasks, e.g. sweep trials: lower solver.workers, raise "
                f"--cpus-per-trial, or use backend='threads')"
            ) from None
        except ray.exceptions.RayError as e:  # an actor died while it built the problem: new ones on the first call
            _warn_lost(e)
            self._drop()

    def _start(self) -> None:
        """Register this layer's problem with the actors (each builds it from the network)."""
        ray = import_ray()
        self._actors = _actors(self.workers)
        self._session = _SESSION[0]
        ray.get([a.add.remote(self.key, self._q, *self._spec) for a in self._actors], timeout=START_TIMEOUT_S)
        self._theta_obj, self._theta_arr = None, None  # the actors hold no weights for it yet

    def _drop(self) -> None:
        """Stop this runner's actors (after a failure; they are replaced together on the next call)."""
        ray = import_ray()
        for a in self._actors or []:
            ray.kill(a)
        _ACTORS[:] = [a for a in _ACTORS if not any(a is b for b in self._actors or [])]
        self._actors = None

    def rebuild(self, q: QNetwork) -> None:
        """The layer rebuilt its problem (buffers or baked weights changed): so do the actors."""
        ray = import_ray()
        self._q = q
        if self._actors is None:
            return
        state = ray.put({k: v.detach().cpu() for k, v in q.state_dict().items()})
        try:
            ray.get([a.load.remote(self.key, state) for a in self._actors])
        except ray.exceptions.RayError:  # a lost actor: new ones get the network as it is now
            self._drop()

    def run(self, method: str, chunks: list[list]) -> list[list[np.ndarray]] | None:
        """Each chunk on its own actor; ``None`` if an actor or its node was lost (the solver then
        evaluates the batch itself, and new actors are started for the next call)."""
        ray = import_ray()
        try:
            if self._actors is None:
                self._start()
            theta_pos = [i for i, a in enumerate(chunks[0]) if isinstance(a, ca.DM)]
            for i in theta_pos:
                self._put_theta(chunks[0][i])
            refs = []
            for k, args in enumerate(chunks):
                sent = [_Theta() if i in theta_pos else a for i, a in enumerate(args)]
                actor = self._actors[k % self.workers]
                refs.append(actor.run.remote(self.key, method, sent, self._theta_key, self._theta_box))
            parts = ray.get(refs)
            self.calls += 1
            return parts
        except SystemExit:  # a SIGTERM while Ray waited: Ray raises SystemExit(1)
            raise_if_terminated()
            raise
        except ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, RuntimeError):  # an evaluation inside CasADi raised, as it would here
                raise RuntimeError(str(e.cause)) from None
            raise
        except ray.exceptions.RayError as e:  # the actor, its worker or its node died; a timeout
            _warn_lost(e, "this batch is solved locally")
            self._drop()
            return None

    def _put_theta(self, theta: ca.DM) -> None:
        """Send the weights when they change: the layer keeps one DM per change of its weights, so
        identity settles most calls; a new DM with the same values is not sent again either."""
        if theta is self._theta_obj:
            return
        ray = import_ray()
        arr = np.asarray(theta, dtype=float).reshape(-1)
        self._theta_obj = theta
        if self._theta_arr is not None and np.array_equal(arr, self._theta_arr):
            return
        self._theta_arr, self._theta_key = arr, self._theta_key + 1
        self._theta_box = [ray.put(arr)]

    def close(self) -> None:
        """Drop this layer's problem from the actors. Nothing is sent once Ray is shut down, or to
        the actors of an earlier Ray session (a call would start Ray again)."""
        actors, self._actors = self._actors, None
        ray = sys.modules.get("ray")
        if not actors or ray is None or not ray.is_initialized() or self._session != _session(ray):
            return
        for a in actors:
            a.remove.remote(self.key)

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass


def _warn_lost(e: Exception, then: str = "new ones start on the next batch") -> None:
    warnings.warn(f"Ray solver actors lost ({type(e).__name__}); {then}", RuntimeWarning, stacklevel=3)
