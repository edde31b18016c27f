"""Training curves from ``<run_dir>/metrics.jsonl`` as PNG files.

Uses matplotlib's object API with the Agg canvas (no pyplot, so the caller's backend and open
figures are untouched; works headless). Smoothing is TensorBoard's: a debiased exponential moving
average with weight ``smooth`` in [0, 1) (0 = raw); the raw curve is drawn faintly underneath.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Mapping, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .tracking import read_metrics

__all__ = ["plot_curves", "plot_many", "ema"]


def ema(values: Sequence[float], weight: float) -> list[float]:
    """Debiased EMA: ``m_t = w m_{t-1} + (1-w) x_t``, output ``m_t / (1 - w^t)`` (t from 1)."""
    if not 0.0 <= weight < 1.0:
        raise ValueError(f"smooth must be in [0, 1), got {weight!r}")
    out, acc = [], 0.0
    for t, x in enumerate(values, start=1):
        acc = weight * acc + (1.0 - weight) * x
        out.append(acc / (1.0 - weight ** t))
    return out


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for i, row in enumerate(rows):
        value = row.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            steps.append(int(row.get("step", i)))
            values.append(float(value))
    return steps, values


def _available(rows: list[dict]) -> list[str]:
    return sorted({k for row in rows for k, v in row.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)})


def _draw(ax, steps: list[int], values: list[float], smooth: float, label: str | None, color=None):
    if smooth > 0:
        raw = ax.plot(steps, values, alpha=0.25, linewidth=1, color=color)[0]
        ax.plot(steps, ema(values, smooth), linewidth=1.8, color=raw.get_color(), label=label)
    else:
        ax.plot(steps, values, linewidth=1.5, color=color, label=label)


def _save(fig: Figure, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(out, format="png", dpi=120)
    return out


def plot_curves(run_dir: str | os.PathLike, keys: Sequence[str] | str = ("reward/mean",),
                out: str | os.PathLike = "reward_curve.png", smooth: float = 0.6,
                title: str | None = None) -> Path:
    """One PNG with one panel per metric key against ``step``; returns its path.

    A relative ``out`` is placed in ``run_dir``. A key absent from every row raises ValueError
    listing the metrics the run has.
    """
    if isinstance(keys, str):
        keys = [keys]
    keys = list(keys)
    if not keys:
        raise ValueError("plot_curves: keys is empty")
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    series = {key: _series(rows, key) for key in keys}
    missing = [key for key, (steps, _) in series.items() if not steps]
    if missing:
        raise ValueError(f"plot_curves: no values for {missing} in {run_dir}/metrics.jsonl; "
                         f"metrics present: {_available(rows)}")
    ema([], smooth)  # validate smooth before drawing
    fig = Figure(figsize=(6.4, 2.6 * len(keys) + 0.6), layout="constrained")
    axes = fig.subplots(len(keys), 1, sharex=True, squeeze=False)[:, 0]
    for ax, key in zip(axes, keys):
        _draw(ax, *series[key], smooth, label=None)
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("step")
    axes[0].set_title(title or run_dir.name)
    out = Path(out)
    return _save(fig, out if out.is_absolute() else run_dir / out)


def plot_many(runs: Mapping[str, str | os.PathLike], key: str, out: str | os.PathLike,
              smooth: float = 0.6, title: str | None = None) -> Path:
    """Compare runs on one figure: one line per ``{label: run_dir}`` for metric ``key``; returns
    the PNG path (``out`` relative to the current directory). Every run must have the key."""
    if not runs:
        raise ValueError("plot_many: runs is empty")
    ema([], smooth)
    fig = Figure(figsize=(7.2, 4.4), layout="constrained")
    ax = fig.subplots()
    for label, run_dir in runs.items():
        rows = read_metrics(run_dir)
        steps, values = _series(rows, key)
        if not steps:
            raise ValueError(f"plot_many: run {label!r} ({run_dir}) has no values for {key!r}; "
                             f"metrics present: {_available(rows)}")
        _draw(ax, steps, values, smooth, label=str(label))
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.set_title(title or key)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    return _save(fig, Path(out))
