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

import dataclasses
import os
import socket
import warnings
from typing import Any

import casadi as ca
import numpy as np
import torch

from qmpc.errors import InputError
from qmpc.networks import QNetwork
from qmpc.problem import ControlProblem, MPCSpec
from qmpc.solver import BatchedSolver, SolverOptions

__all__ = ["RayRunner", "connect", "import_ray"]


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
    if not host or not port.isdigit():
        raise InputError(f"expected a Ray address as HOST:PORT or 'auto', got {address!r}")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as e:
        raise InputError(f"expected a running Ray cluster at {address}, got no connection ({e})") from None


def connect(address: str | None = None, num_cpus: int | None = None) -> Any:
    """Connect to Ray once per process: to ``address`` (``HOST:PORT``, ``"auto"``: the cluster
    started on this machine by ``ray start``; default ``$RAY_ADDRESS``), else start a local Ray
    with ``num_cpus`` (default: all cores). Returns the ``ray`` module. An unreachable address
    is an :class:`InputError` before Ray tries to connect."""
    ray = import_ray()
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address and address != "auto":
        _check_reachable(address.removeprefix("ray://"))
    if ray.is_initialized():
        return ray
    kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    try:
        if address:
            ray.init(address=address, **kw)
        else:
            ray.init(address="local", num_cpus=num_cpus, **kw)  # never a cluster left by `ray start`
    except ConnectionError as e:
        raise InputError(f"expected a running Ray cluster at {address!r}, got: {e}") from None
    return ray


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


def _actors(n: int) -> list:
    """The first ``n`` of this process's actors, started if needed (in the current Ray session)."""
    ray = import_ray()
    ctx = ray.get_runtime_context()
    session = (ctx.get_job_id(), ctx.get_node_id())  # job ids start again in a new local Ray
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

    def _start(self) -> None:
        """Register this layer's problem with the actors (each builds it from the network)."""
        ray = import_ray()
        self._actors = _actors(self.workers)
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
        except ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, RuntimeError):  # an evaluation inside CasADi raised, as it would here
                raise RuntimeError(str(e.cause)) from None
            raise
        except ray.exceptions.RayError as e:  # the actor, its worker or its node died; a timeout
            warnings.warn(f"Ray solver actors lost ({type(e).__name__}); this batch is solved locally",
                          RuntimeWarning, stacklevel=2)  # fmt: skip
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
        """Drop this layer's problem from the actors."""
        if self._actors:
            import_ray()
            for a in self._actors:
                a.remove.remote(self.key)
        self._actors = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown, Ray already stopped
            pass
