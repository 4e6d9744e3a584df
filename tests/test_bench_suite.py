"""``python -m bench --suite full``: every part in one resumable run, and ``--plan``'s estimate arithmetic."""

from __future__ import annotations

import json
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import lowdata_all, plan, recipe
from bench.cache import KEPT, absorb_results, finished_jobs, job_key, part_cache
from bench.parts import SuiteRun, phases
from bench.run import _merge, borrow_full
from bench.suites import ALL_METHODS, FULL_ACCURACY_CUTS, FULL_CUTS, SUITES


def _classify(task: str, method: str, seeds: list[int], n_train: int) -> dict[str, Any]:
    return {"kind": "classify", "model": "minilm", "method": method, "lib": "deltatune", "task": task, "seeds": seeds,
            "n_train": n_train, "epochs": 1, "batch_size": 10, "max_length": 64, "autocast": "bf16", "lr": 1e-3}


def test_plan_estimate_is_min_of_unit_scaled_records_over_load_and_sums_per_part() -> None:
    # units of a classify job = seeds x steps; 100 rows / batch 10 = 10 steps per epoch
    twin = _classify("trec", "lora", [0, 1], 100)  # 2 x 10 = 20 units
    assert plan.units(twin) == 20
    assert plan.units(_classify("trec", "lora", [0], 30) | {"min_steps": 7}) == 9  # 3 steps/epoch, 3 epochs for >= 7
    recs = [plan.Record(_classify("trec", "lora", [0], 100), 40.0, "full.json"),       # idle: 4 s/unit
            plan.Record(_classify("trec", "lora", [0], 100), 30.0, "full.json"),       # idle, faster: 3 s/unit
            plan.Record(_classify("trec", "full", [0], 100), 100.0, "full.json"),      # idle full FT: 10 s/unit
            plan.Record(_classify("trec", "full", [0, 1], 100), 300.0, "loaded.json"),  # 15 s/unit: 1.5x idle
            plan.Record(_classify("rt", "full", [0], 100), 900.0, "loaded.json"),      # 90 s/unit -> 60 after / 1.5
            plan.Record(_classify("bbc", "ia3", [0], 100), 300.0, "loaded.json")]      # no idle twin
    factors = plan.load_factors(recs)
    assert factors == {"loaded.json": pytest.approx(300.0 / (10.0 * 20))}  # least-loaded comparable job (rt: 9x)
    norm = plan.normalized(recs)
    assert plan.estimate_job(twin, norm) == (pytest.approx(3.0 * 20), "same job")
    assert plan.estimate_job(_classify("rt", "full", [0, 1, 2], 100), norm) == (pytest.approx(900 / 1.5 / 10 * 30), "same job")
    assert plan.estimate_job(_classify("sms", "ia3", [0], 100), norm) == (pytest.approx(300 / 1.5), "other task")
    kind = plan.estimate_job(_classify("sms", "bitfit", [0], 100), norm)
    per_unit = sorted([4.0, 3.0, 10.0, 10.0, 60.0, 20.0])
    assert kind == (pytest.approx((per_unit[2] + per_unit[3]) / 2 * 10), "kind median")

    s = replace(SUITES["quick"], workers=2, recipe_tasks=["trec", "rt"], recipe_full_tasks=["rt"], recipe_seeds=[0, 1])
    rows = {r.part: r for r in plan.plan(s, ["recipe", "inference"], norm)}
    jobs = phases(s, "recipe")[0].jobs
    assert rows["recipe"].jobs == len(jobs) == 6
    shared = sum(plan.estimate_job(j, norm)[0] for j in jobs)
    assert rows["recipe"].shared_seconds == pytest.approx(shared) and rows["recipe"].alone_seconds == 0
    assert rows["recipe"].minutes == pytest.approx(shared / 2 / 60)  # shared jobs: their sum over 2 workers
    assert rows["inference"].minutes == pytest.approx(rows["inference"].alone_seconds / 60)  # alone: the sum


def test_plan_counts_rows_a_narrower_run_kept_but_not_borrowed_copies(tmp_path: Path) -> None:
    """A row ``full`` kept from an earlier run is the only record of its job's time; the full fine-tuning rows
    the methods suite borrows are copies of ``full.json``'s and are left out."""
    def result(method: str, seconds: float, mark: str | None) -> dict[str, Any]:
        res = {"ok": True, "job": _classify("trec", method, [0], 100), "process_seconds": seconds}
        return res | {"reused_from": mark} if mark else res

    (tmp_path / "full.json").write_text(json.dumps({"accuracy": [
        result("full", 100.0, None), result("ia3", 50.0, "kept from an earlier run (then (abc)), not run by `full`")]}))
    (tmp_path / "methods.json").write_text(json.dumps({"accuracy": [
        result("full", 999.0, "suite full, started then, commit abc (full.json)")]}))
    got = sorted((r.job["method"], r.seconds, r.source) for r in plan.records(tmp_path))
    assert got == [("full", 100.0, "full.json"), ("ia3", 50.0, "full.json")]


def test_full_suite_is_estimated_within_90_minutes_and_names_its_cuts() -> None:
    full, extended = SUITES["full"], SUITES["extended"]
    recs = plan.normalized(plan.records())
    minutes = sum(r.minutes for r in plan.plan(full, full.parts, recs))
    assert 30 < minutes <= 90
    assert sum(r.minutes for r in plan.plan(extended, extended.parts, recs)) > minutes
    assert set(extended.parts) - set(full.parts) == {"methods", "combination"}
    assert all(any(c.startswith(part) for c in FULL_CUTS) for part in ("methods", "combination"))
    assert full.lowall_seeds == [0] and extended.lowall_seeds == [0, 1, 2]
    assert {"recipe", "lowdata_all", "forgetting_frontier", "accuracy", "cost"} <= set(full.parts)
    assert set(full.accuracy_methods or ()) | set(FULL_ACCURACY_CUTS) == set(ALL_METHODS)  # cut, not lost
    assert full.accuracy_methods == ["full"]  # the reference the recipe part is measured against
    assert extended.accuracy_methods is None and any(c.startswith("accuracy") for c in FULL_CUTS)


def _fake_run_one(calls: list[dict], state: dict[str, int]) -> Any:
    lock = threading.Lock()

    def run_one(job: dict[str, Any], *, threads: int = 2, timeout: float = 3600) -> dict[str, Any]:
        with lock:
            state["now"] += 1
            state["most"] = max(state["most"], state["now"])
            calls.append(job)
        time.sleep(0.02)
        with lock:
            state["now"] -= 1
        val = 0.5 + 0.1 * (job["lr"] in (1e-3, 1e-4, 2e-2)) + 0.01 * job["seeds"][0]  # the default rate wins
        runs = [{"seed": seed, "accuracy": val, "accuracies": {"validation": val, "test": val - 0.05}}
                for seed in job["seeds"]]
        return {"ok": True, "runs": runs, "n_train": job["n_train"], "job": job, "process_seconds": 0.02}

    return run_one


def test_suite_runs_parts_over_shared_workers_and_resume_reuses_every_job(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import bench.runner

    calls: list[dict] = []
    state = {"now": 0, "most": 0}
    monkeypatch.setattr(bench.runner, "run_one", _fake_run_one(calls, state))
    monkeypatch.setattr(lowdata_all, "chart", lambda *args: None)  # the report's PNG: seconds per job, not tested here
    s = replace(SUITES["quick"], workers=2, recipe_tasks=["trec", "rt"], recipe_full_tasks=["trec"], recipe_seeds=[0, 1],
                lowall_tasks=["trec", "bbc"], lowall_sizes=[50], lowall_seeds=[0, 1])
    SuiteRun(s, tmp_path, resume=False, log=lambda _: None).run(["recipe", "lowdata_all"])
    assert 1 < state["most"] <= 2  # both parts at once, never more processes than workers
    grid = lowdata_all.grid_jobs(["trec", "bbc"], [50], 2, s.lowall_protocol)
    later = [j for j in calls if j.get("min_steps") and j["seeds"] == [1]]
    assert len(calls) == 6 + len(grid) + len(later) and len(later) == 6  # one seed-1 job per cell
    assert all(j["lr"] == lowdata_all.GRID[j["method"]][0] for j in later)  # at the rate picked on validation
    assert "| TREC | 50 |" in (tmp_path / "quick_lowdata.md").read_text()
    assert "| Rotten Tomatoes | LoRA all linear" in (tmp_path / "quick_recipe.md").read_text()

    calls.clear()
    SuiteRun(s, tmp_path, resume=True, log=lambda _: None).run(["recipe", "lowdata_all"])
    assert calls == []  # every job of every part reused
    for cache in tmp_path.glob(".*.jobs.jsonl"):  # a fresh checkout: the caches are gone, the results files stay
        cache.unlink()
    SuiteRun(s, tmp_path, resume=True, log=lambda _: None).run(["recipe", "lowdata_all"])
    assert calls == []  # seeded from quick_recipe.json / quick_lowdata.json
    SuiteRun(s, tmp_path, resume=False, log=lambda _: None).run(["recipe"])
    assert len(calls) == 6  # without --resume a part starts afresh


def test_part_cache_seeds_from_the_committed_results_only_when_resuming(tmp_path: Path) -> None:
    committed = ROOT / "bench" / "results" / "recipe.json"
    saved = json.loads(committed.read_text())
    cache = part_cache(tmp_path / ".recipe.jobs.jsonl", committed, resume=True)
    assert saved and all(cache.get(e["job"]) is not None for e in saved)
    fresh = part_cache(tmp_path / ".recipe.jobs.jsonl", committed, resume=False)
    assert all(fresh.get(e["job"]) is None for e in saved)  # a fresh run runs every job of its own again
    kept = finished_jobs(tmp_path / ".recipe.jobs.jsonl")  # ... and its report still holds the ones it leaves out
    assert len(kept) == len(saved) and all(r[KEPT] == "recipe.json, before this run" for _, r in kept)
    ran = {k: v for k, v in saved[0]["result"].items() if k != KEPT}  # as this run's worker returns it
    fresh.put(saved[0]["job"], ran | {"accuracy_marker": 1})
    latest = {job_key(j): r for j, r in finished_jobs(tmp_path / ".recipe.jobs.jsonl")}
    assert len(latest) == len(saved) and latest[job_key(saved[0]["job"])].get("accuracy_marker") == 1
    assert fresh.get(saved[0]["job"])["accuracy_marker"] == 1
    jobs = recipe.test_jobs(["trec", "rt", "bbc", "sms"], ["sms"], [0, 1, 2])
    assert len(jobs) == 15 and all(cache.get(j) is not None for j in jobs)  # the shipped recipe's test is all there


def test_report_only_renders_every_saved_result_even_from_an_older_cache(tmp_path: Path) -> None:
    """``--report-only`` renders round two's parts from their caches: the results file is merged in first, so
    a cache older than the file (one job's older result, another job missing) loses nothing, and a job only the
    cache holds stays."""
    a, b, c = (_classify("trec", m, [0], 50) for m in ("full", "lora", "ia3"))
    cache = tmp_path / ".lowdata.jobs.jsonl"
    cache.write_text("".join(json.dumps({"key": job_key(j), "result": {"ok": True, "accuracy": acc}}) + "\n"
                             for j, acc in ((a, 0.1), (c, 0.3))))
    saved = tmp_path / "lowdata.json"
    saved.write_text(json.dumps([{"job": a, "result": {"ok": True, "accuracy": 0.5}},
                                 {"job": b, "result": {"ok": True, "accuracy": 0.6}}]))
    absorb_results(cache, saved)
    got = {job_key(j): r["accuracy"] for j, r in finished_jobs(cache)}
    assert got == {job_key(a): 0.5, job_key(b): 0.6, job_key(c): 0.3}
    absorb_results(cache, saved)  # again: the cache does not grow
    assert len(cache.read_text().splitlines()) == 3


def test_resume_counts_published_results_a_fresh_run_had_kept(tmp_path: Path) -> None:
    """A results file written by a fresh run marks the results it kept (not run by it); resuming from that file
    reuses them like any published result, while a fresh run still runs them again."""
    job = _classify("trec", "lora", [0], 50)
    saved = tmp_path / "lowdata.json"
    saved.write_text(json.dumps([{"job": job, "result": {"ok": True, "accuracy": 0.5, KEPT: "lowdata.json, before"}}]))
    assert part_cache(tmp_path / ".a.jobs.jsonl", saved, resume=True).get(job)["accuracy"] == 0.5
    assert part_cache(tmp_path / ".b.jobs.jsonl", saved, resume=False).get(job) is None


def test_methods_borrow_full_fine_tuning_per_seed_from_the_full_suite(tmp_path: Path) -> None:
    full = {"suite": "full", "started": "then", "machine": {"commit": "abc"}, "accuracy": [
        {"ok": True, "job": {"method": "full", "lib": "deltatune", "task": "trec", "n_train": 2000, "epochs": 2,
                             "seeds": [0, 1, 2]}, "runs": [{"seed": 0, "accuracy": 0.9}, {"seed": 1, "accuracy": 0.8},
                                                          {"seed": 2, "accuracy": 0.7}]}]}
    (tmp_path / "full.json").write_text(json.dumps(full))
    own = {"ok": True, "job": {"method": "full", "lib": "deltatune", "task": "trec", "seeds": [1]},
           "runs": [{"seed": 1, "accuracy": 0.5}]}
    raw = {"settings": {"tasks": ["trec"], "seeds": [0, 1], "n_train": 2000, "epochs": 2}, "accuracy": [own]}
    out = borrow_full(raw, tmp_path / "full.json")
    borrowed = out["accuracy"][1:]
    assert [(r["job"]["seeds"], r["runs"]) for r in borrowed] == [([0], [{"seed": 0, "accuracy": 0.9}])]
    assert borrowed[0]["reused_from"].startswith("suite full") and out["accuracy"][0] is own


def test_a_narrower_run_keeps_the_accuracy_rows_it_cut_and_replaces_the_ones_it_ran() -> None:
    """``full`` cuts accuracy jobs that ``extended`` runs: after a ``full`` run the accuracy part holds its own
    results plus the earlier run's rows for the cut configurations (marked), never an old row it re-ran."""
    def result(method: str, seeds: list[int], acc: float) -> dict[str, Any]:
        return {"ok": True, "job": _classify("trec", method, seeds, 2000), "runs": [{"seed": 0, "accuracy": acc}]}

    old = {"suite": "extended", "started": "then", "measured": {"accuracy": "then (abc)"}, "part_seconds": {},
           "accuracy": [result("full", [0, 1, 2], 0.90), result("head", [0, 1, 2], 0.70)], "memory": [{"old": 1}]}
    new = {"suite": "full", "started": "now", "machine": {"commit": "def"}, "part_seconds": {"accuracy": 60.0},
           "accuracy": [result("full", [0, 1], 0.91)], "memory": [{"new": 1}]}
    merged = _merge(old, new, ["accuracy"])
    assert [(r["job"]["method"], r["runs"][0]["accuracy"]) for r in merged["accuracy"]] == [("full", 0.91),
                                                                                              ("head", 0.70)]
    assert "reused_from" not in merged["accuracy"][0]
    assert merged["accuracy"][1]["reused_from"] == "kept from an earlier run (then (abc)), not run by `full`"
    assert merged["memory"] == [{"old": 1}]  # a part not named keeps its results untouched
    assert _merge(None, new, ["accuracy"])["accuracy"] == new["accuracy"]


def test_recipe_part_trains_the_recipe_for_its_own_epochs_and_extended_adds_same_schedule_full_tuning() -> None:
    """``full``: LoRA at the recipe's epochs, full fine-tuning at its own defaults (round one's protocol);
    ``extended`` adds full fine-tuning at the recipe's epochs on every recipe task."""
    _, _, epochs = recipe.shipped_recipe()
    full_jobs = phases(SUITES["full"], "recipe")[0].jobs
    extended_jobs = phases(SUITES["extended"], "recipe")[0].jobs
    lora = [j for j in full_jobs if j["method"] == "lora"]
    assert lora and all(j["epochs"] == epochs for j in lora)
    assert {(j["task"], j["epochs"]) for j in full_jobs if j["method"] == "full"} == {("sms", recipe.PROTOCOL["epochs"])}
    extra = [j for j in extended_jobs if j not in full_jobs]
    same = {(j["task"], j["seeds"][0]) for j in extra if j["method"] == "full" and j["epochs"] == epochs}
    assert len(extra) == len(same) == 12 and {t for t, _ in same} == {"trec", "rt", "bbc", "sms"}
    quick = phases(SUITES["quick"], "recipe")[0].jobs  # the quick suite's tiny protocol wins over the recipe's epochs
    assert all(j["epochs"] == SUITES["quick"].recipe_protocol["epochs"] for j in quick)
