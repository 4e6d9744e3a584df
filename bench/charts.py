"""PNG charts: accuracy vs trainable-parameter share, and step time / peak memory per method."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.methods import METHODS
from bench.report import TASK_NAMES


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    """Lay out, write ``path`` (PNG, 110 dpi) and close ``fig``."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def _accuracy_axes(ax: Any, xlabel: str, title: str) -> None:
    """Log-scale x axis, test accuracy on y, grid and legend: the look of every accuracy chart."""
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()


def accuracy_chart(acc: dict, suite: str, folder: Path) -> Path | None:
    """Accuracy (mean ± std over seeds) against trainable share (log scale), one marker per task."""
    points = [(k, v) for k, v in acc.items() if k[1] == "deltatune"]
    if not points:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, task in enumerate(sorted({k[2] for k, _ in points})):
        rows = [(k, v) for k, v in points if k[2] == task]
        xs = [100 * v["trainable"] / v["base_params"] for _, v in rows]
        ax.errorbar(xs, [v["mean"] for _, v in rows], yerr=[v["std"] for _, v in rows], fmt="os^"[i % 3],
                    capsize=3, linestyle="none", label=TASK_NAMES.get(task, task))
        for x, (k, v) in zip(xs, rows):
            ax.annotate(k[0], (x, v["mean"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    _accuracy_axes(ax, "trainable parameters (% of the model, log scale)",
                   "MiniLM: accuracy vs trainable share (deltatune)")
    return _save(fig, folder / f"{suite}_accuracy_vs_params.png")


def cost_chart(cost: dict, suite: str, folder: Path) -> Path | None:
    """Two bar panels (step time, peak memory above baseline), deltatune and peft side by side."""
    task = "trec" if any(k[2] == "trec" for k in cost) else next((k[2] for k in cost), None)
    if task is None:
        return None
    methods = [m for m in METHODS if (m, "deltatune", task) in cost or (m, "peft", task) in cost]
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, scale, label in ((axes[0], "step_s", 1000, "median step time (ms)"),
                                  (axes[1], "peak_mb", 1, "peak training memory above baseline (MB)")):
        for j, lib in enumerate(("deltatune", "peft")):
            xs = [i + (j - 0.5) * 0.4 for i, m in enumerate(methods) if (m, lib, task) in cost]
            ys = [(cost[(m, lib, task)][key] or 0) * scale for m in methods if (m, lib, task) in cost]
            ax.bar(xs, ys, width=0.4, label=lib)
        ax.set_xticks(range(len(methods)), methods, rotation=45, ha="right")
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
        ax.legend()
    fig.suptitle(f"Training cost per method (MiniLM, {TASK_NAMES.get(task, task)}, 2 threads)")
    return _save(fig, folder / f"{suite}_cost.png")


def lowdata_chart(raw: dict[str, Any], acc: dict, folder: Path) -> Path | None:
    """Accuracy against the number of training examples (log scale), one line per method."""
    from bench.aggregate import accuracy

    low = accuracy(raw, "lowdata")
    if not low:
        return None
    task = raw["settings"]["lowdata_task"]
    points = dict(low) | {k: v for k, v in acc.items() if k[1] == "deltatune" and k[2] == task}
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in [m for m in METHODS if any(k[0] == m for k in low)]:
        rows = sorted((k[3], v) for k, v in points.items() if k[0] == m)
        ax.errorbar([n for n, _ in rows], [v["mean"] for _, v in rows], yerr=[v["std"] for _, v in rows],
                    marker="o", capsize=3, label=METHODS[m].label)
    _accuracy_axes(ax, "training examples (log scale)",
                   f"Low-data regime: MiniLM on {TASK_NAMES.get(task, task)}")
    return _save(fig, folder / f"{raw['suite']}_lowdata.png")


def write_charts(raw: dict[str, Any], acc: dict, cost: dict, folder: Path) -> list[Path]:
    charts = (accuracy_chart(acc, raw["suite"], folder), cost_chart(cost, raw["suite"], folder),
              lowdata_chart(raw, acc, folder))
    return [p for p in charts if p]
