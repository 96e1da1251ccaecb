"""Issue 17, items 1 and 5: the CLI never deletes a user's files and never writes into ``models/``
unasked."""

from pathlib import Path

import pytest

from qmpc.cli import main
from qmpc.errors import InputError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("where", ["data", "run"])
def test_demo_refuses_to_delete_a_users_files(where, tmp_path, capsys):
    """``qmpc demo --out DIR`` used to ``rmtree`` ``DIR/data`` and ``DIR/run`` whatever they held."""
    out = tmp_path / "out"
    mine = out / where / "notes.txt"
    mine.parent.mkdir(parents=True)
    mine.write_text("mine")
    try:
        rc = main(["demo", "--out", str(out), "--steps", "2", "--data-steps", "20", "--no-progress"])
    finally:
        assert mine.exists() and mine.read_text() == "mine", "the demo deleted a file it did not write"
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("qmpc demo: error: expected ")
    assert str(out / where) in err and "--overwrite" in err
    from qmpc.demo import DEMO_MARKER

    assert not (out / DEMO_MARKER).exists()


def test_demo_replaces_only_its_own_output_or_with_overwrite(tmp_path):
    from qmpc.demo import DEMO_MARKER, prepare_out_dir

    out = tmp_path / "out"
    prepare_out_dir(out)  # a new directory: marked as the demo's
    assert (out / DEMO_MARKER).is_file()
    for name in ("data", "run"):
        (out / name).mkdir()
        (out / name / "x").write_text("demo output")
    (out / "rollout.png").write_bytes(b"png")
    (out / "other.txt").write_text("not the demo's: kept")
    prepare_out_dir(out)  # an earlier demo's output: replaced
    assert not (out / "data").exists() and not (out / "run").exists() and not (out / "rollout.png").exists()
    assert (out / "other.txt").read_text() == "not the demo's: kept"

    user = tmp_path / "user"
    (user / "run").mkdir(parents=True)
    (user / "rollout.png").write_bytes(b"a user's plot")
    with pytest.raises(InputError, match=r"expected .* got .*rollout\.png"):
        prepare_out_dir(user)
    assert (user / "rollout.png").read_bytes() == b"a user's plot"
    prepare_out_dir(user, overwrite=True)
    assert not (user / "run").exists() and not (user / "rollout.png").exists()
    assert (user / DEMO_MARKER).is_file()


def test_demo_out_that_is_a_file_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["demo", "--out", str(blocker), "--no-progress"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert blocker.read_text() == "x"


def test_run_writes_its_default_plot_in_the_working_directory(tmp_path, monkeypatch, capsys):
    """``qmpc run models/X.pt`` used to write ``models/rollout_h1.png`` (into the repository)."""
    models = ROOT / "models"
    before = set(models.iterdir())
    monkeypatch.chdir(tmp_path)
    try:
        assert main(["run", str(models / "inverted_pendulum.pt"), "--episodes", "1", "--budget-ms", "0"]) == 0
        new = set(models.iterdir()) - before
        assert not new, f"qmpc run wrote {sorted(p.name for p in new)} into models/"
    finally:
        for p in set(models.iterdir()) - before:  # the unfixed code's stray plot
            p.unlink()
    plot = tmp_path / "rollout_inverted_pendulum_h1.png"
    assert plot.is_file() and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = [line[len("plot: ") :] for line in capsys.readouterr().out.splitlines() if line.startswith("plot: ")]
    assert [Path(p).resolve() for p in printed] == [plot.resolve()]
