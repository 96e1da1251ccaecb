"""Issue 19: training for the horizon it runs. The H-step plan acts while Q trains
(``train.horizon``, grown by ``train.horizon_warmup``), evaluations run at that horizon, ``qmpc
run`` plans at it by default, and Q is also fitted at the states the model predicts
(``train.rollout_td``). A run that plans resumes bit for bit (the plan's policy and its shifted plan
are saved with it)."""

from pathlib import Path

import numpy as np
import pytest
import torch
from test_resume_exact import TINY, assert_same_run

from qmpc.checkpoint import load_checkpoint
from qmpc.cli import main
from qmpc.config import TrainConfig, load_config
from qmpc.data import Batch, ReplayBuffer
from qmpc.errors import ConfigError
from qmpc.losses import model_rolled_batch
from qmpc.plan_actor import acting_horizon
from qmpc.trainer import read_metrics, train

ROOT = Path(__file__).resolve().parents[1]
PLAN = ["train.horizon=3", "train.horizon_warmup=20", "train.plan_refresh=7", "train.rollout_td=2"]
"""A plan that grows from 1 to 3 actions over steps 10–30, rebuilt every 7 steps (so that the
resumes at 30 and 45 fall between two rebuilds), and the model-rolled TD loss two steps deep."""


def _ip(run_dir, *sets):
    return load_config(ROOT / "launch" / "inverted_pendulum.toml", [f"run_dir={run_dir}", *TINY, *PLAN, *sets])


def test_acting_horizon_grows_from_one_to_the_horizon():
    tc = TrainConfig(horizon=5, horizon_warmup=8, learning_starts=100)
    assert [acting_horizon(tc, s) for s in (100, 101, 102, 103, 105, 107, 1000)] == [1, 2, 2, 3, 4, 5, 5]
    assert acting_horizon(TrainConfig(horizon=4), 0) == 4
    assert acting_horizon(TrainConfig(horizon=1, horizon_warmup=50), 7) == 1


def test_a_planning_run_acts_with_the_plan_and_resumes_bit_identical(tmp_path):
    """Stopped at 37 (the resume goes back to the checkpoint of 30, between two rebuilds of the
    plan), resumed and stopped at 45, resumed to the end: the same run as the uninterrupted one."""
    straight = train(_ip(tmp_path / "a"), progress=False)
    ckpt = load_checkpoint(tmp_path / "a" / "checkpoint.pt")
    assert ckpt["plan_actor"]["horizon"] == 3 and ckpt["plan_actor"]["plan"].shape == (3,)
    metrics = read_metrics(tmp_path / "a" / "metrics.csv")
    assert "act/fallback" in metrics and "train/rollout_valid" in metrics
    assert np.all(metrics["train/rollout_valid"][1] > 0.5)
    b = tmp_path / "b"
    assert train(_ip(b), progress=False, stop_at=37).steps == 37
    assert load_checkpoint(b / "checkpoint.pt")["loop"]["step"] == 30
    assert train(_ip(b), resume=True, progress=False, stop_at=45).steps == 45
    resumed = train(_ip(b), resume=True, progress=False)
    assert resumed.eval_returns == straight.eval_returns
    assert_same_run(tmp_path / "a", b)


def test_qmpc_run_plans_at_the_trained_horizon(tmp_path, capsys):
    run = tmp_path / "r"
    sets = ["train.steps=20", "train.horizon=2", "train.horizon_warmup=0", "train.eval_every=20"]
    train(_ip(run, *sets), progress=False)
    capsys.readouterr()
    assert main(["run", str(run / "policy.pt"), "--episodes", "1", "--plot", str(tmp_path / "p.png")]) == 0
    assert "horizon 2," in capsys.readouterr().out
    greedy = ["--horizon", "1", "--plot", str(tmp_path / "q.png")]
    assert main(["run", str(run / "policy.pt"), "--episodes", "1", *greedy]) == 0
    assert "horizon 1," in capsys.readouterr().out


def test_a_run_plans_within_its_trust_region_and_qmpc_run_keeps_it(tmp_path, capsys, monkeypatch):
    import qmpc.controller as controller

    built = []
    init = controller.Controller.__init__

    def spy(self, *a, **kw):
        init(self, *a, **kw)
        built.append((self.problem.horizon, self.trust_region))
        carried.append(self.problem.horizon > 1 and self.carry_greedy)

    carried = []
    monkeypatch.setattr(controller.Controller, "__init__", spy)
    run = tmp_path / "r"
    sets = ["train.steps=20", "train.horizon=2", "train.horizon_warmup=0", "train.eval_every=20"]
    train(_ip(run, *sets, "train.trust_region=0.05"), progress=False)
    assert {b for b in built if b[0] > 1} == {(2, 0.05)}  # the acting plan and the evaluation's
    assert not any(carried)  # the whole greedy plan every step: nothing outside the checkpoint
    capsys.readouterr()
    assert main(["run", str(run / "policy.pt"), "--episodes", "1", "--plot", str(tmp_path / "p.png")]) == 0
    assert "horizon 2, trust region 0.05," in capsys.readouterr().out
    free = ["--trust-region", "0", "--plot", str(tmp_path / "q.png")]
    assert main(["run", str(run / "policy.pt"), "--episodes", "1", *free]) == 0
    assert built[-1] == (2, 0.0) and "trust region" not in capsys.readouterr().out
    multiple = ["--shooting", "multiple", "--plot", str(tmp_path / "m.png")]  # the checkpoint's ρ does not apply
    assert main(["run", str(run / "policy.pt"), "--episodes", "1", *multiple]) == 0
    assert built[-1] == (2, 0.0) and "trust region" not in capsys.readouterr().out
    assert main(["run", str(run / "policy.pt"), "--episodes", "1", "--trust-region", "0.05", *multiple]) == 2
    assert "single shooting" in capsys.readouterr().err  # asked for: refused


def test_a_run_that_plans_without_termination_and_qmpc_run_keeps_it(tmp_path, capsys, monkeypatch):
    """``train.plan_termination = false`` (the ablation): the acting and evaluating plans ignore the
    learned termination, and so does ``qmpc run`` on the run's checkpoint unless told otherwise."""
    import qmpc.controller as controller

    built = []
    init = controller.Controller.__init__

    def spy(self, *a, **kw):
        init(self, *a, **kw)
        built.append((self.problem.horizon, self.problem.spec.termination is not None))

    monkeypatch.setattr(controller.Controller, "__init__", spy)
    run = tmp_path / "r"
    sets = ["train.steps=20", "train.horizon=2", "train.horizon_warmup=0", "train.eval_every=20"]
    train(_ip(run, *sets, "train.plan_termination=false"), progress=False)
    assert {b for b in built if b[0] > 1} == {(2, False)}  # the acting plan and the evaluation's
    assert "outcome" in load_checkpoint(run / "policy.pt")  # the heads are still trained
    plot = ["--episodes", "1", "--plot", str(tmp_path / "p.png")]
    capsys.readouterr()
    assert main(["run", str(run / "policy.pt"), *plot]) == 0
    assert built[-1] == (2, False) and "horizon 2, the plan ignores termination," in capsys.readouterr().out
    assert main(["run", str(run / "policy.pt"), *plot, "--termination", "learned"]) == 0
    assert built[-1] == (2, True) and "ignores termination" not in capsys.readouterr().out
    built.clear()
    train(_ip(tmp_path / "t", *sets), progress=False)  # the default: the plans weigh termination
    assert {b for b in built if b[0] > 1} == {(2, True)}


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["model.learn=false", "train.rollout_td=0"], r"model\.learn = true with train\.horizon = 3"),
        (["train.horizon=1", "train.rollout_td=2", "model.learn=false"], r"model\.learn = true with train\.rollout_td"),
    ],
)
def test_planning_without_a_model_is_refused(tmp_path, sets, message):
    with pytest.raises(ConfigError, match=message):
        train(_ip(tmp_path / "r", *sets), progress=False)


def test_planning_offline_is_refused(tmp_path):
    cfg = load_config(
        ROOT / "launch" / "inverted_pendulum_offline.toml", [f"run_dir={tmp_path / 'r'}", "train.horizon=3"]
    )
    with pytest.raises(ConfigError, match=r"train\.horizon = 1 offline"):
        train(cfg, progress=False)


# ---------------------------------------------------------------------------------------
# The model-rolled TD samples
# ---------------------------------------------------------------------------------------


class _Shift(torch.nn.Module):
    """A model that is exact for :func:`_episodes`' dynamics ``x⁺ = x + u`` (a parameter for its dtype)."""

    def __init__(self):
        super().__init__()
        self.zero = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, u):
        return x + u + self.zero


def _episodes(buffer: ReplayBuffer, lengths: list[int], terminated_last: list[bool], seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for n, term in zip(lengths, terminated_last, strict=True):
        x = rng.normal(size=2)
        for t in range(n):
            u = rng.normal(size=2)
            buffer.add(x, u, float(t), x + u, term and t == n - 1)
            x = x + u


def test_chains_stop_at_an_episodes_end_and_at_the_newest_transition():
    buf = ReplayBuffer(2, 2, 100)
    _episodes(buf, [3, 4], [True, False])  # slots 0-2 (terminated at 2), 3-6 (truncated: newest is 6)
    idx, valid = buf.chains(np.array([0, 1, 2, 3, 5, 6]), 2)
    np.testing.assert_array_equal(idx[:, 1], [1, 2, 3, 4, 6, 7])
    expected = [[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0], [1, 0, 0]]
    np.testing.assert_array_equal(valid, np.array(expected, bool))
    wrap = ReplayBuffer(2, 2, 5)
    _episodes(wrap, [7], [False])  # slots hold t = 5, 6, 2, 3, 4; the newest is slot 1
    _, valid = wrap.chains(np.array([2, 4, 0]), 2)
    np.testing.assert_array_equal(valid, np.array([[1, 1, 1], [1, 1, 1], [1, 1, 0]], bool))


def test_model_rolled_batch_with_an_exact_model_is_the_real_chain():
    """With a model that is exact the rolled states are the buffer's own states, bit for bit in
    float64, and the masked rows are those whose chain leaves the episode."""
    buf = ReplayBuffer(2, 2, 100)
    _episodes(buf, [3, 4], [True, False])
    index = np.array([0, 1, 3, 5])
    batch, mask = model_rolled_batch(buf, _Shift().double(), index, 2)
    assert isinstance(batch, Batch) and batch.obs.shape == (8, 2)
    np.testing.assert_array_equal(mask.numpy(), [1, 1, 1, 1, 1, 0, 1, 0])  # k = 1 for all four, then k = 2
    rows = batch.index.numpy()
    np.testing.assert_array_equal(rows, [1, 2, 4, 6, 2, 3, 5, 7])
    np.testing.assert_allclose(batch.obs.numpy(), buf.obs[rows], atol=1e-6)
    np.testing.assert_array_equal(batch.cost.numpy(), buf.cost[rows])


def test_a_model_that_diverges_is_masked_and_never_reaches_q():
    buf = ReplayBuffer(2, 2, 100)
    _episodes(buf, [6], [False])

    class Blowup(_Shift):
        def forward(self, x, u):
            return x * torch.inf

    batch, mask = model_rolled_batch(buf, Blowup(), np.array([0, 1]), 2)
    assert not mask.any() and torch.isfinite(batch.obs).all()


def test_bench_plan_actor_rebuilds_both_ways_and_they_act_the_same():
    """``benchmarks/bench_plan_actor.py`` (a tiny budget): the plan actor's controller with its
    plugins built at construction and at first use, side by side, acting the same."""
    import subprocess
    import sys

    bench = ROOT / "benchmarks" / "bench_plan_actor.py"
    out = subprocess.run(
        [sys.executable, str(bench), "--rebuilds", "1", "--steps", "3"], capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr
    assert "| at first use (the plan actor's) |" in out.stdout
    assert "both arms act the same on all 3 steps: True" in out.stdout
