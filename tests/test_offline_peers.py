"""The file contract between qmpc and the d3rlpy worker (``benchmarks/offline_peers.py`` writes
the ``.npz``, ``benchmarks/d3rlpy_worker.py`` reads it) and the worker's command line. Neither
needs d3rlpy: the worker imports it only to train."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _module(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


peers = _module("offline_peers")
worker = _module("d3rlpy_worker")


def _episodes(rng: np.random.Generator, lengths: list[int], obs_dim: int = 3, act_dim: int = 2):
    """Transitions of consecutive episodes: obs, act, cost, next_obs, terminated, episode_ends."""
    obs, act, nxt, term, ends = [], [], [], [], []
    for i, n in enumerate(lengths):
        states = rng.normal(size=(n + 1, obs_dim))
        obs.append(states[:-1])
        nxt.append(states[1:])
        act.append(rng.uniform(-1, 1, size=(n, act_dim)))
        term.append(np.arange(n) == n - 1 if i % 2 == 0 else np.zeros(n, bool))  # even episodes terminate
        ends.append(np.arange(n) == n - 1)
    cat = np.concatenate
    n_all = sum(lengths)
    return cat(obs), cat(act), rng.normal(size=n_all), cat(nxt), cat(term), cat(ends)


def test_written_npz_is_what_the_worker_reads(tmp_path: Path) -> None:
    """Rewards are −cost, terminations and cuts land in ``terminals`` / ``timeouts``, and the
    worker's own checks accept the file."""
    obs, act, cost, nxt, term, ends = _episodes(np.random.default_rng(0), [4, 3, 5])
    path = peers.write_npz(tmp_path / "d.npz", obs, act, cost, nxt, term, ends)
    d = worker.load_npz(path, obs_dim=3, act_dim=2)
    np.testing.assert_array_equal(d["observations"], obs.astype(np.float32))
    np.testing.assert_array_equal(d["rewards"], (-cost).astype(np.float32))
    assert np.flatnonzero(d["terminals"]).tolist() == [3, 11]  # episodes 0 and 2 terminate
    assert np.flatnonzero(d["timeouts"]).tolist() == [6]  # episode 1 is cut
    # d3rlpy's return of a cut episode leaves out its last transition (no next observation)
    rew = -cost
    np.testing.assert_allclose(worker.episode_returns(d), [rew[:4].sum(), rew[4:6].sum(), rew[7:].sum()], rtol=1e-5)


def test_episode_ends_found_without_flags(tmp_path: Path) -> None:
    """Without ``episode_ends``, an episode ends where ``next_obs`` is not the next ``obs``."""
    obs, act, cost, nxt, term, _ends = _episodes(np.random.default_rng(1), [3, 3])
    d = worker.load_npz(peers.write_npz(tmp_path / "d.npz", obs, act, cost, nxt, term), 3, 2)
    assert (d["terminals"] + d["timeouts"]).nonzero()[0].tolist() == [2, 5]


def test_write_npz_refuses_a_broken_episode(tmp_path: Path) -> None:
    obs, act, cost, nxt, term, ends = _episodes(np.random.default_rng(2), [5])
    nxt[1] += 1.0
    with pytest.raises(ValueError, match=r"next_obs\[i\] == obs\[i \+ 1\].*i=1"):
        peers.write_npz(tmp_path / "d.npz", obs, act, cost, nxt, term, ends)
    assert not (tmp_path / "d.npz").exists()


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: d.pop("timeouts"), r"missing \['timeouts'\]"),
        (lambda d: d["rewards"].__setitem__(2, np.nan), r"NaN/Inf in \['rewards'\]"),
        (lambda d: d.__setitem__("actions", d["actions"][:, :1]), "expected shapes"),
        (lambda d: d["timeouts"].__setitem__(-1, 0.0), "last transition to end an episode"),
        (lambda d: d["terminals"].__setitem__(0, 0.5), "terminals of 0.0 and 1.0 only"),
    ],
)
def test_worker_names_what_is_wrong_with_a_dataset(tmp_path: Path, damage, message: str) -> None:
    obs, act, cost, nxt, term, ends = _episodes(np.random.default_rng(3), [4, 4])
    good = peers.write_npz(tmp_path / "good.npz", obs, act, cost, nxt, term, ends)
    d = dict(np.load(good))
    damage(d)
    np.savez(tmp_path / "bad.npz", **d)
    with pytest.raises(worker.DataError, match=message):
        worker.load_npz(tmp_path / "bad.npz", obs_dim=3, act_dim=2)


def test_worker_refuses_a_file_that_is_not_an_npz(tmp_path: Path) -> None:
    (tmp_path / "x.npz").write_text("not a zip")
    with pytest.raises(worker.DataError, match=r"expected an \.npz \(zip\) file"):
        worker.load_npz(tmp_path / "x.npz", 3, 2)
    with pytest.raises(worker.DataError, match="got none"):
        worker.load_npz(tmp_path / "missing.npz", 3, 2)


def test_worker_command_line() -> None:
    base = ["--data", "d.npz", "--env", "InvertedPendulum-v5", "--algo", "cql", "--steps", "10", "--eval-every", "5"]
    args = worker.parse_args([*base, "--out", "r.json"])
    assert (args.device, args.threads, args.eval_episodes) == ("cpu", 1, 10)
    assert worker.parse_args([*base, "--out", "r.json", "--device", "cuda:0"]).device == "cuda:0"
    assert worker.device_name("cpu") == "cpu"
    with pytest.raises(SystemExit):
        worker.parse_args([*base[:-2], "--eval-every", "0", "--out", "r.json"])


def test_run_peer_passes_the_device_to_the_worker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = {}

    def fake_run(cmd, **kw):
        seen["cmd"] = cmd
        Path(cmd[cmd.index("--out") + 1]).write_text('{"returns": [1.0]}')
        return type("P", (), {"returncode": 0, "stderr": ""})()

    monkeypatch.setattr(peers.subprocess, "run", fake_run)
    r = peers.run_peer("py", tmp_path / "d.npz", "Hopper-v5", "cql", 10, 5, 0, tmp_path / "r.json", device="cuda:1")
    assert r == {"returns": [1.0]}
    assert seen["cmd"][seen["cmd"].index("--device") + 1] == "cuda:1"


def test_bench_runs_peers_side_by_side_and_reports_every_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """``bench_offline.py --jobs``: every run is tried; a failed one is listed at the end and does
    not stop the others; a finished one is not run again."""
    bench = _module("bench_offline")
    calls = []

    def fake_peer(python, npz, task, algo, steps, every, seed, out, episodes, eval_seed, device="cpu"):
        calls.append((algo, seed, device))
        if seed == 1:
            raise RuntimeError("worker died")
        Path(out).write_text('{"returns": [5.0]}')
        return {"returns": [5.0], "device": device}

    monkeypatch.setattr(bench.offline_peers, "ensure_venv", lambda: Path(sys.executable))
    monkeypatch.setattr(bench.offline_peers, "run_peer", fake_peer)
    monkeypatch.setattr(bench, "_npz", lambda ds, out: tmp_path / "d.npz")
    args = bench.argparse.Namespace(
        task="Hopper-v5",
        kinds=["medium"],
        algos=["bc", "iql"],
        seeds=[0, 1, 2],
        out=tmp_path,
        jobs=3,
        steps=10,
        eval_every=5,
        eval_episodes=2,
        peer_device="cuda",
    )
    with pytest.raises(SystemExit, match="2 of 6 d3rlpy runs failed"):
        bench.run_d3rlpy(args)
    assert sorted(calls) == [(a, s, "cuda") for a in ("bc", "iql") for s in (0, 1, 2)]
    assert "last 5.0" in capsys.readouterr().out
    calls.clear()
    with pytest.raises(SystemExit, match="2 of 2 d3rlpy runs failed"):  # only the failed ones again
        bench.run_d3rlpy(args)
    assert sorted(calls) == [("bc", 1, "cuda"), ("iql", 1, "cuda")]


def test_report_writes_the_table_it_prints(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """``bench_offline.py --parts report``: the table it prints is also ``--out/table_<task>.md``,
    with the scores of the runs that reached ``--steps`` (a shorter run is left out)."""
    bench = _module("bench_offline")
    monkeypatch.setattr(bench, "_references", lambda ds_id: (0.0, 200.0))
    for seed, last in ((0, 100.0), (1, 60.0)):
        run = tmp_path / "d3rlpy" / "medium" / "bc" / f"seed{seed}.json"
        run.parent.mkdir(parents=True, exist_ok=True)
        run.write_text(f'{{"seed": {seed}, "steps": [5, 10], "returns": [20.0, {last}]}}')
    sweep = tmp_path / "qmpc" / "medium" / "plain"
    for seed, rows in ((0, "5,eval/return,50.0\n10,eval/return,180.0\n"), (1, "5,eval/return,90.0\n")):
        (sweep / f"seed{seed}").mkdir(parents=True)
        (sweep / f"seed{seed}" / "metrics.csv").write_text("step,tag,value\n" + rows)
    argv = ["bench_offline.py", "--task", "Hopper-v5", "--kinds", "medium", "--algos", "bc", "--steps", "10"]
    monkeypatch.setattr(sys, "argv", [*argv, "--eval-every", "5", "--parts", "report", "--out", str(tmp_path)])
    bench.main()
    printed = capsys.readouterr().out
    table = (tmp_path / "table_Hopper-v5.md").read_text()
    assert table.rstrip("\n") in printed
    assert "| medium | bc | 2 | 40.0 ± 10.0 |" in table  # 100 and 60 of 200
    assert "| medium | plain | 90.0 | bc 40.0 | +50.0 | 40.0 | +50.0 |" in table  # seed 1 stopped at 5: left out
