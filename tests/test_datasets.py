"""Issue 22's datasets: ``qmpc datasets make TASK KIND`` writes Minari datasets ``qmpc/<task>/<kind>-v0``
the way the field makes them, with their reference returns; seeded; found by id; bad requests refused."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from qmpc.cli import main
from qmpc.config import load_config
from qmpc.data import ReplayBuffer, dataset_metadata, load_minari, read_episodes
from qmpc.datasets import buffer_episodes, dataset_id, make_dataset, normalized_score
from qmpc.errors import ConfigError, InputError
from qmpc.trainer import train

ROOT = Path(__file__).resolve().parents[1]
TASK = "InvertedPendulum-v5"
SMALL = dict(steps=300, reference_episodes=2, progress=False)
MEDIUM_RUN = dict(train_steps=40, eval_every=20)  # before learning starts: a tiny, cheap run


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("minari")
    for kind in ("random", "medium-replay", "medium-expert"):  # medium-expert makes medium and expert
        make_dataset(TASK, kind, root=root, **SMALL, **MEDIUM_RUN)
    return root


def test_every_kind_is_a_minari_dataset_with_its_references(root, monkeypatch):
    import minari

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    ids = {dataset_id(TASK, k) for k in ("random", "medium", "medium-replay", "expert", "medium-expert")}
    assert set(minari.list_local_datasets()) == ids
    refs = set()
    for i in ids:
        ds = minari.load_dataset(i)
        meta = ds.storage.metadata
        refs.add((meta["ref_min_score"], meta["ref_max_score"]))
        assert ds.spec.env_spec.id == TASK and ds.total_steps > 0
    ((r_random, r_expert),) = refs  # one pair for the task
    assert r_random < 20 and r_expert == 1000.0  # the shipped IP controller balances
    assert normalized_score(r_expert, r_random, r_expert) == 100.0
    meta = dataset_metadata(dataset_id(TASK, "medium"))  # what benchmarks read: the same references
    assert (meta["ref_min_score"], meta["ref_max_score"]) == (r_random, r_expert)


def test_medium_expert_is_medium_then_expert_and_medium_replay_is_the_runs_buffer(root):
    parts = [read_episodes(root / dataset_id(TASK, k)) for k in ("medium", "expert", "medium-expert")]
    both = parts[0] + parts[1]
    assert len(parts[2]) == len(both)
    for a, b in zip(parts[2], both, strict=True):
        np.testing.assert_array_equal(a.observations, b.observations)
        np.testing.assert_array_equal(a.actions, b.actions)
    replay = load_minari(root / dataset_id(TASK, "medium-replay"), 4, 1, TASK)
    ckpt = torch.load(next(root.glob("qmpc/.work/*/seed0/medium/checkpoint.pt")), weights_only=True)
    np.testing.assert_array_equal(replay["obs"], ckpt["buffer"]["obs"].numpy())
    np.testing.assert_allclose(replay["cost"], ckpt["buffer"]["cost"].numpy() / 0.1, rtol=1e-6)  # cost_scale


def test_the_same_command_makes_the_same_dataset(root, tmp_path):
    again = make_dataset(TASK, "random", root=tmp_path, **SMALL)
    a, b = (load_minari(p, 4, 1) for p in (root / dataset_id(TASK, "random"), again))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    other = load_minari(make_dataset(TASK, "random", root=tmp_path / "s1", seed=1, **SMALL), 4, 1)
    assert not np.array_equal(a["act"], other["act"])


def test_buffer_episodes_split_at_terminations_and_breaks_and_undo_a_wrapped_ring():
    buf = ReplayBuffer(1, 1, 6)
    t = 0.0
    for ep_len, term in ((3, True), (5, False)):  # 8 transitions into 6 slots: the ring wraps
        for k in range(ep_len):
            buf.add([t], [0.1 * t], -t, [t + 1], term and k == ep_len - 1)
            t += 1
        t += 10  # the next episode starts elsewhere
    eps = buffer_episodes(buf.state_dict(), cost_scale=0.5)
    assert [len(e.actions) for e in eps] == [1, 5]  # the first episode's last transition, the second whole
    assert eps[0].terminations.tolist() == [True] and eps[1].truncations.tolist() == [False] * 4 + [True]
    np.testing.assert_array_equal(eps[1].observations[:, 0], [13, 14, 15, 16, 17, 18])
    np.testing.assert_allclose(eps[1].rewards, np.arange(13, 18) / 0.5)


def test_an_offline_run_trains_on_a_dataset_id(root, tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    sets = [f"run_dir={tmp_path / 'run'}", f'train.dataset="{dataset_id(TASK, "medium-expert")}"']
    sets += ["train.steps=6", "train.eval_every=6", "train.eval_episodes=1", "train.checkpoint_every=6"]
    sets += ["train.batch_size=8", "train.behaviour_weight=1.0", "train.conservative_weight=0.1"]
    sets += ["train.behaviour_steps=20", "model.learn=false"]
    summary = train(load_config(ROOT / "launch" / "inverted_pendulum_offline.toml", sets), progress=False)
    assert summary.steps == 6 and len(summary.eval_returns) == 1


def test_bad_requests_are_clear_errors(root, tmp_path, monkeypatch, capsys):
    with pytest.raises(InputError, match="expected no dataset qmpc/invertedpendulum/random-v0 yet"):
        make_dataset(TASK, "random", root=root, **SMALL)
    with pytest.raises(ConfigError, match="expected a dataset kind in"):
        make_dataset(TASK, "medium-random", root=tmp_path, **SMALL)
    with pytest.raises(ConfigError, match="expected --launch for a task without a recipe"):
        make_dataset("Ant-v5", "random", root=tmp_path, **SMALL)
    with pytest.raises(ConfigError, match="expected a launch file for InvertedPendulum-v5"):
        make_dataset(TASK, "random", root=tmp_path, launch=ROOT / "launch" / "reacher.toml", **SMALL)
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "empty"))
    with pytest.raises(InputError, match=r"in the Minari root .*empty \(make it with `qmpc datasets make"):
        load_minari("qmpc/invertedpendulum/expert-v0", 4, 1)
    with pytest.raises(InputError, match=r"expected a Minari dataset at qmpc/invertedpendulum/expert-v0 in the Minari"):
        dataset_metadata("qmpc/invertedpendulum/expert-v0")
    (tmp_path / "broken" / "data").mkdir(parents=True)
    (tmp_path / "broken" / "data" / "metadata.json").write_text('{"ref_min_score": ')
    with pytest.raises(InputError, match=r"expected a readable metadata.json in .*broken/data, got: JSONDecodeError"):
        dataset_metadata(tmp_path / "broken")
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))  # a mistyped id: the error lists what is there
    with pytest.raises(
        InputError,
        match=r"got none; the datasets there: qmpc/invertedpendulum/expert-v0, .*qmpc/invertedpendulum/random-v0",
    ):
        load_minari("qmpc/InvertedPendulum-v5/random-v0", 4, 1)
    assert main(["datasets", "make", TASK, "random", "--steps", "0"]) == 2
    assert "expected --steps to be a finite number >= 1, got 0" in capsys.readouterr().err


def test_datasets_list_prints_the_references(root, capsys):
    assert main(["datasets", "list", "--root", str(root)]) == 0
    out = capsys.readouterr().out
    assert "qmpc/invertedpendulum/medium-expert-v0" in out and "1000.00" in out


def test_the_medium_search_retraces_a_jump_over_the_band_with_finer_evaluations(tmp_path, monkeypatch):
    """A step-like learning curve (5 % at step 20, 100 % at 40) jumps over the band: the search goes
    back to step 20 and evaluates every 10 steps (:data:`MIN_INTERVAL`), finding 30 % at step 30."""
    from qmpc import datasets

    curve = {20: 5.0, 40: 1000.0, 30: 300.0}
    calls = []

    def fake_train_to(job, run_dir, end, interval):
        calls.append((end, interval))
        run_dir.mkdir(parents=True, exist_ok=True)
        torch.save({"loop": {"step": end}}, run_dir / "checkpoint.pt")
        for name in ("policy.pt", "config.toml", "metrics.csv"):
            (run_dir / name).write_text(str(end))
        return curve[end]

    monkeypatch.setattr(datasets, "_train_to", fake_train_to)
    monkeypatch.setattr(datasets, "reference_returns", lambda job: {"random": 0.0, "expert": 1000.0})
    job = datasets._Job(TASK, tmp_path, tmp_path / "w", 0, 10, None, None, 0.1, 100, 20, 2, 0, False)
    chosen = datasets._medium_run(job)
    assert calls == [(20, 20), (40, 20), (30, 10)]
    note = __import__("json").loads((chosen / "medium.json").read_text())
    assert note == {"step": 30, "normalized": 0.3, "eval_return": 300.0, "in_band": True}
    assert (chosen / "policy.pt").read_text() == "30"


def test_a_sweep_finds_a_dataset_by_id(tmp_path, monkeypatch):
    """Regression: ``qmpc sweep`` made every relative ``train.dataset`` absolute against the working
    directory, so an id became ``$PWD/qmpc/…`` and every trial failed ("expected a Minari dataset
    at /work/main/qmpc/invertedpendulum/random-v0")."""
    from qmpc.sweep import plan_trials

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "root"))
    ds = dataset_id(TASK, "random")
    (trial,) = plan_trials(
        ROOT / "launch" / "inverted_pendulum_offline.toml", [0], [f'train.dataset="{ds}"'], [], tmp_path
    )
    cfg = load_config(trial.params["launch"], trial.params["sets"])
    assert Path(cfg.train.dataset) == tmp_path / "root" / ds


def test_a_recipes_pinned_settings_reach_the_medium_run(tmp_path, monkeypatch):
    """A recipe pins the settings its expert was trained with (``Recipe.sets``), so that a launch file
    that moves on does not change the datasets: the medium run trains with them, and a launch file
    given by the caller gets none of them."""
    import dataclasses

    from qmpc import datasets

    recipe = dataclasses.replace(datasets.RECIPES[TASK], sets=("train.gamma=0.5",))
    monkeypatch.setitem(datasets.RECIPES, TASK, recipe)
    make_dataset(TASK, "medium", root=tmp_path / "pinned", **SMALL, **MEDIUM_RUN)
    launch = ROOT / recipe.launch
    make_dataset(TASK, "medium", root=tmp_path / "own", launch=launch, **SMALL, **MEDIUM_RUN)
    (pinned,) = (tmp_path / "pinned").glob("qmpc/.work/*/seed0/medium/config.toml")
    (own,) = (tmp_path / "own").glob("qmpc/.work/*/seed0/medium/config.toml")
    assert load_config(pinned, []).train.gamma == 0.5
    assert load_config(own, []).train.gamma == load_config(launch, []).train.gamma != 0.5


def _feedback(obs: np.ndarray) -> np.ndarray:
    """A deterministic IP policy that balances for a while (so episodes differ in length)."""
    return np.clip(np.atleast_2d(obs) @ np.array([[0.5], [3.0], [0.3], [0.6]]), -3.0, 3.0)


def test_batch_rollouts_are_the_sequential_rollouts_of_each_seed():
    from qmpc.data import batch_rollouts, rollouts
    from qmpc.env import make_env

    one = rollouts(make_env(TASK), lambda o: _feedback(o)[0], 10_000, seed=7)[:6]
    envs = [make_env(TASK) for _ in range(4)]
    calls = []

    def policy(obs, slots, fresh):
        calls.append((len(slots), int(fresh.sum())))
        return _feedback(obs)

    many = batch_rollouts(envs, policy, seed=7, episodes=6)
    assert [e.seed for e in many] == list(range(7, 13)) and calls[0] == (4, 4)
    for a, b in zip(many, one, strict=True):  # each episode depends on its seed only
        np.testing.assert_array_equal(a.observations, b.observations)
        np.testing.assert_array_equal(a.actions, b.actions)
        np.testing.assert_array_equal(a.terminations, b.terminations)
    cut = batch_rollouts(envs, policy, seed=7, steps=50)
    assert sum(len(e.rewards) for e in cut) == 50 and len(cut) >= 4
    for e in cut:  # each ends terminated or truncated, never both
        assert e.terminations[-1] != e.truncations[-1] and not (e.terminations[:-1] | e.truncations[:-1]).any()
    with pytest.raises(InputError, match="steps or episodes"):
        batch_rollouts(envs, policy)


def test_the_batched_controller_acts_as_the_controller(tmp_path):
    from qmpc.datasets import checkpoint_batch_policy, checkpoint_policy
    from qmpc.env import make_env

    env = make_env(TASK)
    ckpt = ROOT / "models" / "inverted_pendulum.pt"
    states = np.random.default_rng(0).uniform(-0.2, 0.2, size=(16, 4))
    alone = checkpoint_policy(ckpt, env, 0.0, np.random.default_rng(0))
    batched = checkpoint_batch_policy(ckpt, env, 0.0, np.random.default_rng(0), 16)
    u = batched(states, np.arange(16), np.ones(16, bool))
    np.testing.assert_allclose(u, np.array([alone(x) for x in states]), atol=1e-6)
    assert batched.failed == 0
    with pytest.raises(Exception, match="expected a checkpoint for HalfCheetah-v5"):
        checkpoint_batch_policy(ckpt, make_env("HalfCheetah-v5"), 0.0, np.random.default_rng(0), 2)


def test_a_dataset_made_with_several_environments_at_once(tmp_path):
    out = make_dataset(TASK, "expert", root=tmp_path, envs=3, **SMALL)
    eps = read_episodes(out)
    assert sum(len(e.rewards) for e in eps) == SMALL["steps"]
    assert len(eps) >= 3 and all(e.truncations[-1] for e in eps[-3:])  # the last three were cut
    again = read_episodes(make_dataset(TASK, "expert", root=tmp_path / "again", envs=3, **SMALL))
    for a, b in zip(eps, again, strict=True):  # seeded: the same command, the same dataset
        np.testing.assert_array_equal(a.actions, b.actions)
    with pytest.raises(ConfigError, match="envs >= 1"):
        make_dataset(TASK, "expert", root=tmp_path / "none", envs=0, **SMALL)


def test_seed_0s_medium_rolls_out_the_shipped_medium_policy_without_training(tmp_path, monkeypatch):
    """A recipe's ``medium`` of seed 0 is the shipped policy's rollouts (the same on every machine),
    not a training run's: no run is trained, and without noise every action is that policy's."""
    from qmpc import Controller, datasets

    def no_run(job):
        raise AssertionError("the medium run was trained")

    monkeypatch.setattr(datasets, "_medium_run", no_run)
    out = make_dataset(TASK, "medium", root=tmp_path, noise=0.0, **SMALL)
    shipped = ROOT / datasets.RECIPES[TASK].medium
    eps = read_episodes(out)
    ctrl = Controller.from_checkpoint(shipped)
    for e in eps[:3]:
        ctrl.reset()
        np.testing.assert_allclose(np.stack([ctrl.act(o)[0] for o in e.observations[:-1]]), e.actions, atol=1e-6)
    meta = json.loads((out / "data" / "metadata.json").read_text())
    assert "(inverted_pendulum.pt)" in meta["algorithm_name"] and "step 2000" in meta["description"]
    with pytest.raises(AssertionError, match="medium run was trained"):  # another seed trains its own
        make_dataset(TASK, "medium", root=tmp_path / "s1", seed=1, **SMALL)


def _assert_same_episodes(xs: list, ys: list, dtypes: bool = False) -> None:
    """The same episodes to the bit: states, actions, rewards, terminations, truncations."""
    assert len(xs) == len(ys)
    for a, b in zip(xs, ys, strict=True):
        for x, y in zip(a[:5], b[:5], strict=True):
            np.testing.assert_array_equal(x, y)
            assert not dtypes or x.dtype == y.dtype


def _episodes(rng: np.random.Generator, lengths: list[int]) -> list:
    from qmpc.data import Episode

    out = []
    for t in lengths:
        term = np.zeros(t, bool)
        term[-1] = t % 2 == 0
        act = rng.normal(size=(t, 2)).astype(np.float32)
        out.append(Episode(rng.normal(size=(t + 1, 3)), act, rng.normal(size=t), term, ~term))
    return out


def test_an_episodes_file_reads_back_exactly_and_a_bad_one_is_a_clear_error(tmp_path):
    from qmpc.data import load_episodes, save_episodes

    eps = _episodes(np.random.default_rng(0), [3, 1, 4])
    path = save_episodes(tmp_path / "eps.npz", eps, {"step": 7750, "in_band": True})
    back, note = load_episodes(path)
    assert note == {"step": 7750, "in_band": True} and len(back) == 3
    _assert_same_episodes(eps, back, dtypes=True)
    with pytest.raises(InputError, match=r"expected an episodes file \(.npz\) at .*none.npz, got none"):
        load_episodes(tmp_path / "none.npz")
    (tmp_path / "cut.npz").write_bytes(path.read_bytes()[:200])  # a truncated copy
    with pytest.raises(InputError, match=r"expected a readable episodes file at .*cut.npz, got: BadZipFile"):
        load_episodes(tmp_path / "cut.npz")
    with np.load(path) as z:
        arrays = dict(z)
    np.savez(tmp_path / "short.npz", **(arrays | {"lengths": np.array([3, 1, 5])}))  # lengths that do not add up
    with pytest.raises(InputError, match=r"expected 3 episodes of 9 steps .* got array lengths"):
        load_episodes(tmp_path / "short.npz")
    obs = arrays["observations"].copy()
    obs[2, 1] = np.nan
    np.savez(tmp_path / "nan.npz", **(arrays | {"observations": obs}))
    with pytest.raises(InputError, match="with finite states and actions"):
        load_episodes(tmp_path / "nan.npz")
    with pytest.raises(InputError, match="expected at least one episode"):
        save_episodes(tmp_path / "empty.npz", [], {})


def test_seed_0s_medium_replay_is_the_shipped_buffer_without_training(tmp_path, monkeypatch):
    """A recipe's ``medium-replay`` of seed 0 is the shipped replay buffer, written as it is (the same
    on every machine): no run is trained, and the dataset's episodes are the file's."""
    from qmpc import datasets
    from qmpc.data import load_episodes

    def no_run(job):
        raise AssertionError("the medium run was trained")

    monkeypatch.setattr(datasets, "_medium_run", no_run)
    task = "InvertedDoublePendulum-v5"
    out = make_dataset(task, "medium-replay", root=tmp_path, reference_episodes=2, progress=False)
    shipped, note = load_episodes(ROOT / datasets.RECIPES[task].medium_replay)
    made = read_episodes(out)
    assert len(made) == len(shipped) and sum(len(e.actions) for e in made) == 7750
    _assert_same_episodes(shipped, made)
    meta = json.loads((out / "data" / "metadata.json").read_text())
    assert "(inverted_double_pendulum_replay.npz)" in meta["algorithm_name"]
    assert f"step {note['step']}" in meta["description"]
    with pytest.raises(AssertionError, match="medium run was trained"):  # a budget of the caller's trains it
        make_dataset(task, "medium-replay", root=tmp_path / "b", train_steps=40, reference_episodes=2, progress=False)


def test_ship_medium_replay_writes_the_runs_buffer(root, tmp_path):
    from qmpc.data import load_episodes
    from qmpc.datasets import ship_medium_replay

    out = ship_medium_replay(TASK, root=root, out=tmp_path / "x.npz")  # the fixture's tiny medium run
    shipped, note = load_episodes(out)
    made = read_episodes(root / dataset_id(TASK, "medium-replay"))
    (medium_json,) = root.glob("qmpc/.work/*/seed0/medium/medium.json")
    assert len(shipped) == len(made) and note == json.loads(medium_json.read_text())
    _assert_same_episodes(shipped, made)
    with pytest.raises(ConfigError, match="expected a task whose recipe ships a medium-replay, got 'Reacher-v5'"):
        ship_medium_replay("Reacher-v5", root=root)
    with pytest.raises(InputError, match=r"expected the finished medium run of seed 0 at .*empty"):
        ship_medium_replay(TASK, root=tmp_path / "empty")
