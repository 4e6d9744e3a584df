"""Console output of a training run: a tqdm bar with loss, learning rate and throughput, or quiet lines."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any


def batch_bar(desc: str) -> Callable[[int, int], None]:
    """A ``(done, total)`` callback drawing a tqdm bar on stderr, opened at the first call, closed at the last."""
    state: dict[str, Any] = {}

    def update(done: int, total: int) -> None:
        from tqdm.auto import tqdm

        if "bar" not in state:
            state["bar"] = tqdm(total=total, unit="batch", desc=desc, dynamic_ncols=True, leave=False, file=sys.stderr)
        state["bar"].update(done - state["bar"].n)
        if done >= total:
            state["bar"].close()

    return update


def _fmt(metrics: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k != "tokens")


class Progress:
    """A progress bar over optimizer steps (``quiet``: no bar, no per-evaluation lines, one final line)."""

    def __init__(self, total: int, quiet: bool, bar: bool = True) -> None:
        self.total, self.quiet, self.use_bar = total, quiet, bar
        self.bar: Any = None
        self.smoothed: float | None = None

    def say(self, text: str) -> None:
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr)

    def start(self, initial: int) -> None:
        if self.quiet or not self.use_bar:
            return
        from tqdm.auto import tqdm

        self.bar = tqdm(total=self.total, initial=initial, unit="step", desc="train", dynamic_ncols=True,
                        file=sys.stderr)

    def update(self, record: dict[str, Any]) -> None:
        loss = record["loss"]
        self.smoothed = loss if self.smoothed is None else 0.9 * self.smoothed + 0.1 * loss
        if self.bar is None:
            return
        seconds = max(record["seconds"], 1e-9)
        self.bar.set_postfix(loss=f"{self.smoothed:.4f}", lr=f"{record['lr']:.2e}",
                             ex_s=f"{record['examples'] / seconds:.1f}", tok_s=f"{record['tokens'] / seconds:.0f}",
                             refresh=False)
        self.bar.update(1)

    def batches(self, desc: str) -> Callable[[int, int], None] | None:
        """A ``(done, total)`` callback that shows a bar over evaluation batches (``None`` when quiet)."""
        if self.quiet or not self.use_bar:
            return None
        return batch_bar(desc)

    def say_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self.say(f"step {step}: validation {_fmt(metrics)}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def say_summary(self, summary: dict[str, Any]) -> None:
        parts = [f"{split}: {_fmt(m)}" for split, m in summary["final"].items()]
        line = (f"done: {summary['steps']} steps in {summary['wall_time_s']:.1f}s; " + "; ".join(parts)
                + f"; trainable {summary['trainable_params']:,} ({100 * summary['trainable_share']:.2f}%)"
                f"; adapter {summary['adapter_bytes'] / 1024:.0f} KiB")
        print(line, file=sys.stderr)
