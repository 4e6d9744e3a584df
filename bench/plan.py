"""``python -m bench --suite full --plan``: every part's job count and estimated minutes, without running anything.

The estimate is built from the wall times the committed results record (``process_seconds`` of a job's
process, else the worker's ``wall_seconds``; ``seconds`` for the combination experiment). For a job ``j``:

    est(j) = min over records r with sig(r) == sig(j) of  seconds(r) * units(j) / units(r)

* ``sig``: what makes a job cost what it costs: kind, model, method and its options, library, task, sequence
  length, precision and batch size (falling back to the same without task and length, then to the kind's median
  per unit, when no record has it; :func:`estimate_job` says which);
* ``units``: the work that scales: training steps x seeds for a classification job (steps as
  :func:`bench.loop.epochs_for` counts them), steps for memory, forgetting and combination jobs, timed steps
  for a timing job, rounds x repetitions for inference;
* the minimum over records picks the least-loaded measurement of that job: several results files were
  measured while other agents loaded the 2-core machine, where the same job took 2-10x longer.

A part's time is ``sum(est) `` for the jobs that run alone (cost, inference) plus ``sum(est) / workers``
for the jobs that share the workers (all the others run at once over ``suite.workers`` processes, each
with 1 thread); the suite's total is the sum over its parts. Recorded times come from the machine each file
was measured on (round one's ``full.json``: an Intel Xeon with AMX; the later files: an AMD EPYC, where bf16
autocast runs slower), so the estimate is a guide, not a promise.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.cache import KEPT_ROW, results_in
from bench.loop import epochs_for
from bench.parts import ALONE, phases
from bench.runner import REPO
from bench.suites import FULL_CUTS, Suite

RESULTS = REPO / "bench" / "results"
#: Files whose recorded job times the estimate uses.
RECORDS = ("full.json", "methods.json", "recipe.json", "lowdata.json", "forgetting.json", "combination.json")
#: Files measured on otherwise idle cores in one uninterrupted run: the reference for the others' load.
IDLE = ("full.json", "combination.json")
#: Training rows a task has when fewer than a job asks for (BBC's fixed split has 1,701).
TRAIN_ROWS = {"bbc": 1701}


def units(job: dict[str, Any]) -> float:
    """The work of ``job`` that its time scales with (see the module docstring)."""
    kind = job["kind"]
    if kind == "classify":
        n = min(job["n_train"], TRAIN_ROWS.get(job["task"], job["n_train"]))
        per_epoch = math.ceil(n / job["batch_size"])
        steps = per_epoch * epochs_for(n, job["batch_size"], job["epochs"], job.get("min_steps", 0))
        return len(job["seeds"]) * min(steps, job.get("max_steps") or steps)
    if kind == "timing":
        return len(job["configs"]) * (job["warmup"] + job["rounds"] * job["per_round"])
    if kind == "inference":
        return job["rounds"] * job["reps"]
    if kind == "memory":  # a few steps: loading the model dominates, whatever the step count
        return 1
    return job["steps"]  # forgetting, combination


def signature(job: dict[str, Any], *, with_task: bool = True) -> str:
    """What makes a job cost what it costs (seeds, sizes, rates and evaluation settings aside)."""
    keep = ["kind", "model", "method", "method_options", "lib", "autocast", "batch_size", "domain"]
    if with_task:
        keep += ["task", "max_length"]
    if job["kind"] == "timing":
        keep += ["configs"]
    return json.dumps({k: job.get(k) for k in keep}, sort_keys=True, default=str)


@dataclass(frozen=True)
class Record:
    job: dict[str, Any]
    seconds: float  # as recorded
    source: str  # the results file


def records(folder: Path = RESULTS) -> list[Record]:
    """Every committed job with a recorded time (copies of another file's job, such as the full fine-tuning runs
    ``methods.json`` borrows, left out; rows a narrower run kept in ``full.json`` count: they are the only record)."""
    from bench.parts import _combination_results

    out = []
    for name in RECORDS:
        path = folder / name
        if not path.exists():
            continue
        found = _combination_results(path) if name == "combination.json" else results_in(json.loads(path.read_text()), ok_only=False)
        for res in found:  # a job that failed took its time too (peft's prefix tuning fails in seconds)
            seconds = res.get("process_seconds") or res.get("wall_seconds") or 0.0
            copy = res.get("reused_from") and not str(res["reused_from"]).startswith(KEPT_ROW)
            if copy or seconds < 1 or units(res["job"]) <= 0:
                continue
            out.append(Record(res["job"], float(seconds), name))
    return out


def _closest(job: dict[str, Any], recs: list[Record], *, levels: int = 2) -> tuple[float, str] | None:
    """The smallest unit-scaled time of the records most like ``job``: same signature, else the same without
    task and length, else (``levels=3``, only to compare files) the same kind, method and library."""
    u = units(job)
    for how, sign in (("same job", signature), ("other task", lambda j: signature(j, with_task=False)),
                      ("same method", lambda j: json.dumps([j["kind"], j.get("method"), j.get("lib")])))[:levels]:
        sig = sign(job)
        match = [r.seconds * u / units(r.job) for r in recs if sign(r.job) == sig]
        if match:
            return min(match), how
    return None


def load_factors(recs: list[Record]) -> dict[str, float]:
    """How much slower than the idle reference each results file ran: the smallest ratio, over its jobs that the
    idle files (:data:`IDLE`) also hold (same configuration), of its recorded time to the idle estimate; 1.0
    for a file with no such job. The smallest ratio is the file's least-loaded job, so the factor removes the
    load other agents put on the machine but keeps a slower machine's own pace."""
    idle = [r for r in recs if r.source in IDLE]
    factors = {}
    for name in sorted({r.source for r in recs} - set(IDLE)):
        ratios = [r.seconds / found[0] for r in recs if r.source == name and (found := _closest(r.job, idle, levels=3))]
        factors[name] = max(1.0, min(ratios)) if ratios else 1.0
    return factors


def normalized(recs: list[Record]) -> list[Record]:
    """Every record's time divided by its file's load factor (:func:`load_factors`)."""
    factors = load_factors(recs)
    return [Record(r.job, r.seconds / factors.get(r.source, 1.0), r.source) for r in recs]


def estimate_job(job: dict[str, Any], recs: list[Record]) -> tuple[float, str]:
    """``(seconds, how)`` from load-normalized records: ``how`` is ``"same job"`` (a record with the job's
    signature), ``"other task"`` (the same configuration on another task) or ``"kind median"``;
    ``(0, "no record")`` when nothing of the kind ran."""
    found = _closest(job, recs)
    if found:
        return found
    per_unit = [r.seconds / units(r.job) for r in recs if r.job["kind"] == job["kind"]]
    return (statistics.median(per_unit) * units(job), "kind median") if per_unit else (0.0, "no record")


@dataclass(frozen=True)
class PartPlan:
    part: str
    jobs: int
    alone_seconds: float  # jobs run one at a time with nothing else
    shared_seconds: float  # sum of the jobs that share the workers
    minutes: float  # alone_seconds / 60 + shared_seconds / workers / 60
    how: dict[str, int]  # estimate source -> job count


def plan(s: Suite, parts: list[str], recs: list[Record] | None = None) -> list[PartPlan]:
    """The plan of ``parts`` of suite ``s`` (see the module docstring for the arithmetic)."""
    recs = normalized(records()) if recs is None else recs
    out = []
    for part in parts:
        alone = shared = 0.0
        how: dict[str, int] = {}
        count = 0
        for phase in phases(s, part):
            for job in phase.jobs:
                seconds, source = estimate_job(job, recs)
                how[source] = how.get(source, 0) + 1
                count += 1
                if phase.alone:
                    alone += seconds
                else:
                    shared += seconds
        out.append(PartPlan(part, count, alone, shared, (alone + shared / max(1, s.workers)) / 60, how))
    return out


def print_plan(name: str, s: Suite, parts: list[str]) -> float:
    """Print the plan table (and, for ``full``, what it cuts); returns the total estimated minutes."""
    recs = records()
    rows = plan(s, parts, normalized(recs))
    total = sum(r.minutes for r in rows)
    print(f"suite {name}: {len(parts)} parts; {', '.join(p for p in parts if p in ALONE) or 'nothing'} alone first, "
          f"then the rest at once over {s.workers} workers x 1 thread. Estimate: recorded job times (bench/plan.py)")
    print(f"{'part':<22}{'jobs':>6}{'alone min':>11}{'job-min':>9}{'est. min':>10}   estimate from")
    for r in rows:
        how = ", ".join(f"{n} {k}" for k, n in r.how.items())
        print(f"{r.part:<22}{r.jobs:>6}{r.alone_seconds / 60:>11.1f}{r.shared_seconds / 60:>9.1f}{r.minutes:>10.1f}   {how}")
    print(f"{'total':<22}{sum(r.jobs for r in rows):>6}{'':>29}{total:>10.1f}")
    factors = load_factors(recs)
    print("load factors (recorded / idle time of the least-loaded comparable job; divided out): "
          + ", ".join(f"{k} {v:.2f}x" for k, v in factors.items())
          + f". Idle reference: {', '.join(IDLE)} (round one ran on an Intel Xeon with AMX; the later files on an "
          "AMD EPYC, whose factor includes its own pace).")
    if name == "full":
        from bench.suites import SUITES

        ext = SUITES["extended"]
        print(f"cut to fit 90 minutes (`--suite extended` runs it; estimate "
              f"{sum(r.minutes for r in plan(ext, ext.parts, normalized(recs))):.1f} min):")
        for cut in FULL_CUTS:
            print(f"  - {cut}")
    return total
