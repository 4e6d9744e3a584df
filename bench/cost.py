"""Training cost on MiniLM: peak memory and file size (one process per configuration), step time
(all configurations in one process, interleaved).

* ``memory`` job: load, apply the method, take the baseline (:class:`bench.measure.PeakMemory`), train
  ``steps`` steps, read the peak; then save the adapter and measure the folder.
* ``timing`` job: every configuration is built in one process; after ``warmup`` steps each, they take
  turns, ``per_round`` steps at a time, for ``rounds`` rounds, with a rotating order, all on the same
  batches. A configuration's step time is the median of its steps; its ratio to full fine-tuning is the
  median over rounds of (its round time / full fine-tuning's time in that round), so load that drifts
  during the run hits all configurations alike.
"""

from __future__ import annotations

import statistics
import tempfile
from typing import Any

import torch

from bench.classify import batches_for, load_model, prepare
from bench.loop import Trainer
from bench.measure import PeakMemory, folder_bytes
from bench.methods import METHODS, head_modules


def _save_bytes(model: torch.nn.Module, name: str) -> int:
    """Bytes on disk of what this method must store: the adapter folder, the head, or the whole model."""
    with tempfile.TemporaryDirectory() as tmp:
        if METHODS[name].kind == "head":
            from safetensors.torch import save_file

            heads = head_modules(model)
            save_file({f"{i}.{k}": v.contiguous() for i, h in enumerate(heads) for k, v in h.state_dict().items()},
                      f"{tmp}/head.safetensors")
        else:
            model.save_pretrained(tmp)
        return folder_bytes(tmp)


def run_memory(job: dict[str, Any]) -> dict[str, Any]:
    """Peak RSS above the loaded baseline over ``job["steps"]`` training steps, and the saved size."""
    prep = prepare(job)
    batches = batches_for(prep, job | {"epochs": 1, "max_steps": job["steps"]}, seed=0)
    model, counts = load_model(prep, job["method"], job["lib"], seed=0)
    trainer = Trainer(model, lr=METHODS[job["method"]].lr, total_steps=len(batches))
    memory = PeakMemory()
    memory.start(model)
    model.train()
    for batch in batches:
        trainer.step(batch)
    peak = memory.peak_mb()
    return {**counts, "peak_mb": peak, "baseline_mb": memory.baseline_mb(), "mem_method": memory.method,
            "steps": len(batches), "file_bytes": _save_bytes(model, job["method"])}


def run_timing(job: dict[str, Any]) -> dict[str, Any]:
    """Median step time of each configuration in ``job["configs"]``, measured interleaved."""
    prep = prepare(job)
    warmup, rounds, per_round = job["warmup"], job["rounds"], job["per_round"]
    batches = batches_for(prep, job | {"epochs": 1, "max_steps": warmup + rounds * per_round}, seed=0)
    trainers, failed = {}, {}
    for method, lib in job["configs"]:
        name = f"{method}/{lib}"
        try:
            model, _ = load_model(prep, method, lib, seed=0)
            model.train()
            trainers[name] = Trainer(model, lr=METHODS[method].lr, total_steps=len(batches))
            for batch in batches[:warmup]:
                trainers[name].step(batch)
        except Exception as exc:  # noqa: BLE001 - a configuration that cannot train is reported, not fatal
            failed[name] = f"{type(exc).__name__}: {exc}"
            trainers.pop(name, None)
    names = list(trainers)
    steps: dict[str, list[float]] = {n: [] for n in names}
    per_round_s: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        chunk = batches[warmup + r * per_round : warmup + (r + 1) * per_round]
        for name in names[r % len(names):] + names[: r % len(names)]:
            times = [trainers[name].step(batch)[1] for batch in chunk]
            steps[name].extend(times)
            per_round_s[name].append(sum(times))
    full = per_round_s.get("full/deltatune")
    out = {}
    for name in names:
        ratio = statistics.median(a / b for a, b in zip(per_round_s[name], full)) if full else None
        out[name] = {"step_s": statistics.median(steps[name]), "ratio_full_paired": ratio, "steps": len(steps[name])}
    return {"configs": out, "failed": failed, "warmup": warmup, "rounds": rounds, "per_round": per_round}
