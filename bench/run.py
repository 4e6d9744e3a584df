"""Run a benchmark suite and write ``bench/results/<suite>.{md,json}`` and PNG charts.

    python -m bench --suite quick          # a few minutes: every method once, small data
    python -m bench --suite full           # the published tables (under an hour on 2 idle cores)
    python bench/run.py --suite quick --only accuracy cost

Each configuration runs in its own process (:mod:`bench.worker`); see ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # ``python bench/run.py``: make ``bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.measure import machine_info
from bench.methods import METHODS, available
from bench.runner import REPO, run_many
from bench.suites import SUITES, Suite

PARTS = ("accuracy", "cost", "lowdata", "forgetting", "inference")
RESULTS = REPO / "bench" / "results"


def _classify_job(s: Suite, method: str, lib: str, task: str, **over: Any) -> dict[str, Any]:
    job = {"kind": "classify", "model": "minilm", "method": method, "lib": lib, "task": task, "seeds": s.seeds,
           "n_train": s.n_train, "epochs": s.epochs, "batch_size": s.batch_size, "max_length": s.max_length[task],
           }
    return job | over


def _configs(s: Suite, methods: list[str], peft_methods: list[str]) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """(method, lib) pairs that can run, and ``{"method/lib": reason}`` for those that cannot."""
    pairs, skipped = [], {}
    for lib, names in (("deltatune", methods), ("peft", peft_methods)):
        for name in names:
            reason = available(name, lib)
            if reason is None:
                pairs.append((name, lib))
            elif lib == "deltatune" or METHODS[name].kind == "peft":
                skipped[f"{name}/{lib}"] = reason
    return pairs, skipped


def _accuracy_jobs(s: Suite, pairs: list[tuple[str, str]]) -> list[dict[str, Any]]:
    return [_classify_job(s, m, lib, task) for task in s.tasks for m, lib in pairs if lib == "deltatune" or task in s.peft_tasks]


def _cost_jobs(s: Suite, pairs: list[tuple[str, str]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """One memory job per configuration and one interleaved timing job per task."""
    memory = [
        {"kind": "memory", "method": m, "lib": lib, "task": task, "n_train": s.n_train, "batch_size": s.batch_size,
         "max_length": s.max_length[task], "steps": s.memory_steps}
        for task in s.cost_tasks for m, lib in pairs
    ]
    timing = [
        {"kind": "timing", "configs": pairs, "task": task, "n_train": s.n_train, "batch_size": s.batch_size,
         "max_length": s.max_length[task], "warmup": s.timing_warmup, "rounds": s.timing_rounds,
         "per_round": s.timing_per_round}
        for task in s.cost_tasks
    ]
    return memory, timing


def _lowdata_jobs(s: Suite, pairs: list[tuple[str, str]]) -> list[dict[str, Any]]:
    runnable = {m for m, lib in pairs if lib == "deltatune"}
    return [
        _classify_job(s, m, "deltatune", s.lowdata_task, n_train=n, seeds=s.lowdata_seeds,
                      min_steps=s.lowdata_min_steps)
        for n in s.lowdata_sizes for m in s.lowdata_methods if m in runnable
    ]


def _forgetting_jobs(s: Suite) -> list[dict[str, Any]]:
    return [
        {"kind": "forgetting", "method": m, "lib": "deltatune", "steps": s.forget_steps, "epochs": 10,
         "n_eval": s.forget_n_eval, "lr": s.forget_lr[m], "batch_size": s.forget_batch_size,
         "max_length": s.forget_max_length}
        for m in ("full", "lora")
    ]


def _log(message: str) -> None:
    print(message, flush=True)


def run_suite(s: Suite, parts: list[str], log: Any = _log) -> dict[str, Any]:
    """Run ``parts`` of suite ``s``; returns the raw results (everything the report needs)."""
    pairs, skipped = _configs(s, s.methods, s.peft_methods)
    out: dict[str, Any] = {"suite": s.name, "settings": s.__dict__, "skipped": skipped, "parts": parts,
                           "machine": machine_info(REPO), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    for key, why in skipped.items():
        log(f"skip {key}: {why}")
    t0 = time.perf_counter()
    if "cost" in parts:  # first: the machine is quietest before our own accuracy runs start
        memory, timing = _cost_jobs(s, pairs)
        log(f"cost: {len(memory)} memory processes one at a time, then {len(timing)} interleaved timing process(es)")
        out["memory"] = run_many(memory, workers=1, threads=2, progress=log)
        out["timing"] = run_many(timing, workers=1, threads=2, progress=log)
    if "accuracy" in parts:
        jobs = _accuracy_jobs(s, pairs)
        log(f"accuracy: {len(jobs)} configurations, {s.workers} at a time, {s.accuracy_threads} thread(s) each")
        out["accuracy"] = run_many(jobs, workers=s.workers, threads=s.accuracy_threads, progress=log)
    if "lowdata" in parts:
        jobs = _lowdata_jobs(s, pairs)
        log(f"low-data: {len(jobs)} configurations")
        out["lowdata"] = run_many(jobs, workers=s.workers, threads=s.accuracy_threads, progress=log)
    if "forgetting" in parts:
        log("forgetting: SmolLM2-135M on ChatterBot, full vs LoRA")
        out["forgetting"] = run_many(_forgetting_jobs(s), workers=1, threads=2, progress=log)
    if "inference" in parts:
        log("inference: forward latency, batch 8 x 128")
        job = {"kind": "inference", "rounds": s.infer_rounds, "reps": s.infer_reps}
        out["inference"] = run_many([job], workers=1, threads=2, progress=log)[0]
    out["wall_seconds"] = time.perf_counter() - t0
    out["measured"] = {part: f"{out['started']} ({out['machine']['commit']})" for part in parts}
    out["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    return out


PART_KEYS = {"accuracy": ["accuracy"], "cost": ["memory", "timing"], "lowdata": ["lowdata"],
             "forgetting": ["forgetting"], "inference": ["inference"]}


def _merge(old: dict[str, Any], new: dict[str, Any], parts: list[str]) -> dict[str, Any]:
    """``old`` with the results of ``parts`` replaced by ``new``'s; each part keeps when it was measured."""
    merged = dict(old)
    when = dict(old.get("measured", {}))
    for part in parts:
        for key in PART_KEYS[part]:
            merged[key] = new.get(key)
        when[part] = f"{new['started']} ({new['machine']['commit']})"
    for key in ("settings", "skipped", "machine"):
        merged[key] = new[key]
    merged["measured"] = when
    merged["wall_seconds"] = old.get("wall_seconds", 0) + new["wall_seconds"]
    return merged


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=sorted(SUITES), default="quick")
    parser.add_argument("--only", nargs="+", choices=PARTS, default=list(PARTS), help="run only these measurements")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for <suite>.md/.json and charts")
    parser.add_argument("--report-only", action="store_true", help="re-render tables/charts from <suite>.json")
    args = parser.parse_args(argv)
    from bench.report import write_report

    args.out.mkdir(parents=True, exist_ok=True)
    raw_path = args.out / f"{args.suite}.json"
    if args.report_only:
        raw = json.loads(raw_path.read_text())
    else:
        raw = run_suite(SUITES[args.suite], list(args.only))
        raw["command"] = "python -m bench --suite " + args.suite
        if set(args.only) != set(PARTS) and raw_path.exists():  # a partial re-run updates the saved results
            old = json.loads(raw_path.read_text())
            raw = _merge(old, raw, list(args.only))
    md = write_report(raw, args.out)
    raw_path.write_text(json.dumps(raw, indent=1, default=str) + "\n")
    print(f"wrote {raw_path}, {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
