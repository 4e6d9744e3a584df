"""Every part of a suite in one run: round one's measurements and round two's experiments, over shared workers.

``python -m bench --suite full`` runs the parts named by the suite (:data:`bench.suites.FULL_PARTS`):

* first, **one at a time and alone on the machine**, the parts that measure time or memory: round one's cost
  jobs, issue 16's cost jobs (the ``methods`` part) and inference (and round one's forgetting, if asked for);
* then **every other part at once**, each in its own thread, their job processes sharing ``suite.workers``
  slots (a semaphore held while a process runs; 1 torch thread each): round one's accuracy runs, the
  ``methods`` accuracy grid, the recipe test (:mod:`bench.recipe`), low data on every task
  (:mod:`bench.lowdata_all`, its seed-0 grid before the further seeds at the picked rates), the
  learning-vs-forgetting frontier (:mod:`bench.forgetting_frontier`) and adapter arithmetic
  (:mod:`bench.combination`, one job).

Each part keeps its own job cache (``bench/results/.<stem>.jobs.jsonl``) and writes its own report with its
own module's code, so a part run alone (``python -m bench.recipe test``, ...) and the suite share results.
With ``--resume`` every finished job of every part is reused; a part whose cache file is missing starts
from its committed results file (as ``python -m bench.recipe`` does).
"""

from __future__ import annotations

import json
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bench import combination, forgetting_frontier, lowdata_all, recipe
from bench.cache import JobCache, absorb_results, part_cache
from bench.run import (
    _accuracy_jobs,
    _configs,
    _cost_jobs,
    _forgetting_jobs,
    _lowdata_jobs,
    borrow_full,
    run_suite,
    saver,
)
from bench.runner import run_many
from bench.suites import ROUND_ONE, SUITES, Suite

#: Parts that measure time or memory: run first, one job at a time, with nothing else running.
ALONE = ("cost", "inference", "forgetting")
#: The file stem of each round-two part's outputs (``<prefix><stem>.md`` / ``.json`` / cache).
STEMS = {"recipe": "recipe", "lowdata_all": "lowdata", "forgetting_frontier": "forgetting", "combination": "combination"}


@dataclass(frozen=True)
class Phase:
    """Jobs of one part that run together: ``alone`` ones one at a time, others over the shared workers."""

    part: str
    jobs: list[dict[str, Any]]
    alone: bool
    note: str = ""


def methods_suite(s: Suite) -> Suite:
    """The suite whose jobs make the ``methods`` part, with ``s.methods_seeds`` when set."""
    ms = SUITES[s.methods_suite]
    return replace(ms, seeds=list(s.methods_seeds)) if s.methods_seeds is not None else ms


def phases(s: Suite, part: str) -> list[Phase]:
    """The jobs ``part`` of suite ``s`` runs (low data's later seeds: one stand-in per cell at its first rate,
    as the picked rate is only known once the grid has run)."""
    if part in ROUND_ONE:
        pairs, _ = _configs(s, s.methods, s.peft_methods)
        if part == "cost":
            memory, timing = _cost_jobs(s, pairs)
            return [Phase(part, memory + timing, alone=True)]
        jobs = {"accuracy": lambda: _accuracy_jobs(s, pairs), "lowdata": lambda: _lowdata_jobs(s, pairs),
                "forgetting": lambda: _forgetting_jobs(s),
                "inference": lambda: [{"kind": "inference", "rounds": s.infer_rounds, "reps": s.infer_reps}]}[part]()
        return [Phase(part, jobs, alone=part in ALONE)]
    if part == "methods":
        ms = methods_suite(s)
        pairs, _ = _configs(ms, ms.methods, ms.peft_methods)
        memory, timing = _cost_jobs(ms, pairs)
        return [Phase(part, memory + timing, alone=True, note="cost"),
                Phase(part, _accuracy_jobs(ms, pairs), alone=False, note="accuracy")]
    if part == "recipe":
        return [Phase(part, recipe.test_jobs(s.recipe_tasks, s.recipe_full_tasks, s.recipe_seeds, s.recipe_protocol,
                                             s.recipe_same_schedule_tasks), alone=False)]
    if part == "lowdata_all":
        grid = lowdata_all.grid_jobs(s.lowall_tasks, s.lowall_sizes, s.lowall_grid, s.lowall_protocol)
        later = [j | {"seeds": [seed]} for seed in s.lowall_seeds if seed != 0 for j in grid
                 if j["lr"] == lowdata_all.GRID[j["method"]][0]]
        return [Phase(part, grid, alone=False, note="grid, seed 0"),
                Phase(part, later, alone=False, note="further seeds at the picked rates")]
    if part == "forgetting_frontier":
        return [Phase(part, forgetting_frontier.jobs(tuple(s.frontier_ranks), s.frontier_steps, s.frontier_n_eval),
                      alone=False)]
    if part == "combination":
        return [Phase(part, [combination.job(s.combination_steps, s.combination_n_eval)], alone=False)]
    raise ValueError(f"unknown part {part!r}")


class SuiteRun:
    """Runs (or re-reports) the parts of suite ``s`` into folder ``out``."""

    def __init__(self, s: Suite, out: Path, *, resume: bool, cached_only: bool = False, command: str = "",
                 log: Callable[[str], None] = print) -> None:
        self.s, self.out, self.resume, self.cached_only, self.log = s, out, resume, cached_only, log
        self.command = command or f"python -m bench --suite {s.name}"
        self.slots = threading.Semaphore(max(1, s.workers))
        self._caches: dict[Path, JobCache] = {}
        self._lock = threading.Lock()
        self.errors: dict[str, str] = {}

    def stem(self, part: str) -> str:
        return self.s.outputs_prefix + STEMS[part]

    def cache(self, stem: str, committed: Path | None, read: Callable[[Path], list[dict[str, Any]]] | None = None,
              resume: bool | None = None) -> JobCache:
        """One shared cache per file (several parts' threads may write to it)."""
        path = self.out / f".{stem}.jobs.jsonl"
        with self._lock:
            if path not in self._caches:
                self._caches[path] = part_cache(path, committed, resume=self.resume if resume is None else resume,
                                                read=read)
            return self._caches[path]

    def _suite_cache(self, s: Suite) -> JobCache:
        return self.cache(s.name, self.out / f"{s.name}.json")

    def _runner(self, cache: JobCache, report: Callable[[], None], threads: int = 1,
                timeout: float = 3600) -> Callable[[list[dict[str, Any]]], list[dict[str, Any]]]:
        lock = threading.Lock()

        def progress(message: str) -> None:  # after each job: log it, rewrite the part's report
            with lock:
                self.log(message)
                report()

        def run(jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
            return run_many(jobs, workers=self.s.workers, threads=threads, progress=progress, cache=cache,
                            timeout=timeout, cached_only=self.cached_only, slots=self.slots)

        return run

    # -- round one (bench/run.py) and the methods grid (a round-one-style suite) --
    def _round_one(self, s: Suite, parts: list[str], *, shared: bool) -> None:
        save = saver(s, self.out, self.command if s is self.s else f"python -m bench --suite {s.name}")
        run_suite(s, parts, self.log, cache=self._suite_cache(s), on_part=save, cached_only=self.cached_only,
                  slots=self.slots if shared else None)

    # -- round two --
    def _recipe(self) -> None:
        stem = self.stem("recipe")
        n_train = (self.s.recipe_protocol or recipe.PROTOCOL)["n_train"]
        report = lambda: recipe.write_report(self.out, stem, self.out / f"{self.s.name}.json", n_train)
        cache = self.cache(stem, self.out / f"{stem}.json")
        self._runner(cache, report)(phases(self.s, "recipe")[0].jobs)
        report()

    def _lowdata_all(self) -> None:
        s, stem = self.s, self.stem("lowdata_all")
        report = lambda: lowdata_all.write_report(self.out, stem)
        cache = self.cache(stem, self.out / f"{stem}.json")
        lowdata_all.run_plan(s.lowall_tasks, s.lowall_sizes, s.lowall_grid, s.lowall_seeds, cache.path,
                             self._runner(cache, report), s.lowall_protocol)
        report()

    def _frontier(self) -> None:
        stem = self.stem("forgetting_frontier")
        report = lambda: forgetting_frontier.write_report(self.out, stem)
        cache = self.cache(stem, self.out / f"{stem}.json")
        self._runner(cache, report, timeout=7200)(phases(self.s, "forgetting_frontier")[0].jobs)
        report()

    def _combination(self) -> None:
        stem = self.stem("combination")
        cache = self.cache(stem, self.out / f"{stem}.json", read=_combination_results)
        job = phases(self.s, "combination")[0].jobs[0]
        result = self._runner(cache, lambda: None, timeout=7200)([job])[0]
        if result.get("ok"):
            combination.write(result, self.out, stem)

    def _guarded(self, name: str, body: Callable[[], None]) -> None:
        """Run one part; a failure is logged and recorded, the other parts go on."""
        try:
            body()
        except Exception as exc:  # noqa: BLE001 - one broken part must not stop the suite
            self.errors[name] = f"{type(exc).__name__}: {exc}"
            self.log(f"part {name} FAILED: {self.errors[name]}\n{traceback.format_exc()}")

    def run(self, parts: list[str]) -> None:
        """The parts that measure time or memory first, alone; then every other part at once."""
        s, ms = self.s, methods_suite(self.s)
        for part in [p for p in ("cost", "forgetting", "inference") if p in parts]:
            self._guarded(part, lambda part=part: self._round_one(s, [part], shared=False))
        if "methods" in parts:
            self._guarded("methods cost", lambda: self._round_one(ms, ["cost"], shared=False))
        bodies = {"combination": self._combination, "forgetting_frontier": self._frontier,
                  "lowdata_all": self._lowdata_all, "recipe": self._recipe}
        shared: list[tuple[str, Callable[[], None]]] = [(p, bodies[p]) for p in bodies if p in parts]
        round_one = [p for p in ("accuracy", "lowdata") if p in parts]
        if round_one:
            shared.append(("accuracy", lambda: self._round_one(s, round_one, shared=True)))
        if "methods" in parts:
            shared.append(("methods accuracy", lambda: self._round_one(ms, ["accuracy"], shared=True)))
        threads = [threading.Thread(target=self._guarded, args=item, name=item[0]) for item in shared]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if "methods" in parts and ms.borrow_full_from:
            self.reports(["methods"])  # full fine-tuning borrowed from the accuracy part that just finished
        if self.errors:
            self.log("parts that failed: " + "; ".join(f"{k}: {v}" for k, v in self.errors.items()))

    def reports(self, parts: list[str]) -> None:
        """Rewrite each part's report from its saved results file (round two's parts render from their caches,
        so the file's results are first merged into the cache: :func:`bench.cache.absorb_results`)."""
        from bench.report import write_report

        s = self.s
        for suite, wanted in ((s, any(p in ROUND_ONE for p in parts)), (methods_suite(s), "methods" in parts)):
            path = self.out / f"{suite.name}.json"
            if wanted and path.exists():
                raw = json.loads(path.read_text())
                if suite.borrow_full_from:
                    raw = borrow_full(raw, self.out / f"{suite.borrow_full_from}.json")
                write_report(raw, self.out)
        for part, write in (("recipe", lambda stem: recipe.write_report(
                                self.out, stem, self.out / f"{s.name}.json", (s.recipe_protocol or recipe.PROTOCOL)["n_train"])),
                            ("lowdata_all", lambda stem: lowdata_all.write_report(self.out, stem)),
                            ("forgetting_frontier", lambda stem: forgetting_frontier.write_report(self.out, stem))):
            if part in parts:
                stem = self.stem(part)
                absorb_results(self.out / f".{stem}.jobs.jsonl", self.out / f"{stem}.json")
                write(stem)


def _combination_results(path: Path) -> list[dict[str, Any]]:
    """A saved ``combination.json`` as the result of its suite job (for :func:`bench.cache.part_cache`)."""
    found = combination.committed(path)
    return [found[1] | {"job": found[0]}] if found else []

