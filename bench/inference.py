"""Inference overhead: forward latency of each method at batch 8 x 128 tokens, as a ratio to the base.

All variants live in one process, each on its own deep copy of MiniLM, and are timed in interleaved
rounds (the order rotates every round), so drifts in machine load hit every variant alike. The ratio
of a variant is the median over rounds of (its time / the base model's time in the same round).
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from bench.methods import available, build


def _variants(base: nn.Module) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """``{label: model}`` for every method available, and ``{label: reason}`` for the others."""
    plan: list[tuple[str, str, str, Callable[[nn.Module], Any] | None]] = [
        ("LoRA unmerged", "lora", "deltatune", None),
        ("LoRA merged", "lora", "deltatune", lambda m: m.merge_adapter()),
        ("IA3 unmerged", "ia3", "deltatune", None),
        ("Houlsby adapter", "houlsby", "deltatune", None),
        ("Pfeiffer adapter", "pfeiffer", "deltatune", None),
        ("Parallel adapter", "parallel", "deltatune", None),
        ("Prefix tuning", "prefix", "deltatune", None),
        ("Prompt tuning", "prompt", "deltatune", None),
        ("peft LoRA unmerged", "lora", "peft", None),
        ("peft LoRA merged", "lora", "peft", lambda m: m.merge_adapter()),
        ("peft IA3 unmerged", "ia3", "peft", None),
        ("peft prompt tuning", "prompt", "peft", None),
    ]
    models: dict[str, nn.Module] = {"Base model": base}
    missing: dict[str, str] = {}
    for label, name, lib, after in plan:
        reason = available(name, lib)
        if reason is None:
            try:
                model = build(copy.deepcopy(base), name, lib, "SEQ_CLS")
                if after is not None:
                    after(model)
                models[label] = model.eval()
            except Exception as exc:  # noqa: BLE001 - a method that cannot run is reported, not fatal
                reason = f"{type(exc).__name__}: {exc}"
        if reason is not None:
            missing[label] = reason
    return models, missing


def run(job: dict[str, Any]) -> dict[str, Any]:
    """Time ``job["rounds"]`` interleaved rounds of ``job["reps"]`` forwards per variant."""
    from transformers import AutoModelForSequenceClassification

    from deltatune.bundled import bundled_model_path

    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(bundled_model_path("minilm"), num_labels=6).eval()
    models, missing = _variants(base)
    batch, length = job.get("batch", 8), job.get("length", 128)
    ids = torch.randint(1000, 20000, (batch, length), generator=torch.Generator().manual_seed(0))  # (B, T)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    names = list(models)
    times: dict[str, list[float]] = {n: [] for n in names}
    with torch.inference_mode():
        for name in names:  # warm-up
            for _ in range(2):
                models[name](**inputs)
        for r in range(job["rounds"]):
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                t0 = time.perf_counter()
                for _ in range(job["reps"]):
                    models[name](**inputs)
                times[name].append((time.perf_counter() - t0) / job["reps"])
    base_t = times["Base model"]
    rows = {
        n: {"median_ms": 1000 * statistics.median(t), "ratio": statistics.median(x / b for x, b in zip(t, base_t))}
        for n, t in times.items()
    }
    return {"batch": batch, "length": length, "rounds": job["rounds"], "reps": job["reps"], "rows": rows, "missing": missing}
