"""PNG plots of a run's ``metrics.jsonl`` (matplotlib, headless ``Agg`` backend).

* ``loss.png``: training loss per optimizer step (light) with a moving average, and the validation loss
  at each evaluation.
* ``metric.png``: the task's evaluation metric over steps (accuracy and macro-F1 for classification,
  perplexity for language models).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _moving_average(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def write_plots(records: list[dict[str, Any]], folder: Path) -> list[Path]:
    """Write ``loss.png`` and ``metric.png`` into ``folder``; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval" and r.get("split") == "validation"]
    written = []
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        steps, losses = [r["step"] for r in train], [r["loss"] for r in train]
        ax.plot(steps, losses, color="tab:blue", alpha=0.25, linewidth=0.8, label="train loss (step)")
        ax.plot(steps, _moving_average(losses, max(1, len(losses) // 20)), color="tab:blue", label="train loss (avg)")
    if evals:
        ax.plot([r["step"] for r in evals], [r["loss"] for r in evals], "o-", color="tab:orange", label="validation loss")
    ax.set(xlabel="optimizer step", ylabel="loss", title="Loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "loss.png", dpi=100)
    plt.close(fig)
    written.append(folder / "loss.png")
    names = [k for k in ("accuracy", "macro_f1", "perplexity") if evals and k in evals[0]]
    fig, ax = plt.subplots(figsize=(7, 4))
    for name in names:
        ax.plot([r["step"] for r in evals], [r[name] for r in evals], "o-", label=f"validation {name}")
    ax.set(xlabel="optimizer step", ylabel=" / ".join(names) or "metric", title="Evaluation metric")
    if names:
        ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "metric.png", dpi=100)
    plt.close(fig)
    written.append(folder / "metric.png")
    return written
