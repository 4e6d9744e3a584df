"""Turn the raw per-process results of a suite into per-configuration numbers (no formatting here)."""

from __future__ import annotations

import statistics
from typing import Any

NOT_RUN = "not run (the run was cut short)"  # bench.runner marks jobs a --cached-only report skips

Key = tuple[str, str, str]  # (method, lib, task)


def _ok(results: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    return [r for r in results or [] if r.get("ok")]


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def accuracy(raw: dict[str, Any], part: str = "accuracy") -> dict[tuple[str, str, str, int], dict[str, Any]]:
    """``{(method, lib, task, n_train): {"accs": [...], "seeds", "mean", "std", "trainable", "base_params",
    "reused_from"}}`` (percent; ``reused_from``: the sorted marks of the pooled jobs, "" for this suite's own).

    Runs of one configuration split over several jobs (one per seed) are pooled.
    """
    pooled: dict[tuple[str, str, str, int], list[dict[str, Any]]] = {}
    kept: dict[tuple[str, str, str, int], set[str]] = {}
    for res in _ok(raw.get(part)):
        job = res["job"]
        key = (job["method"], job["lib"], job["task"], res["n_train"])
        pooled.setdefault(key, []).extend(r for r in res["runs"] if "accuracy" in r)
        kept.setdefault(key, set()).add(res.get("reused_from") or "")
    table: dict[tuple[str, str, str, int], dict[str, Any]] = {}
    for key, runs in pooled.items():
        if not runs:
            continue
        runs = sorted(runs, key=lambda r: r["seed"])
        accs = [100 * r["accuracy"] for r in runs]
        mean, std = mean_std(accs)
        table[key] = {
            "accs": accs, "seeds": [r["seed"] for r in runs], "mean": mean, "std": std,
            "trainable": runs[0]["trainable"], "base_params": runs[0]["base_params"], "steps": runs[0]["steps"],
            "epochs": runs[0]["epochs"],
            "reused_from": sorted(kept[key]),  # each pooled job's mark ("" = run by this suite)
        }
    return table


def cost(raw: dict[str, Any]) -> dict[Key, dict[str, Any]]:
    """``{(method, lib, task): {"step_s", "ratio_full_paired", "peak_mb", "baseline_mb", "file_bytes", ...}}``.

    Memory and file size come from the per-configuration memory jobs, step time from the timing job.
    """
    table: dict[Key, dict[str, Any]] = {}
    for res in _ok(raw.get("memory")):
        job = res["job"]
        table[(job["method"], job["lib"], job["task"])] = {
            k: res.get(k) for k in ("peak_mb", "baseline_mb", "file_bytes", "trainable", "base_params")
        }
    for res in _ok(raw.get("timing")):
        for name, row in res["configs"].items():
            method, lib = name.split("/")
            table.setdefault((method, lib, res["job"]["task"]), {}).update(row)
    for row in table.values():
        for k in ("step_s", "ratio_full_paired", "ratio_peft_paired", "peak_mb", "baseline_mb", "file_bytes"):
            row.setdefault(k, None)
    return table


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def job_results(raw: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """``(part, result)`` for every job of the suite (the inference part is a single result)."""
    parts = ("accuracy", "memory", "timing", "lowdata", "forgetting")
    pairs = [(part, r) for part in parts for r in raw.get(part) or []]
    return pairs + ([("inference", raw["inference"])] if raw.get("inference") else [])


def failures(raw: dict[str, Any]) -> list[str]:
    """One line per failed process, for the report."""
    lines = []
    failed = [(part, res) for part, res in job_results(raw) if not res.get("ok")]
    cut = [(part, res) for part, res in failed if res.get("error") == NOT_RUN]
    if cut:
        counts: dict[str, int] = {}
        for part, res in cut:
            job = res.get("job", {})
            key = f"{part} (seeds {job['seeds']})" if "seeds" in job else part
            counts[key] = counts.get(key, 0) + 1
        lines.append("not run, the run was cut short: " + ", ".join(f"{n} {k} jobs" for k, n in counts.items()))
        failed = [f for f in failed if f not in cut]
    for part, res in failed:
        if part != "inference":
            job = res.get("job", {})
            lines.append(f"{part}: {job.get('method')}/{job.get('lib')}/{job.get('task', '')}: {res.get('error')}")
    for res in _ok(raw.get("timing")):
        lines += [f"timing: {name}: {why}" for name, why in res.get("failed", {}).items()]
    lines += [f"inference: {res.get('error')}" for part, res in failed if part == "inference"]
    return lines
