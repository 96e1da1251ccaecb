"""``backend="ray"``: a batch split over Ray actors gives the threaded backend's results."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import qmpc
from qmpc.check import linear_model, make_network, mlp_model

ray = pytest.importorskip("ray")

NX, NU, B = 4, 2, 64


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    from qmpc.distributed import connect

    connect(num_cpus=2)
    yield
    ray.shutdown()


def _pair(arch: str, horizon: int, model: str, newton: bool, bounds: str = "mixed"):
    """The same network and problem with 2 threads and with 2 Ray actors, and 64 states."""
    q = make_network(arch, NX, NU, 0)
    n_p = 2 * NX if model == "mlp-tv" else 0
    f, c = linear_model(NX, NU, 0)[:2] if model == "linear" else mlp_model(NX, NU, 0, n_p)
    kw = dict(horizon=horizon, dynamics=f, stage_cost=c, discount=0.9, dynamics_params=n_p, newton=newton)
    x = torch.randn(B, NX, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    wide = qmpc.ArgminLayer(q, -1e3, 1e3, tol=1e-10, workers=1, **kw)
    wide.model_params = 0.1 * np.random.default_rng(0).normal(size=(horizon - 1) * n_p)
    wide(x, grad_mode="none")
    first = wide.last_result.plan[:, 0]  # a box that holds the first action at a bound for ~60 % of x
    low, high = np.array([np.quantile(first, 0.3), -1e3]), np.array([np.quantile(first, 0.7), 1e3])
    layers = [qmpc.ArgminLayer(q, low, high, tol=1e-10, workers=2, backend=b, **kw) for b in ("threads", "ray")]
    p = 0.1 * np.random.default_rng(0).normal(size=(horizon - 1) * n_p)
    for layer in layers:
        layer.model_params = p.copy()
    return layers, x


def _run(layer, x, seed: int = 1):
    """Solution, value, status, residual and the gradients in θ and x of a random functional; on
    Ray, the forward and the backward must have used the actors (no local fallback)."""
    calls = layer.solver.runner.calls if layer.backend == "ray" else 0
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="Ray solver actors lost")
        out = _solve_and_differentiate(layer, x, seed)
    if layer.backend == "ray":
        # the adjoint's Hessians and the plugin's solves, unless the batched Newton solved it here
        # (then the Hessians are the network's closed form: nothing goes to the actors)
        assert layer.solver.runner.calls >= calls + (0 if layer.planner.newton_path else 2)
    return out


def _solve_and_differentiate(layer, x, seed):
    rng = np.random.default_rng(seed)
    cu, cv = torch.as_tensor(rng.normal(size=(B, NU))), torch.as_tensor(rng.normal(size=B))
    xg = x.clone().requires_grad_(True)
    layer.q.zero_grad()
    u, v = layer(xg)
    ((cu * u).sum() + (cv * v).sum()).backward()
    r = layer.last_result
    g = torch.cat([p.grad.reshape(-1) for p in layer.q.parameters()]).numpy()
    return {"u": u.detach().numpy(), "v": v.detach().numpy(), "status": r.status, "res": r.kkt_residual,
            "plan": r.plan, "grad_theta": g, "grad_x": xg.grad.numpy()}  # fmt: skip


def _assert_same(a: dict, b: dict) -> None:
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=0, atol=1e-12, err_msg=k)


@pytest.mark.parametrize(
    "arch,horizon,model,newton",
    [
        ("PICNN", 1, "linear", False),
        ("PICNN", 1, "linear", True),
        ("MLPQ", 1, "linear", False),
        ("PICNN", 3, "linear", False),
        ("PICNN", 3, "mlp-tv", False),
    ],
)
def test_ray_matches_threads(arch, horizon, model, newton):
    (threads, on_ray), x = _pair(arch, horizon, model, newton)
    assert on_ray.solver.runner is not None and len(on_ray.solver._chunks(B)) == 2
    a, b = _run(threads, x), _run(on_ray, x)
    _assert_same(a, b)
    assert qmpc.Status.ok(a["status"]).all()
    lbw, ubw = threads.lbw[0], threads.ubw[0]
    assert ((a["plan"][:, 0] <= lbw) | (a["plan"][:, 0] >= ubw)).any()  # bounds are active somewhere


def test_ray_follows_weight_and_buffer_changes():
    """New weights travel as theta, new normalisation buffers as a state_dict (the actors rebuild)."""
    (threads, on_ray), x = _pair("PICNN", 3, "linear", False)
    q = threads.q
    _run(on_ray, x)
    with torch.no_grad():
        for p in q.parameters():
            p.add_(0.05 * torch.randn_like(p))
    _assert_same(_run(threads, x), _run(on_ray, x))
    q.set_input_normalization(torch.full((NX,), 0.1, dtype=torch.float64), 0.5 * torch.eye(NX, dtype=torch.float64))
    a, b = _run(threads, x), _run(on_ray, x)
    _assert_same(a, b)
    assert np.abs(a["v"] - _run(qmpc.ArgminLayer(q, threads.low, threads.high, **_kw(threads)), x)["v"]).max() < 1e-9


def _kw(layer) -> dict:
    k = layer.spec
    return dict(horizon=k.horizon, dynamics=k.dynamics, stage_cost=k.stage_cost, discount=k.discount,
                tol=1e-10, workers=1, newton=False)  # fmt: skip


def test_dead_actor_is_replaced_and_the_batch_solved_here():
    (threads, on_ray), x = _pair("PICNN", 1, "linear", False)
    ref = _run(threads, x)
    ray.kill(on_ray.solver.runner._actors[1])
    with pytest.warns(RuntimeWarning, match="actors lost"):
        _assert_same(ref, _solve_and_differentiate(on_ray, x, 1))
    _assert_same(ref, _run(on_ray, x))  # on new actors, without a fallback
    assert len(on_ray.solver.runner._actors) == 2


def test_ray_backend_bad_input():
    q = make_network("PICNN", NX, NU, 0)
    with pytest.raises(qmpc.InputError, match="at most 2 solver actors"):
        qmpc.ArgminLayer(q, -1.0, 1.0, workers=3, backend="ray")
    with pytest.raises(qmpc.InputError, match="backend in"):
        qmpc.ArgminLayer(q, -1.0, 1.0, backend="dask")
    with pytest.raises(qmpc.InputError, match="wall-time"):
        qmpc.ArgminLayer(q, -1.0, 1.0, workers=1, backend="ray", max_wall_ms=10.0)


_TWO_NODES = """
import faulthandler
import os
import sys
import time
import ray
sys.path.insert(0, {tests!r})
from test_ray_backend import _assert_same, _pair, _run
from qmpc.distributed import _at_exit, connect

connect("127.0.0.1:{port}")
for _ in range(120):  # the second node joins
    if len([n for n in ray.nodes() if n["Alive"]]) == 2:
        break
    time.sleep(1)
(threads, on_ray), x = _pair("PICNN", 3, "linear", False)
_assert_same(_run(threads, x), _run(on_ray, x))
nodes = {{ray.get(a.node_id.remote()) for a in on_ray.solver.runner._actors}}
assert len(nodes) == 2, nodes
print("two nodes, same results", flush=True)
faulthandler.enable()
_at_exit()  # qmpc's exit path, as at the end of a run: Ray shut down, the cluster left running
print("shut down", flush=True)
os._exit(0)  # not the interpreter's teardown after Ray: see the test's docstring
"""


def test_two_ray_nodes_on_this_machine():
    """The multi-node path: ``ray start --head`` + ``ray start --address`` (one CPU each; ``--block``
    so that this test stops exactly these nodes) and a process that connects to them: the two
    actors land on different nodes and the results are still the threaded backend's, and qmpc's
    exit path (:func:`qmpc.distributed._at_exit`) shuts the connection down without a crash. The
    process then leaves with ``os._exit``: once in CI (stop 52) it printed its result and then died
    of SIGSEGV with nothing on stderr, in the interpreter's teardown after Ray (0 of 65 times here,
    with and without load), which is Ray's C++ and not what this test is for."""
    import os
    import shutil
    import signal
    import subprocess
    import sys
    import time

    from qmpc.distributed import _check_reachable

    ray_cli = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": ""}
    port, common = "6391", ["--num-cpus", "1", "--disable-usage-stats", "--block"]
    nodes = []

    def start(*args):
        nodes.append(subprocess.Popen([ray_cli, "start", *args, *common], env=env, start_new_session=True,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))  # fmt: skip

    try:
        start("--head", "--port", port, "--include-dashboard", "false")
        for _ in range(120):
            try:
                _check_reachable(f"127.0.0.1:{port}")
                break
            except qmpc.InputError:
                time.sleep(1)
        start("--address", f"127.0.0.1:{port}")
        script = _TWO_NODES.format(tests=str(Path(__file__).parent), port=port)
        r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0 and "two nodes, same results\nshut down" in r.stdout, (r.returncode, r.stderr[-3000:])
    finally:
        for p in reversed(nodes):
            os.killpg(p.pid, signal.SIGTERM)
            p.wait(timeout=60)


def test_training_on_ray_gives_the_threaded_weights(tmp_path):
    """``solver.backend = "ray"`` in a run: the same weights bit for bit as 2 threads."""
    from qmpc.checkpoint import load_checkpoint
    from qmpc.config import config_from_dict
    from qmpc.trainer import train

    runs = []
    for backend in ("threads", "ray"):
        cfg = config_from_dict(
            {
                "seed": 1,
                "run_dir": str(tmp_path / backend),
                "network": {"arch": "QuadraticQ", "hidden": [8]},
                "solver": {"workers": 2, "backend": backend},
                "train": {
                    "steps": 40,
                    "batch_size": 16,
                    "learning_starts": 20,
                    "eval_every": 40,
                    "eval_episodes": 1,
                    "checkpoint_every": 40,
                },
            }
        )
        train(cfg, progress=False)
        runs.append(load_checkpoint(tmp_path / backend / "checkpoint.pt")["q"])
    for k in runs[0]:
        torch.testing.assert_close(runs[0][k], runs[1][k], rtol=0, atol=0)
