"""Issue 3: configs, TD target modes, masking, datasets, checkpoints and exact resume."""

from pathlib import Path

import numpy as np
import pytest
import torch

import qmpc
from qmpc.check import make_network
from qmpc.checkpoint import CheckpointError, load_checkpoint
from qmpc.config import config_from_dict, config_to_toml, load_config
from qmpc.data import Batch, collect, load_minari
from qmpc.env import make_env
from qmpc.losses import td_loss
from qmpc.trainer import read_metrics, train


def _tiny_batch(nx=3, nu=2, B=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Batch(
        torch.randn(B, nx, generator=g, dtype=torch.float64),
        torch.rand(B, nu, generator=g) - 0.5,
        torch.rand(B, generator=g),
        torch.randn(B, nx, generator=g, dtype=torch.float64),
        torch.tensor([0.0, 1.0, 0.0, 0.0])[:B],
    )


def _flat_grad(q):
    return torch.cat([p.grad.reshape(-1) for p in q.parameters()]).numpy()


@pytest.mark.parametrize("mode", ["residual", "double"])
def test_td_gradient_matches_finite_differences(mode):
    """The gradient through the min (residual) and through u* (double) is the FD gradient of the loss."""
    q = make_network("PICNN", 3, 2, seed=1)
    q_t = make_network("PICNN", 3, 2, seed=2)
    kw = dict(tol=1e-13)
    online = qmpc.ArgminLayer(q, -0.5 * torch.ones(2), 0.5 * torch.ones(2), **kw)
    target = qmpc.ArgminLayer(q_t, -0.5 * torch.ones(2), 0.5 * torch.ones(2), **kw)
    batch = _tiny_batch()
    q.zero_grad()
    td_loss(q, q_t, online, target, batch, 0.9, mode).loss.backward()
    g = _flat_grad(q)
    theta = q.flat_parameters()
    rng = np.random.default_rng(0)
    for _ in range(3):
        d = rng.normal(size=theta.shape)
        d /= np.linalg.norm(d)
        vals = []
        for s in (1, -1):
            q.load_flat_parameters(theta + s * 1e-5 * d)
            with torch.no_grad():
                vals.append(float(td_loss(q, q_t, online, target, batch, 0.9, mode).loss))
        q.load_flat_parameters(theta)
        fd = (vals[0] - vals[1]) / 2e-5
        assert abs(g @ d - fd) <= 1e-6 * (1 + abs(fd))


def test_double_detached_is_double_without_the_path_through_u_star():
    """``double_detached`` has ``double``'s loss and target, and the gradient of ``(Q(x, u) − y)²``
    with ``y = c + γ Q_target(x⁺, u*)`` held fixed; ``double`` adds a term through ``∂u*/∂θ``."""
    q, q_t = make_network("PICNN", 3, 2, seed=1), make_network("PICNN", 3, 2, seed=2)
    online, target = (qmpc.ArgminLayer(n, -0.5, 0.5, tol=1e-12) for n in (q, q_t))
    b = _tiny_batch()
    out = {}
    for mode in ("double_detached", "double"):
        q.zero_grad()
        res = td_loss(q, q_t, online, target, b, 0.9, mode)
        res.loss.backward()
        out[mode] = res, _flat_grad(q)
        if mode == "double_detached":
            assert all(p.grad is None for p in q_t.parameters())
    (r_d, g_d), (r_dd, g_dd) = out["double"], out["double_detached"]
    assert r_dd.loss.item() == pytest.approx(r_d.loss.item(), rel=1e-12)
    assert r_dd.target_mean == pytest.approx(r_d.target_mean, rel=1e-12)
    with torch.no_grad():
        u_star, _ = online(b.next_obs)
        y = b.cost + 0.9 * (1 - b.terminated) * q_t(b.next_obs, u_star)
    q.zero_grad()
    ((q(b.obs, b.act) - y) ** 2).mean().backward()
    np.testing.assert_allclose(g_dd, _flat_grad(q), rtol=1e-5, atol=1e-10)  # float32 costs in the batch
    assert np.linalg.norm(g_d - g_dd) > 1e-3 * np.linalg.norm(g_dd)  # the term through u* is there


def test_semi_target_is_detached_and_terminated_does_not_bootstrap():
    q, q_t = make_network("PICNN", 3, 2, seed=1), make_network("PICNN", 3, 2, seed=2)
    online = qmpc.ArgminLayer(q, -1, 1)
    target = qmpc.ArgminLayer(q_t, -1, 1)
    b = _tiny_batch()
    res = td_loss(q, q_t, online, target, b, 0.9, "semi")
    res.loss.backward()
    assert all(p.grad is None for p in q_t.parameters())
    with torch.no_grad():
        _, v = target(b.next_obs)
        y = b.cost + 0.9 * (1 - b.terminated) * v
        assert abs(res.target_mean - float(y.mean())) < 1e-7  # float32 costs in the batch
    assert y[1] == b.cost[1]  # the terminated sample


@pytest.mark.parametrize("mode", ["semi", "residual", "double", "double_detached"])
def test_failed_solves_are_masked_and_counted(mode):
    """Some samples fail (one SQP iteration, no retry): the loss and its gradient are those of
    the usable samples alone, as if the failed ones were not in the batch."""
    g = torch.Generator().manual_seed(0)
    x, xn = (torch.randn(8, 3, generator=g, dtype=torch.float64) for _ in range(2))
    batch = Batch(x, 0.4 * torch.rand(8, 2, generator=g) - 0.2, torch.rand(8, generator=g), xn, torch.zeros(8))
    q, q_t = make_network("PICNN", 3, 2, seed=1), make_network("PICNN", 3, 2, seed=1)
    with torch.no_grad():
        for p in q.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g, dtype=p.dtype))

    def loss_and_grad(b: Batch, **kw):
        online, target = (qmpc.ArgminLayer(n, -0.2, 0.2, **kw) for n in (q, q_t))
        q.zero_grad()
        res = td_loss(q, q_t, online, target, b, 0.9, mode)
        res.loss.backward()
        return res, _flat_grad(q), (target if mode == "semi" else online).last_result.status

    res, grad, status = loss_and_grad(batch, max_iter=1, retry=False, newton=False)
    ok = qmpc.Status.ok(status)
    assert 0 < ok.sum() < len(ok), status  # a partial failure, not all or nothing
    assert res.fail_frac == pytest.approx(1 - ok.mean())
    usable = Batch(*(t[torch.from_numpy(ok)] for t in batch[:5]))
    ref, ref_grad, ref_status = loss_and_grad(usable, tol=1e-12)
    assert qmpc.Status.ok(ref_status).all() and res.loss.item() > 0
    assert res.loss.item() == pytest.approx(ref.loss.item(), rel=1e-5)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-4, atol=1e-7)


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(qmpc.ConfigError, match=r"unknown config key train\.tagret"):
        config_from_dict({"train": {"tagret": "semi"}})
    with pytest.raises(qmpc.ConfigError, match=r"expected train.steps to be an integer"):
        config_from_dict({"train": {"steps": "many"}})
    with pytest.raises(qmpc.ConfigError, match=r"expected train.gamma <= 1.0"):
        config_from_dict({"train": {"gamma": 1.5}})
    with pytest.raises(qmpc.ConfigError, match=r"expected train.target in"):
        config_from_dict({"train": {"target": "triple"}})
    with pytest.raises(qmpc.ConfigError, match="no file"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nsteps = 3")
    with pytest.raises(qmpc.ConfigError, match="valid TOML"):
        load_config(bad)


def test_overrides_and_roundtrip(tmp_path):
    f = tmp_path / "l.toml"
    f.write_text(config_to_toml(config_from_dict({})))
    cfg = load_config(f, ["train.target=double", "seed=3", "env.id=InvertedPendulum-v5"])
    assert cfg.train.target == "double" and cfg.seed == 3 and cfg.env.id == "InvertedPendulum-v5"
    f.write_text(config_to_toml(cfg))
    assert load_config(f) == cfg


def _online_cfg(run_dir, learn_model=False, **train):
    return config_from_dict(
        {
            "seed": 1,
            "run_dir": str(run_dir),
            "model": {"learn": learn_model, "hidden": [8]},
            "network": {"arch": "QuadraticQ", "hidden": [8]},
            "train": {
                "mode": "online",
                "steps": 60,
                "batch_size": 16,
                "learning_starts": 20,
                "eval_every": 30,
                "eval_episodes": 1,
                "checkpoint_every": 20,
                "log_every": 10,
                "lr_schedule": "linear",
                **train,
            },
        }
    )


def test_resume_continues_exactly(tmp_path):
    straight = train(_online_cfg(tmp_path / "a", learn_model=True), progress=False)
    killed = train(_online_cfg(tmp_path / "b", learn_model=True), progress=False, stop_at=50)  # checkpoint at 40
    assert killed.steps == 50
    wall_at_40 = load_checkpoint(tmp_path / "b" / "checkpoint.pt")["loop"]["wall_s"]
    resumed = train(_online_cfg(tmp_path / "b", learn_model=True), resume=True, progress=False)
    assert resumed.steps == straight.steps == 60
    assert resumed.seconds > wall_at_40 > 0  # wall time adds up over the resume
    a, b = load_checkpoint(tmp_path / "a" / "checkpoint.pt"), load_checkpoint(tmp_path / "b" / "checkpoint.pt")
    for k in a["q"]:
        torch.testing.assert_close(a["q"][k], b["q"][k], rtol=0, atol=0)
    for k in a["model"]["state"]:  # the learned dynamics model resumes exactly too
        torch.testing.assert_close(a["model"]["state"][k], b["model"]["state"][k], rtol=0, atol=0)
    ma, mb = read_metrics(tmp_path / "a" / "metrics.csv"), read_metrics(tmp_path / "b" / "metrics.csv")
    assert ma.keys() == mb.keys()
    for k in ma:
        np.testing.assert_array_equal(ma[k][0], mb[k][0])
        if not k.endswith("_ms"):  # wall-clock timings differ, everything else is identical
            np.testing.assert_allclose(ma[k][1], mb[k][1], rtol=1e-6)
    for name in ("config.toml", "learning_curve.png", "metrics.csv"):
        assert (tmp_path / "b" / name).exists()
    assert any((tmp_path / "b" / "tb").iterdir())


def test_existing_run_needs_resume(tmp_path):
    train(_online_cfg(tmp_path / "r", steps=20), progress=False)
    with pytest.raises(qmpc.ConfigError, match="--resume"):
        train(_online_cfg(tmp_path / "r", steps=20), progress=False)


def test_atomic_write_refuses_devices_and_directories(tmp_path):
    from qmpc.data import atomic_write

    for target in ("/dev/null", tmp_path):
        with pytest.raises(qmpc.InputError, match="regular file"):
            atomic_write(target, lambda tmp: None)
    atomic_write(tmp_path / "f.txt", lambda tmp: Path(tmp).write_text("ok"))
    assert (tmp_path / "f.txt").read_text() == "ok"


def test_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="nothing at"):
        load_checkpoint(tmp_path / "none.pt")
    train(_online_cfg(tmp_path / "r", steps=20), progress=False)
    data = (tmp_path / "r" / "checkpoint.pt").read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        load_checkpoint(cut)
    ctrl = qmpc.Controller.from_checkpoint(tmp_path / "r" / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="expected a checkpoint for InvertedPendulum-v5"):
        ctrl.check_task("InvertedPendulum-v5", 4, 1)


def test_dataset_at_a_relative_path(tmp_path, monkeypatch):
    """``qmpc collect --out data/x`` and ``qmpc demo`` (``runs/demo``) pass relative paths: Minari
    0.5.4 joined a relative dataset root with itself and could not find the file it wrote."""
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    collect(make_env("qmpc/PointMass-v0", seed=0), lambda o: rng.uniform(-2, 2, 2), 60, Path("runs/ds"), seed=0)
    assert load_minari("runs/ds", 4, 2, "qmpc/PointMass-v0")["obs"].shape == (60, 4)
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["ds"]  # no temporary root left


def test_dataset_roundtrip_and_errors(tmp_path):
    env = make_env("qmpc/PointMass-v0", seed=0)
    rng = np.random.default_rng(0)
    collect(env, lambda o: rng.uniform(-2, 2, 2), 150, tmp_path / "ds", seed=0)
    d = load_minari(tmp_path / "ds", 4, 2, "qmpc/PointMass-v0")
    assert d["obs"].shape == (150, 4) and d["act"].shape == (150, 2)
    np.testing.assert_allclose(d["obs"][1:100], d["next_obs"][:99])  # consecutive within an episode
    assert (d["cost"] > 0).all()  # costs, not rewards
    with pytest.raises(qmpc.InputError, match="expected a Minari dataset"):
        load_minari(tmp_path / "nothing", 4, 2)
    with pytest.raises(qmpc.InputError, match=r"observations \(5,\)"):
        load_minari(tmp_path / "ds", 5, 2)
    with pytest.raises(qmpc.InputError, match="collected on InvertedPendulum-v5"):
        load_minari(tmp_path / "ds", 4, 2, "InvertedPendulum-v5")
    h5 = next((tmp_path / "ds" / "data").glob("*.hdf5"))
    h5.write_bytes(h5.read_bytes()[:200])
    with pytest.raises(qmpc.InputError, match="readable Minari dataset"):
        load_minari(tmp_path / "ds", 4, 2)


def test_results_do_not_depend_on_the_solver_thread_count(tmp_path):
    """Batches are split over worker threads sample by sample: 1 or 2 workers train the same
    weights bit for bit (so shipped checkpoints reproduce on machines with other core counts)."""
    runs = []
    for workers in (1, 2):
        cfg = _online_cfg(tmp_path / f"w{workers}", steps=40)
        cfg.solver.workers = workers
        train(cfg, progress=False)
        runs.append(load_checkpoint(tmp_path / f"w{workers}" / "checkpoint.pt")["q"])
    for k in runs[0]:
        torch.testing.assert_close(runs[0][k], runs[1][k], rtol=0, atol=0)


def test_discounted_costs_closed_form():
    """A constant cost c for T steps: G_t = c (1 − γ^{T−t}) / (1 − γ); after a termination every
    step counts, after the time limit only those whose unseen tail weighs ≤ 1 %."""
    from qmpc.runner import discounted_costs

    c, gamma, T = -0.1, 0.9, 100
    g, valid = discounted_costs(np.full(T, c), gamma, terminated=True)
    np.testing.assert_allclose(g, c * (1 - gamma ** (T - np.arange(T))) / (1 - gamma), rtol=1e-12)
    assert valid.all()
    _, valid = discounted_costs(np.full(T, c), gamma, terminated=False)
    k = int(np.ceil(np.log(0.01) / np.log(gamma)))  # the tail γ^{T−t} ≤ 0.01 for t ≤ T − k
    assert valid.sum() == T - k + 1 and valid[: T - k + 1].all()


def test_q_gaps_are_q_minus_the_discounted_scaled_costs_and_nothing_after_a_fall():
    """:func:`qmpc.trainer.q_gaps` (``eval/q_bias``'s per-step errors) against a closed form."""
    from types import SimpleNamespace

    from qmpc.trainer import q_gaps

    class ConstantQ(torch.nn.Module):  # Q(x, u) = 1
        def __init__(self):
            super().__init__()
            self.value = torch.nn.Parameter(torch.tensor(1.0, dtype=torch.float64))

        def forward(self, x, u):
            return self.value.expand(x.shape[0])

    def episode(costs, terminated):
        t = len(costs)
        return SimpleNamespace(costs=np.asarray(costs), observations=np.zeros((t + 1, 2)), actions=np.zeros((t, 1)),
                               terminated=terminated)  # fmt: skip

    fell, cut = q_gaps(ConstantQ(), [episode([1.0, 1.0, 1.0], True), episode([1.0] * 3, False)], 0.5, 2.0)
    # G_t = 2 (1 + 0.5 + 0.25), 2 (1 + 0.5), 2: the costs scaled, discounted, nothing after the termination
    np.testing.assert_allclose(fell.cost_to_go, [3.5, 3.0, 2.0])
    np.testing.assert_allclose(fell.error, 1.0 - fell.cost_to_go)
    assert fell.valid.all()
    # after a truncation the tail is unknown: γ^{T−t} > 1 % on every step of a 3-step episode at γ = 0.5
    assert not cut.valid.any() and np.isnan(cut.error).all()


def test_evaluation_logs_the_bias_of_q_against_monte_carlo(tmp_path):
    """``eval/q_bias`` = mean Q(x, u) − G over the evaluation's steps, in the trained units."""
    from qmpc.controller import Controller
    from qmpc.env import env_spec, make_env
    from qmpc.runner import discounted_costs, run_episodes
    from qmpc.trainer import evaluate, read_metrics

    train(_online_cfg(tmp_path / "r", steps=40, gamma=0.9), progress=False)  # 100-step episodes: γ^44 < 1 %
    m = read_metrics(tmp_path / "r" / "metrics.csv")
    assert np.isfinite(m["eval/q_bias"][1]).all() and len(m["eval/q_bias"][0]) == 2
    # the same number by hand on a fresh evaluation
    ctrl = Controller.from_checkpoint(tmp_path / "r" / "checkpoint.pt")
    env = make_env(ctrl.env_id, seed=5)
    ev = evaluate(ctrl, env, 2, seed=7, gamma=0.9, cost_scale=2.0)
    eps, _ = run_episodes(ctrl, make_env(ctrl.env_id, seed=5), 2, seed=7)
    gaps = []
    for e in eps:
        g, valid = discounted_costs(2.0 * e.costs, 0.9, e.terminated)
        x = torch.as_tensor(e.observations[:-1][valid], dtype=torch.float64)
        with torch.no_grad():
            gaps.append(ctrl.q.double()(x, torch.as_tensor(e.actions[valid])).numpy().reshape(-1) - g[valid])
    assert ev.q_bias == pytest.approx(np.mean(np.concatenate(gaps)), rel=1e-9)
    assert env_spec(env).env_id == ctrl.env_id


def test_a_layer_norm_picnn_trains_reloads_and_plans(tmp_path):
    """``network.layer_norm``: the run's checkpoint rebuilds the same network (its layer norms
    included) and a controller plans with it at H = 3 through the learned model."""
    cfg = _online_cfg(tmp_path / "ln", learn_model=True)
    cfg.network.arch, cfg.network.layer_norm = "PICNN", True
    train(cfg, progress=False)
    ckpt = load_checkpoint(tmp_path / "ln" / "checkpoint.pt")
    assert ckpt["network"]["layer_norm"] is True
    assert any(k.startswith("x_norm.") for k in ckpt["q"])
    ctrl = qmpc.Controller.from_checkpoint(tmp_path / "ln" / "checkpoint.pt", horizon=3, model="learned")
    assert ctrl.q.layer_norm
    for k, v in ctrl.q.state_dict().items():
        torch.testing.assert_close(v, ckpt["q"][k].to(v.dtype), rtol=0, atol=0)
    env = make_env(cfg.env.id, seed=0)
    obs, _ = env.reset(seed=0)
    for _ in range(3):
        a, info = ctrl.act(obs)
        assert not info["fallback"]
        obs, *_ = env.step(a)
