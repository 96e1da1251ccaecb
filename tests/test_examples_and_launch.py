"""Every example and launch file runs with a tiny budget; the CLI commands work end to end."""

import importlib.util
import tomllib
from pathlib import Path

import pytest

from qmpc import Controller
from qmpc.checkpoint import load_checkpoint
from qmpc.cli import main
from qmpc.config import config_from_dict, load_config
from qmpc.demo import DEMO_CONFIG
from qmpc.env import make_env

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = sorted((ROOT / "launch").glob("*.toml"))


def _example(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_example_gradient_through_min():
    res = _example("gradient_through_min").main(batch=16)
    assert res["|chain rule - envelope|"] <= 1e-8 and res["|double-Q grad|"] > 0


def test_example_closed_loop_lqr():
    assert _example("closed_loop_lqr").main(episodes=1, horizon=3) <= 1e-6


def test_example_mpc_learned_model():
    res = _example("mpc_learned_model").main(episodes=1, horizon=3)
    assert set(res) == {1, 3} and all(r > -20 for r in res.values())  # a random policy gets about -43


def test_launch_files_set_every_field():
    full = tomllib.loads((ROOT / "launch" / "point_mass.toml").read_text())
    default = {k: (set(v) if isinstance(v, dict) else None) for k, v in full.items()}
    for f in LAUNCH:
        data = tomllib.loads(f.read_text())
        assert {k: (set(v) if isinstance(v, dict) else None) for k, v in data.items()} == default, f.name
        load_config(f)  # strict: no unknown keys, valid values


def test_demo_config_is_the_launch_file():
    a = load_config(ROOT / "launch" / "point_mass_offline.toml")
    b = config_from_dict(
        {**DEMO_CONFIG, "run_dir": a.run_dir, "train": {**DEMO_CONFIG["train"], "dataset": a.train.dataset}}
    )
    assert a == b


TINY = [
    "train.steps=24",
    "train.batch_size=8",
    "train.learning_starts=8",
    "train.eval_every=24",
    "train.eval_episodes=1",
    "train.checkpoint_every=12",
    "train.log_every=4",
]


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    out = {}
    for env_id in {load_config(f).env.id for f in LAUNCH if load_config(f).train.mode == "offline"}:
        path = root / env_id.replace("/", "-")
        assert main(["collect", "--env", env_id, "--steps", "60", "--out", str(path)]) == 0
        out[env_id] = path
    return out


@pytest.mark.parametrize("launch", LAUNCH, ids=lambda p: p.stem)
def test_launch_file_trains_with_a_tiny_budget(launch, tmp_path, datasets, capsys):
    cfg = load_config(launch)
    sets = [*TINY, f'run_dir="{tmp_path / "run"}"']
    if cfg.train.mode == "offline":
        sets.append(f'train.dataset="{datasets[cfg.env.id]}"')
    assert main(["train", str(launch), "--no-progress", *[x for s in sets for x in ("--set", s)]]) == 0
    out = capsys.readouterr().out
    assert "eval return" in out
    for name in ("checkpoint.pt", "policy.pt", "config.toml", "metrics.csv", "learning_curve.png"):
        assert (tmp_path / "run" / name).exists()
    policy = load_checkpoint(tmp_path / "run" / "policy.pt")
    assert "buffer" not in policy and policy["trained_steps"] == 24
    assert Controller.from_checkpoint(tmp_path / "run" / "policy.pt").env_id == cfg.env.id
    if cfg.model.learn:  # the learned model plans: H = 2 acts within the bounds
        ctrl = Controller.from_checkpoint(tmp_path / "run" / "policy.pt", horizon=2, model="learned")
        obs, _ = make_env(cfg.env.id).reset(seed=0)
        a, _info = ctrl.act(obs)
        assert (a >= ctrl.low).all() and (a <= ctrl.high).all()


def test_train_resume_and_run_cli(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # qmpc run writes its plot in the working directory
    launch = ROOT / "launch" / "point_mass.toml"
    sets = [x for t in [*TINY, f'run_dir="{tmp_path / "pm"}"'] for x in ("--set", t)]
    assert main(["train", str(launch), "--no-progress", *sets]) == 0
    assert main(["train", str(launch), "--no-progress", "--resume", *sets]) == 0  # already done: a no-op
    ckpt = tmp_path / "pm" / "checkpoint.pt"
    video = tmp_path / "roll.mp4"
    assert main(["run", str(ckpt), "--episodes", "2", "--horizon", "3", "--video", str(video)]) == 0
    out = capsys.readouterr().out
    assert "budget 50 ms per step" in out  # real time by default: the point mass's control period
    assert "solve p50" in out and "mean" in out
    assert (tmp_path / "rollout_checkpoint_h3.png").exists() and video.stat().st_size > 1000
    assert not (tmp_path / "pm" / "rollout_h3.png").exists()
    assert main(["run", str(ckpt), "--episodes", "1", "--horizon", "3", "--model", "mujoco", "--budget-ms", "1e3"]) == 0
    assert "budget 1000 ms per step" in capsys.readouterr().out
    for shooting in ("single", "multiple"):
        assert main(["run", str(ckpt), "--episodes", "1", "--horizon", "3", "--shooting", shooting]) == 0
    capsys.readouterr()
    assert main(["run", str(tmp_path / "missing.pt")]) == 2
    assert "nothing at" in capsys.readouterr().err
    _run_batched_cli(ckpt, capsys)


def _run_batched_cli(ckpt, capsys):
    """``qmpc run --envs N``: the greedy controller in N environments at once, the same episodes
    (seeds, lengths, returns) as one environment after another."""
    assert main(["run", str(ckpt), "--episodes", "3", "--envs", "2", "--plot", "batched.png"]) == 0
    out = capsys.readouterr().out
    assert "3 episodes in 2 environments at once" in out and "per batched solve of all environments" in out
    rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["0"], ["1"], ["2"])]
    assert main(["run", str(ckpt), "--episodes", "3", "--plot", "one.png"]) == 0
    one = [line.split() for line in capsys.readouterr().out.splitlines() if line.split()[:1] in (["0"], ["1"], ["2"])]
    assert [r[:3] for r in rows] == [r[:3] for r in one]  # episode, return (2 decimals), length
    for bad, msg in (
        (["--envs", "0"], "--envs to be a finite number >= 1"),
        (["--envs", "2", "--horizon", "3"], "expected horizon 1"),
        (["--envs", "2", "--video", "novideo/roll.mp4"], "expected no --video with --envs 2"),
    ):
        assert main(["run", str(ckpt), *bad]) == 2
        assert msg in capsys.readouterr().err
    assert not Path("novideo").exists()  # refused before any output directory is made


def test_cli_reports_bad_launch_key(tmp_path, capsys):
    f = tmp_path / "bad.toml"
    f.write_text("[train]\nstepz = 3\n")
    assert main(["train", str(f)]) == 2
    assert "unknown config key train.stepz" in capsys.readouterr().err


def test_demo_runs_with_a_tiny_budget(tmp_path, capsys):
    from qmpc.demo import run_demo

    assert run_demo(tmp_path, steps=20, data_steps=300, progress=False, episodes=1) == 0
    out = capsys.readouterr().out
    assert "Riccati" in out and "LQR" in out
    assert (tmp_path / "rollout.png").exists() and (tmp_path / "run" / "learning_curve.png").exists()


SHIPPED = [
    ("inverted_pendulum", 900.0),
    ("inverted_pendulum_plan", 900.0),
    ("inverted_double_pendulum", 9000.0),
    ("inverted_double_pendulum_plan", 9000.0),
    ("reacher", -15.0),
    ("half_cheetah", 3000.0),
    ("half_cheetah_plan", 5000.0),
]


@pytest.mark.parametrize(("name", "floor"), SHIPPED, ids=[n for n, _ in SHIPPED])
def test_shipped_checkpoint_runs(name, floor, tmp_path, capsys):
    """``qmpc run models/<name>.pt`` works right after install (each trained by ``qmpc train
    launch/<name>.toml``) and does its task: 1000 = the pendulum balanced for the whole episode,
    ~9350 the double pendulum, about −4 … −9 for Reacher (a random policy gets about −43), ~4900
    for HalfCheetah (100k steps), ~6500 for HalfCheetah trained at H = 3. The ``_plan`` ones plan
    at H = 3 (their training horizon) by default."""
    plot = tmp_path / "p.png"
    assert (
        main(["run", str(ROOT / "models" / f"{name}.pt"), "--episodes", "1", "--budget-ms", "0", "--plot", str(plot)])
        == 0
    )
    assert plot.exists()
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.strip().startswith("0 "))
    assert float(row.split()[1]) >= floor  # return of episode 0
    assert ("horizon 3" in out) == name.endswith("_plan")


def test_shipped_reacher_plans_through_its_learned_model(tmp_path, capsys):
    path, plot = ROOT / "models" / "reacher.pt", tmp_path / "r.png"
    args = ["--episodes", "1", "--horizon", "5", "--model", "learned", "--budget-ms", "0", "--plot", str(plot)]
    assert main(["run", str(path), *args]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("0 "))
    assert float(row.split()[1]) >= -15.0
