"""Round one's measurements (cost, accuracy, low data, forgetting, inference) of a suite, written to
``bench/results/<suite>.{md,json}`` and PNG charts; :mod:`bench.parts` runs them with round two's parts.

    python -m bench --suite quick          # a few minutes: every part once, small data
    python bench/run.py --suite quick --parts accuracy cost

Each configuration runs in its own process (:mod:`bench.worker`); see ``bench/README.md``.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # ``python bench/run.py``: make ``bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.cache import KEPT_ROW, JobCache
from bench.measure import machine_info
from bench.methods import METHODS, available
from bench.runner import REPO, run_many
from bench.suites import Suite

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
              cached_only: bool = False, slots: threading.Semaphore | None = None) -> dict[str, Any]:
    """Run round one's ``parts`` of suite ``s``; returns the raw results (everything the report needs).

    After each part, ``on_part(results_so_far, parts_done)`` is called (the caller saves them), so an
    interrupted run keeps every finished part; ``cache`` keeps every finished job; ``slots`` bounds the
    worker processes shared with other parts running at the same time (:func:`bench.runner.run_many`).
    """
    pairs, skipped = _configs(s, s.methods, s.peft_methods)
    out: dict[str, Any] = {"suite": s.name, "settings": s.__dict__, "skipped": skipped, "parts": parts,
                           "machine": machine_info(REPO), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                           "part_seconds": {}}
    for key, why in skipped.items():
        log(f"skip {key}: {why}")
    done: list[str] = []

    def many(jobs: list[dict[str, Any]], workers: int, threads: int) -> list[dict[str, Any]]:
        return run_many(jobs, workers=workers, threads=threads, progress=log, cache=cache, cached_only=cached_only,
                        slots=slots)

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
#: Result lists whose configurations a narrower run leaves in place (see :func:`_carried`).
CARRIED_KEYS = ("accuracy",)


def _job_identity(result: dict[str, Any]) -> str:
    """A job's settings without its seeds: the same configuration, whichever seeds ran."""
    return json.dumps({k: v for k, v in result.get("job", {}).items() if k != "seeds"}, sort_keys=True, default=str)


def _carried(old: dict[str, Any] | None, new: dict[str, Any], key: str, part: str) -> list[dict[str, Any]]:
    """``old``'s ``key`` results for configurations ``new`` did not run (a suite that cuts them, such as ``full``
    cutting the accuracy jobs ``extended`` runs): kept, marked ``reused_from`` with when they were measured, so a
    narrower run does not erase a wider one's rows."""
    if not old:
        return []
    ran = {_job_identity(r) for r in new.get(key) or []}
    where = f"{KEPT_ROW} ({old.get('measured', {}).get(part) or old.get('started')}), not run by `{new['suite']}`"
    return [r if r.get("reused_from") else r | {"reused_from": where}
            for r in old.get(key) or [] if _job_identity(r) not in ran]


def _merge(old: dict[str, Any] | None, new: dict[str, Any], parts: list[str]) -> dict[str, Any]:
    """``old`` with the results of ``parts`` replaced by ``new``'s; each part keeps when it was measured, and the
    accuracy part also keeps the configurations ``new`` did not run (:func:`_carried`)."""
    merged = dict(old or {})
    when = dict(merged.get("measured", {}))
    seconds = dict(merged.get("part_seconds", {}))
    for part in parts:
        for key in PART_KEYS[part]:
            merged[key] = new.get(key)
            if key in CARRIED_KEYS:
                merged[key] = (new.get(key) or []) + _carried(old, new, key, part)
        when[part] = f"{new['started']} ({new['machine']['commit']})"
        seconds[part] = new["part_seconds"][part]
    for key in ("suite", "settings", "skipped", "machine", "command", "started", "parts"):
        merged[key] = new.get(key)
    merged["measured"] = when
    merged["part_seconds"] = seconds
    merged["wall_seconds"] = sum(seconds.values())
    return merged


def borrow_full(raw: dict[str, Any], lender: Path) -> dict[str, Any]:
    """``raw`` with the full fine-tuning accuracy runs of the suite saved at ``lender`` added, split into one
    result per seed and marked ``reused_from`` (the same jobs with identical settings; not run again).
    Seeds ``raw`` already holds for a task are kept as they are."""
    if not lender.exists():
        return raw
    other = json.loads(lender.read_text())
    s = raw["settings"]
    have = {(r["job"]["task"], run["seed"]) for r in raw.get("accuracy") or [] if r.get("ok")
            and r["job"]["method"] == "full" for run in r.get("runs", [])}
    where = f"suite {other['suite']}, started {other.get('started')}, commit {other['machine']['commit']} ({lender.name})"
    borrowed = []
    for res in other.get("accuracy") or []:
        job = res.get("job", {})
        if not (res.get("ok") and job.get("method") == "full" and job.get("lib") == "deltatune"
                and job.get("task") in s["tasks"] and job.get("n_train") == s["n_train"] and job.get("epochs") == s["epochs"]):
            continue
        for run in res["runs"]:
            if run["seed"] in s["seeds"] and (job["task"], run["seed"]) not in have:
                borrowed.append(res | {"job": job | {"seeds": [run["seed"]]}, "runs": [run], "reused_from": where,
                                       "wall_seconds": 0.0, "process_seconds": 0.0})
    return raw | {"accuracy": (raw.get("accuracy") or []) + borrowed} if borrowed else raw


def saver(suite: Suite, out: Path, command: str) -> Callable[[dict[str, Any], list[str]], None]:
    """``on_part`` for :func:`run_suite`: merge the finished parts into ``<out>/<suite>.json`` (as it is on disk
    now, so parts run by concurrent threads all land) and rewrite the report."""
    from bench.report import write_report

    lock = threading.Lock()
    raw_path = out / f"{suite.name}.json"

    def save(raw: dict[str, Any], done: list[str]) -> None:
        with lock:
            old = json.loads(raw_path.read_text()) if raw_path.exists() else None
            merged = _merge(old, dict(raw, command=command), done)
            raw_path.write_text(json.dumps(merged, indent=1, default=str) + "\n")
            if suite.borrow_full_from:
                merged = borrow_full(merged, out / f"{suite.borrow_full_from}.json")
            md = write_report(merged, out)
        print(f"saved {', '.join(done)}: {raw_path}, {md}", flush=True)

    return save


if __name__ == "__main__":  # ``python bench/run.py --suite quick``: the same command line as ``python -m bench``
    from bench.suite_cli import main

    sys.exit(main())
