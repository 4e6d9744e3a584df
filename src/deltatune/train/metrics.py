"""Evaluation metrics and the ``metrics.jsonl`` log.

* accuracy = (1/N) sum_i [pred_i == y_i]
* macro-F1 = (1/C) sum_c F1_c with F1_c = 2 TP_c / (2 TP_c + FP_c + FN_c); a class with no true and
  no predicted example scores 0 (scikit-learn's ``zero_division=0``)
* perplexity = exp(mean token cross-entropy)
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def accuracy(pred: Sequence[int], gold: Sequence[int]) -> float:
    """Share of positions where ``pred`` equals ``gold``."""
    if not gold:
        return float("nan")
    return sum(p == g for p, g in zip(pred, gold)) / len(gold)


def macro_f1(pred: Sequence[int], gold: Sequence[int], num_classes: int) -> float:
    """Unweighted mean of per-class F1 over ``num_classes`` classes (classes absent from both count 0)."""
    if not gold:
        return float("nan")
    scores = []
    for c in range(num_classes):
        tp = sum(p == c and g == c for p, g in zip(pred, gold))
        fp = sum(p == c and g != c for p, g in zip(pred, gold))
        fn = sum(p != c and g == c for p, g in zip(pred, gold))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return sum(scores) / num_classes


def perplexity(mean_loss: float) -> float:
    """``exp(mean_loss)``, ``inf`` where that overflows."""
    try:
        return math.exp(mean_loss)
    except OverflowError:
        return float("inf")


def majority_baseline(train_labels: Sequence[str], test_labels: Sequence[str]) -> tuple[str, float]:
    """(most frequent training label, accuracy of always predicting it on ``test_labels``)."""
    majority = max(sorted(set(train_labels)), key=list(train_labels).count)
    return majority, (sum(t == majority for t in test_labels) / len(test_labels) if test_labels else float("nan"))


class MetricsLog:
    """Append-only ``metrics.jsonl``: one JSON object per line, each with ``step`` and ``kind``.

    On resume :meth:`truncate` drops records written after the checkpoint, so the file reads as if the
    run had never stopped.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    def read(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        records = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a kill
                continue
        return records

    def truncate(self, step: int) -> None:
        """Keep only records of steps <= ``step``, minus end-of-run evaluations (``final``), which are redone."""
        kept = [r for r in self.read() if r.get("step", 0) <= step and not r.get("final")]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
