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
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # ``python bench/run.py``: make ``bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.cache import JobCache
from bench.measure import machine_info
from bench.methods import METHODS, available
from bench.runner import REPO, run_many
from bench.suites import SUITES, Suite

PARTS = ("accuracy", "cost", "lowdata", "forgetting", "inference")
RESULTS = REPO / "bench" / "results"


def _classify_job(s: Suite, method: str, lib: str, task: str, **over: Any) -> dict[str, Any]:
    job = {"kind": "classify", "model": "minilm", "method": method, "lib": lib, "task": task, "seeds": s.seeds,
           "n_train": s.n_train, "epochs": s.epochs, "batch_size": s.batch_size, "max_length": s.max_length[task],
           "autocast": s.accuracy_autocast, "lr": METHODS[method].lr}
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
    wanted = [(m, lib) for m, lib in pairs if s.accuracy_methods is None or m in s.accuracy_methods]
    seed_groups = [[seed] for seed in s.seeds] if s.split_seeds else [s.seeds]
    return [_classify_job(s, m, lib, task, seeds=seeds) for seeds in seed_groups for task in s.tasks
            for m, lib in wanted if lib == "deltatune" or task in s.peft_tasks]


def _cost_jobs(s: Suite, pairs: list[tuple[str, str]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """One memory job per configuration and one interleaved timing job per task."""
    memory = [
        {"kind": "memory", "method": m, "lib": lib, "task": task, "n_train": s.n_train, "batch_size": s.batch_size,
         "max_length": s.max_length[task], "steps": s.memory_steps, "lr": METHODS[m].lr}
        for task in s.cost_tasks for m, lib in pairs
    ]
    timing = [
        {"kind": "timing", "configs": pairs, "lrs": {m: METHODS[m].lr for m, _ in pairs}, "task": task,
         "n_train": s.n_train, "batch_size": s.batch_size,
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


def run_suite(s: Suite, parts: list[str], log: Any = _log, *, cache: JobCache | None = None,
              on_part: Callable[[dict[str, Any], list[str]], None] | None = None,
              cached_only: bool = False) -> dict[str, Any]:
    """Run ``parts`` of suite ``s``; returns the raw results (everything the report needs).

    After each part, ``on_part(results_so_far, parts_done)`` is called (the caller saves them), so an
    interrupted run keeps every finished part; ``cache`` keeps every finished job.
    """
    pairs, skipped = _configs(s, s.methods, s.peft_methods)
    out: dict[str, Any] = {"suite": s.name, "settings": s.__dict__, "skipped": skipped, "parts": parts,
                           "machine": machine_info(REPO), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                           "part_seconds": {}}
    for key, why in skipped.items():
        log(f"skip {key}: {why}")
    done: list[str] = []

    def many(jobs: list[dict[str, Any]], workers: int, threads: int) -> list[dict[str, Any]]:
        return run_many(jobs, workers=workers, threads=threads, progress=log, cache=cache, cached_only=cached_only)

    def run_part(part: str, body: Callable[[], None]) -> None:
        if part not in parts:
            return
        t0 = time.perf_counter()
        body()
        out["part_seconds"][part] = time.perf_counter() - t0
        done.append(part)
        if on_part:
            on_part(out, list(done))

    def cost() -> None:  # first: the machine is quietest before our own accuracy runs start
        memory, timing = _cost_jobs(s, pairs)
        log(f"cost: {len(memory)} memory processes one at a time, then {len(timing)} interleaved timing process(es)")
        out["memory"] = many(memory, 1, s.cost_threads)
        out["timing"] = many(timing, 1, s.cost_threads)

    def accuracy() -> None:
        jobs = _accuracy_jobs(s, pairs)
        log(f"accuracy: {len(jobs)} configurations, {s.workers} at a time, {s.accuracy_threads} thread(s) each")
        out["accuracy"] = many(jobs, s.workers, s.accuracy_threads)

    def lowdata() -> None:
        jobs = _lowdata_jobs(s, pairs)
        log(f"low-data: {len(jobs)} configurations")
        out["lowdata"] = many(jobs, s.workers, s.accuracy_threads)

    def forgetting() -> None:
        log("forgetting: SmolLM2-135M on ChatterBot, full vs LoRA")
        out["forgetting"] = many(_forgetting_jobs(s), 1, 2)

    def inference() -> None:
        log("inference: forward latency, batch 8 x 128")
        out["inference"] = many([{"kind": "inference", "rounds": s.infer_rounds, "reps": s.infer_reps}], 1, 2)[0]

    for part, body in (("cost", cost), ("accuracy", accuracy), ("lowdata", lowdata), ("forgetting", forgetting),
                       ("inference", inference)):
        run_part(part, body)
    return out


PART_KEYS = {"accuracy": ["accuracy"], "cost": ["memory", "timing"], "lowdata": ["lowdata"],
             "forgetting": ["forgetting"], "inference": ["inference"]}


def _merge(old: dict[str, Any] | None, new: dict[str, Any], parts: list[str]) -> dict[str, Any]:
    """``old`` with the results of ``parts`` replaced by ``new``'s; each part keeps when it was measured."""
    merged = dict(old or {})
    when = dict(merged.get("measured", {}))
    seconds = dict(merged.get("part_seconds", {}))
    for part in parts:
        for key in PART_KEYS[part]:
            merged[key] = new.get(key)
        when[part] = f"{new['started']} ({new['machine']['commit']})"
        seconds[part] = new["part_seconds"][part]
    for key in ("suite", "settings", "skipped", "machine", "command", "started", "parts"):
        merged[key] = new.get(key)
    merged["measured"] = when
    merged["part_seconds"] = seconds
    merged["wall_seconds"] = sum(seconds.values())
    return merged


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=sorted(SUITES), default="quick")
    parser.add_argument("--only", nargs="+", choices=PARTS, default=list(PARTS), help="run only these measurements")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for <suite>.md/.json and charts")
    parser.add_argument("--report-only", action="store_true", help="re-render tables/charts from <suite>.json")
    parser.add_argument("--resume", action="store_true",
                        help="reuse the jobs an interrupted run of this suite finished (same settings only)")
    parser.add_argument("--tasks", nargs="+", choices=["trec", "rt", "bbc"],
                        help="run only these tasks' accuracy jobs (e.g. two processes sharing one --resume cache)")
    parser.add_argument("--libs", nargs="+", choices=["deltatune", "peft"],
                        help="run only these libraries' accuracy jobs (with --tasks: split one suite over processes)")
    parser.add_argument("--cached-only", action="store_true",
                        help="with --resume: report the finished jobs only, run nothing (a run cut short; the report "
                             "counts the jobs not run)")
    args = parser.parse_args(argv)
    from bench.report import write_report

    args.out.mkdir(parents=True, exist_ok=True)
    raw_path = args.out / f"{args.suite}.json"
    if args.report_only:
        md = write_report(json.loads(raw_path.read_text()), args.out)
        print(f"wrote {md}")
        return 0
    # Parts not (yet) re-measured keep their saved results; the report says when each part was measured.
    old = json.loads(raw_path.read_text()) if raw_path.exists() else None

    def save(raw: dict[str, Any], done: list[str]) -> None:
        merged = _merge(old, dict(raw, command="python -m bench --suite " + args.suite), done)
        md = write_report(merged, args.out)
        raw_path.write_text(json.dumps(merged, indent=1, default=str) + "\n")
        print(f"saved {', '.join(done)}: {raw_path}, {md}", flush=True)

    cache = JobCache(args.out / f".{args.suite}.jobs.jsonl", resume=args.resume)
    if args.cached_only and not args.resume:
        parser.error("--cached-only needs --resume (it reports the jobs an earlier run finished)")
    suite = SUITES[args.suite]
    if args.tasks:
        suite = replace(suite, tasks=[t for t in suite.tasks if t in args.tasks])
    if args.libs:
        suite = replace(suite, methods=suite.methods if "deltatune" in args.libs else [],
                        peft_methods=suite.peft_methods if "peft" in args.libs else [])
    run_suite(suite, list(args.only), cache=cache, on_part=save, cached_only=args.cached_only)
    return 0


if __name__ == "__main__":
    sys.exit(main())
