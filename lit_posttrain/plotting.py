"""Plot training curves from the metrics a run logged with Lightning's `CSVLogger`.

    from lit_posttrain.plotting import plot_metrics

    fig = plot_metrics("outputs/quickstart-grpo", ["train/reward", "train/kl"], smoothing=0.6)
    fig.savefig("curves.png")

In a notebook the returned figure displays itself as the cell's last expression (after
``%matplotlib inline``). The figure is a plain `matplotlib.figure.Figure`, not registered with
``pyplot``: scripts that make many figures do not accumulate them, and a notebook shows it once.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def find_metrics_csv(log_dir: str | os.PathLike) -> Path:
    """The ``metrics.csv`` that ``log_dir`` names.

    ``log_dir`` is the file itself, a version directory that holds it
    (``<save_dir>/lightning_logs/version_3``), or any directory above (``<save_dir>``): then the
    newest ``metrics.csv`` below it (the most recent run).

    Raises:
        FileNotFoundError: nothing there, or no ``metrics.csv`` below the directory.
    """
    path = Path(log_dir)
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such file or directory (expected a CSVLogger log directory or metrics.csv)")
    if (path / "metrics.csv").is_file():
        return path / "metrics.csv"
    found = sorted(path.rglob("metrics.csv"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(
            f"{path}: no metrics.csv below it; log with lightning.pytorch.loggers.CSVLogger (the quickstarts do)"
        )
    return found[-1]


def read_metrics(log_dir: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
    """Every metric in a CSVLogger ``metrics.csv`` as ``{name: [(step, value), ...]}``.

    CSVLogger writes one sparse row per logging call (a metric's column is empty where another
    metric was logged), so each metric keeps only the rows where it has a value. ``step`` is
    the Trainer's global step of the row (for GRPO and RLOO: generation batches, see their
    docstrings).
    """
    path = find_metrics_csv(log_dir)
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return {}
    series: dict[str, list[tuple[int, float]]] = {}
    for name in rows[0]:
        if name in ("step", "epoch"):
            continue
        values = [(int(float(row["step"])), float(row[name])) for row in rows if row.get(name) not in (None, "")]
        if values:
            series[name] = values
    return series


def smooth(values: Sequence[float], smoothing: float) -> list[float]:
    """Exponential moving average with TensorBoard's debiasing (``smoothing`` in [0, 1); 0: unchanged).

    >>> smooth([0.0, 1.0, 1.0], 0.5)  # debiased: the first value is kept, not pulled to 0
    [0.0, 0.6666666666666666, 0.8571428571428571]
    """
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
    out, average, weight = [], 0.0, 0.0
    for value in values:
        average = smoothing * average + (1.0 - smoothing) * value
        weight = smoothing * weight + (1.0 - smoothing)
        out.append(average / weight)
    return out


def plot_metrics(
    log_dir: str | os.PathLike,
    metrics: Sequence[str],
    *,
    smoothing: float = 0.0,
    columns: int = 3,
    title: str | None = None,
) -> Figure:
    """One panel per metric, value against step, from a CSVLogger run.

    Args:
        log_dir: the run's ``metrics.csv``, its version directory, or a directory above it (the
            newest run below is used; see `find_metrics_csv`).
        metrics: names as logged, e.g. ``["train/reward", "train/kl", "val/reward"]``.
        smoothing: exponential moving average weight in [0, 1) (TensorBoard's slider); the raw
            curve stays visible, faint, behind the smoothed one. 0 plots the raw values only.
        columns: panels per row.
        title: the figure's title (default: the metrics file's path).

    Returns:
        The `matplotlib.figure.Figure`; ``fig.axes[i].lines[0]`` holds the raw values of
        ``metrics[i]``.

    Raises:
        KeyError: a metric the run did not log, naming it and listing the ones it did.
    """
    if isinstance(metrics, str):
        metrics = [metrics]
    if not metrics:
        raise ValueError("metrics is empty: name at least one logged metric, e.g. ['train/loss']")
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
    try:
        from matplotlib.figure import Figure
    except ImportError as err:  # the library's own install does not need matplotlib
        raise ImportError("plot_metrics needs matplotlib: pip install matplotlib (or 'lit-posttrain[docs]')") from err
    path = find_metrics_csv(log_dir)
    series = read_metrics(path)
    missing = [name for name in metrics if name not in series]
    if missing:
        raise KeyError(
            f"{path}: no values logged for {', '.join(repr(m) for m in missing)}; "
            f"logged metrics: {', '.join(sorted(series)) or '(none)'}"
        )
    columns = max(1, min(columns, len(metrics)))
    rows = math.ceil(len(metrics) / columns)
    fig = Figure(figsize=(4.2 * columns, 3.0 * rows), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for ax, name in zip(axes, metrics):
        steps = [step for step, _ in series[name]]
        values = [value for _, value in series[name]]
        marker = "o" if len(values) <= 12 else None  # validation metrics: a few points
        if smoothing > 0:
            ax.plot(steps, values, color="C0", alpha=0.3, marker=marker, label="raw")
            ax.plot(steps, smooth(values, smoothing), color="C0", label=f"smoothed ({smoothing})")
            ax.legend(fontsize="small")
        else:
            ax.plot(steps, values, color="C0", marker=marker)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in axes[len(metrics) :]:
        ax.set_visible(False)
    fig.suptitle(title if title is not None else str(path), fontsize="small")
    return fig
