"""Training cost on MiniLM: peak memory and file size (one process per configuration), step time
(all configurations in one process, interleaved).

* ``memory`` job: load, apply the method, take the baseline (:class:`bench.measure.PeakMemory`), train
  ``steps`` steps, read the peak; then save the adapter and measure the folder.
* ``timing`` job: every configuration is built in one process; after ``warmup`` steps each, they take
  turns, ``per_round`` steps at a time, for ``rounds`` rounds, with a rotating order, all on the same
  batches. A configuration's step time is the median of its steps; its ratio to full fine-tuning is the
  median over rounds of (its round time / full fine-tuning's time in that round), so load that drifts
  during the run hits all configurations alike. The HF peft twin of a method runs right beside
  deltatune's in every round (which of the two goes first alternates), and their ratio is taken the
  same way, pair by pair (``ratio_peft_paired``): the tightest comparison one machine allows.
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
    trainer = Trainer(model, lr=job.get("lr") or METHODS[job["method"]].lr, total_steps=len(batches))
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
            lr = job.get("lrs", {}).get(method) or METHODS[method].lr
            trainers[name] = Trainer(model, lr=lr, total_steps=len(batches))
            for batch in batches[:warmup]:
                trainers[name].step(batch)
        except Exception as exc:  # noqa: BLE001 - a configuration that cannot train is reported, not fatal
            failed[name] = f"{type(exc).__name__}: {exc}"
            trainers.pop(name, None)
    units = _twin_units(list(trainers))
    names = [name for unit in units for name in unit]
    steps: dict[str, list[float]] = {n: [] for n in names}
    per_round_s: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        chunk = batches[warmup + r * per_round : warmup + (r + 1) * per_round]
        rotated = units[r % len(units):] + units[: r % len(units)]
        for name in [n for unit in rotated for n in (unit if r % 2 == 0 else unit[::-1])]:
            times = [trainers[name].step(batch)[1] for batch in chunk]
            steps[name].extend(times)
            per_round_s[name].append(sum(times))

    def paired(a: str, b: str) -> float | None:
        """Median over rounds of (a's round time / b's round time in the same round)."""
        if b not in per_round_s:
            return None
        return statistics.median(x / y for x, y in zip(per_round_s[a], per_round_s[b]))

    out = {}
    for name in names:
        method, lib = name.split("/")
        out[name] = {"step_s": statistics.median(steps[name]), "ratio_full_paired": paired(name, "full/deltatune"),
                     "steps": len(steps[name])}
        if lib == "deltatune":
            out[name]["ratio_peft_paired"] = paired(name, f"{method}/peft")
    return {"configs": out, "failed": failed, "warmup": warmup, "rounds": rounds, "per_round": per_round}


def _twin_units(names: list[str]) -> list[tuple[str, ...]]:
    """``"method/lib"`` names grouped so that each peft twin runs right beside deltatune's configuration."""
    units = []
    for name in names:
        method, lib = name.split("/")
        if lib == "deltatune":
            units.append((name, f"{method}/peft") if f"{method}/peft" in names else (name,))
    taken = {n for unit in units for n in unit}
    return units + [(n,) for n in names if n not in taken]
