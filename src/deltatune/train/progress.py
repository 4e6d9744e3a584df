"""Console output of a training run: a tqdm bar with loss, learning rate and throughput, or quiet lines."""

from __future__ import annotations

import sys
from typing import Any


def _fmt(metrics: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k != "tokens")


class Progress:
    """A progress bar over optimizer steps (``quiet``: no bar, no per-evaluation lines, one final line)."""

    def __init__(self, total: int, quiet: bool) -> None:
        self.total, self.quiet = total, quiet
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
        if self.quiet:
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
