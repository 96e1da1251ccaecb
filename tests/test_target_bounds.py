"""``train.target_bounds`` (issue 21): the TD targets' bootstrap clamped to the discounted cost range
the replay data allows, the guard against Q feeding its own extrapolation back into its targets
(Walker2d-v5 at H = 3 with two updates a step: Q to −36 400 where the data allows about −60,
its least cost −0.61 at ``cost_scale = 0.1`` and γ = 0.99)."""

from pathlib import Path

import numpy as np
import pytest
import torch
from test_resume_exact import TINY, assert_same_run

from qmpc.bridge import ArgminLayer
from qmpc.checkpoint import load_checkpoint
from qmpc.config import load_config
from qmpc.data import Batch, ReplayBuffer
from qmpc.errors import InputError
from qmpc.losses import td_loss
from qmpc.metrics import read_metrics
from qmpc.networks import QuadraticQ
from qmpc.trainer import train

ROOT = Path(__file__).resolve().parents[1]


def _buffer(costs, capacity: int = 100) -> ReplayBuffer:
    buf = ReplayBuffer(1, 1, capacity)
    for k, c in enumerate(costs):
        buf.add([k], [0.0], c, [k + 1], False)
    return buf


def test_the_bounds_are_the_discounted_range_of_every_cost_the_buffer_has_held():
    assert _buffer([-2.0, 3.0, 0.5]).value_bounds(0.9) == pytest.approx((-20.0, 30.0))
    assert _buffer([1.0, 2.0]).value_bounds(0.5) == pytest.approx((0.0, 4.0))  # an episode may end: 0 is inside
    assert _buffer([-1.0, -3.0]).value_bounds(0.5) == pytest.approx((-6.0, 0.0))
    evicted = _buffer([-5.0, 1.0, 1.0, 1.0], capacity=2)  # -5 left the ring; the bound keeps it
    assert evicted.value_bounds(0.9) == pytest.approx((-50.0, 10.0))
    many = ReplayBuffer(1, 1, 2)
    many.add_many(
        np.arange(4.0)[:, None], np.zeros((4, 1)), [-5.0, 1.0, 1.0, 1.0], np.arange(1.0, 5.0)[:, None], [0] * 4
    )
    assert (many.cost_min, many.cost_max) == (evicted.cost_min, evicted.cost_max)
    with pytest.raises(InputError, match="non-empty"):
        ReplayBuffer(1, 1, 4).value_bounds(0.9)
    with pytest.raises(InputError, match="gamma < 1"):
        evicted.value_bounds(1.0)


def test_the_bounds_are_saved_and_an_older_checkpoint_takes_them_from_the_costs_it_holds():
    src = _buffer([-5.0, 1.0, 2.0, 1.0], capacity=2)
    s = src.state_dict()
    back = ReplayBuffer(1, 1, 2)
    back.load_state_dict(s)
    assert (back.cost_min, back.cost_max) == (-5.0, 2.0)
    older = ReplayBuffer(1, 1, 2)
    older.load_state_dict({k: v for k, v in s.items() if k not in ("cost_min", "cost_max")})
    assert (older.cost_min, older.cost_max) == (1.0, 2.0)  # what the ring still holds


def _diverging_toy(bounds):
    """The textbook divergence of TD with function approximation (the deadly triad): Q(x, u) =
    w x + ½ p u² (only w learned), one transition x = 1 → x⁺ = 2 of cost −1, γ = 0.99. The target
    −1 + 0.99 · 2w leaves w behind by a factor 1.98: plain TD runs w off to −∞ (as Q did on
    Walker2d); clamped to the data's range [−100, 0], w settles at −1 + 0.99 · (−100) = −100."""
    torch.manual_seed(0)
    q = QuadraticQ(1, 1, hidden=(), state_dependent_curvature=False).double()
    with torch.no_grad():
        for p in q.parameters():
            p.zero_()
    layer = ArgminLayer(q, -1.0, 1.0, workers=1)
    opt = torch.optim.SGD([q.value.weight], lr=0.1)
    one = torch.ones(1, 1, dtype=torch.float64)
    batch = Batch(one, 0 * one, -torch.ones(1), 2 * one, torch.zeros(1), torch.zeros(1, dtype=torch.long))
    fracs = []
    for _ in range(80):
        res = td_loss(q, q, layer, layer, batch, 0.99, "semi", value_bounds=bounds)
        opt.zero_grad()
        res.loss.backward()
        opt.step()
        fracs.append(res.clamped_frac)
    return float(q.value.weight.detach()), res, fracs


def test_bounded_targets_stop_the_divergence_of_a_deadly_triad():
    w, res, _ = _diverging_toy(None)
    assert w < -1e4 and res.fail_frac == 0.0  # the toy diverges: the guard has something to stop
    bounds = _buffer([-1.0]).value_bounds(0.99)
    w, res, fracs = _diverging_toy(bounds)
    assert bounds == pytest.approx((-100.0, 0.0))
    assert w == pytest.approx(-100.0, abs=1e-3) and float(res.target) == pytest.approx(-100.0)
    assert fracs[0] == 0.0 and fracs[-1] == 1.0  # counted once the bootstrap leaves the range
    with pytest.raises(InputError, match="lo <= hi"):
        _diverging_toy((1.0, 0.0))


def _ip(run_dir: Path, *sets: str):
    return load_config(ROOT / "launch" / "inverted_pendulum.toml", [f"run_dir={run_dir}", *TINY, *sets])


def test_a_run_clamps_its_targets_counts_them_and_resumes_bit_identical(tmp_path):
    """InvertedPendulum-v5's costs are −0.1 (alive) and 0 (the step that ends it): no cost-to-go
    the data allows is above 0, and the fresh Q's values mostly are, so the clamp binds from the first
    update, and changes the training. Resumed, the run is the straight one bit for bit (the cost range
    is saved with the buffer)."""
    on = ("train.target_bounds=true",)
    train(_ip(tmp_path / "off"), progress=False)
    straight = train(_ip(tmp_path / "a", *on), progress=False)
    metrics = read_metrics(tmp_path / "a" / "metrics.csv")
    assert "train/target_clamped_frac" not in read_metrics(tmp_path / "off" / "metrics.csv")
    frac = metrics["train/target_clamped_frac"][1]
    assert frac[0] > 0.5 and ((frac >= 0) & (frac <= 1)).all()
    a, off = (load_checkpoint(tmp_path / d / "checkpoint.pt") for d in ("a", "off"))
    assert (a["buffer"]["cost_min"], a["buffer"]["cost_max"]) == pytest.approx((-0.1, 0.0))
    assert any(not torch.equal(a["q"][k], off["q"][k]) for k in off["q"])
    b = tmp_path / "b"
    train(_ip(b, *on), progress=False, stop_at=37)
    resumed = train(_ip(b, *on), resume=True, progress=False)
    assert resumed.eval_returns == straight.eval_returns
    assert_same_run(tmp_path / "a", b)
