"""A run's training metrics: ``metrics.csv`` (``step,tag,value``), TensorBoard events in ``tb/``,
and ``learning_curve.png`` drawn from the CSV."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from qmpc.data import atomic_write, ensure_dir

__all__ = ["MetricsLogger", "plot_learning_curve", "read_metrics"]


class MetricsLogger:
    """Scalars to ``metrics.csv`` (``step,tag,value``) and TensorBoard (``tb/``)."""

    def __init__(self, run_dir: Path, resume_step: int | None = None):
        self.path = run_dir / "metrics.csv"
        if resume_step is not None and self.path.exists():  # drop what was logged after the checkpoint
            with open(self.path) as f:
                rows = [r for r in csv.reader(f)][1:]
            keep = [r for r in rows if int(r[0]) <= resume_step]
            atomic_write(self.path, lambda tmp: _write_rows(tmp, keep))
        elif not self.path.exists() or resume_step is None:
            atomic_write(self.path, lambda tmp: _write_rows(tmp, []))
        self._f = open(self.path, "a", newline="")
        self._csv = csv.writer(self._f)
        try:
            from torch.utils.tensorboard import SummaryWriter

            # the checkpoint's own step was logged before the checkpoint was written: keep it
            purge = None if resume_step is None else resume_step + 1
            tb_dir = ensure_dir(run_dir / "tb", "the TensorBoard directory")
            self.tb = SummaryWriter(str(tb_dir), purge_step=purge)
        except ImportError:  # tensorboard is a dependency; keep the CSV if it is missing
            self.tb = None

    def log(self, step: int, values: dict[str, float]) -> None:
        for tag, v in values.items():
            self._csv.writerow([step, tag, f"{float(v):.8g}"])
            if self.tb is not None:
                self.tb.add_scalar(tag, float(v), step)
        self._f.flush()

    def close(self) -> None:
        self._f.close()
        if self.tb is not None:
            self.tb.close()


def _write_rows(path: str, rows: list[list[str]]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "tag", "value"])
        w.writerows(rows)


def read_metrics(path: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{tag: (steps, values)}`` from a ``metrics.csv``."""
    out: dict[str, tuple[list, list]] = {}
    with open(path) as f:
        for row in list(csv.reader(f))[1:]:
            s, v = out.setdefault(row[1], ([], []))
            s.append(int(row[0]))
            v.append(float(row[2]))
    return {k: (np.array(s), np.array(v)) for k, (s, v) in out.items()}


def plot_learning_curve(run_dir: Path) -> Path:
    """``learning_curve.png``: evaluation return, TD loss and solver statistics against steps.

    Drawn on a :class:`matplotlib.figure.Figure` with its own Agg canvas, without pyplot: the
    process's matplotlib backend (the user's, in a notebook) stays as it was."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    m = read_metrics(run_dir / "metrics.csv")
    panels = [
        ("eval/return", "evaluation return (= −cost)"),
        ("train/td_loss", "TD loss"),
        ("solver/fail_frac", "failed solves (fraction)"),
        ("solver/solve_ms", "batch solve time (ms)"),
    ]
    if "model/loss" in m:
        panels.append(("model/loss", "dynamics model loss (normalised MSE)"))
    fig = Figure(figsize=(4 * len(panels), 3.2))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels))
    for ax, (tag, title) in zip(axes, panels, strict=True):
        if tag in m:
            ax.plot(*m[tag], marker="o" if tag == "eval/return" else None, ms=3)
        if tag in ("train/td_loss", "model/loss") and tag in m and (m[tag][1] > 0).all():
            ax.set_yscale("log")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = run_dir / "learning_curve.png"
    atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=90, format="png"))
    return out
