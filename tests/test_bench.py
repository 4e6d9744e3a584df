"""Smoke tests of the benchmark harness (bench/): instruments, data order, one real tiny run, the report."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import aggregate
from bench.loop import epoch_batches, epochs_for
from bench.measure import PeakMemory, median_after_warmup
from bench.methods import available

linux_only = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")


@linux_only
def test_peak_memory_counts_an_allocation_made_after_the_baseline() -> None:
    meter = PeakMemory()
    meter.start()
    block = torch.ones(64 * 1024 * 1024 // 4)  # 64 MiB, touched
    peak = meter.peak_mb()
    del block
    assert peak is not None and 60 <= peak < 200


def test_median_after_warmup_ignores_warmup_steps() -> None:
    assert median_after_warmup([9.0, 9.0, 1.0, 3.0, 2.0], warmup=2) == 2.0
    assert median_after_warmup([1.0], warmup=5) is None


def test_data_order_depends_on_the_seed_only() -> None:
    feats = [{"input_ids": [i + 1] * (1 + i % 3), "attention_mask": [1] * (1 + i % 3), "labels": i} for i in range(10)]
    torch.manual_seed(123)
    a = epoch_batches(feats, seed=1, epochs=2, batch_size=4, pad_id=0)
    torch.manual_seed(456)  # the global RNG (what libraries consume) must not matter
    b = epoch_batches(feats, seed=1, epochs=2, batch_size=4, pad_id=0)
    assert [x["labels"].tolist() for x in a] == [x["labels"].tolist() for x in b]
    assert len(a) == 6 and sorted(v for x in a[:3] for v in x["labels"].tolist()) == list(range(10))
    assert epochs_for(50, 16, 3, min_steps=100) == 25 and epochs_for(2000, 16, 2, min_steps=100) == 2


def test_methods_peft_lacks_are_reported_not_skipped() -> None:
    assert available("lora", "peft") is None
    assert "no houlsby" in available("houlsby", "peft")


def test_memory_job_runs_in_its_own_process_and_saves_the_adapter() -> None:
    from bench.runner import run_one

    job = {"kind": "memory", "method": "lora", "lib": "deltatune", "task": "trec", "n_train": 16, "batch_size": 8,
           "max_length": 32, "steps": 2}
    res = run_one(job, threads=2, timeout=120)
    assert res["ok"], res.get("error")
    assert res["trainable"] == 8 * 2 * 6 * 2 * 384 + 384 * 6 + 6  # LoRA A and B on q, v of 6 layers + the head
    assert res["peak_mb"] > 0 and res["mem_method"] == "clear_refs+VmHWM"
    assert 4 * res["trainable"] < res["file_bytes"] < 4 * res["trainable"] + 20_000  # float32 tensors + config


def test_accuracy_job_trains_the_same_batches_for_both_libraries() -> None:
    from bench import classify

    job = {"method": "lora", "task": "trec", "seeds": [0], "n_train": 16, "epochs": 1, "batch_size": 8,
           "max_length": 32, "eval_split": "validation"}
    dt_run = classify.run(job | {"lib": "deltatune"})["runs"][0]
    hf_run = classify.run(job | {"lib": "peft"})["runs"][0]
    assert dt_run["steps"] == hf_run["steps"] == 2
    assert dt_run["trainable"] == hf_run["trainable"]
    assert 0.0 <= dt_run["accuracy"] <= 1.0


def _raw_results() -> dict:
    from bench.suites import SUITES

    def acc(method: str, lib: str, value: float) -> dict:
        runs = [{"accuracy": value, "trainable": 10, "base_params": 1000, "steps": 5, "epochs": 1, "seed": 0}]
        return {"ok": True, "n_train": 500, "runs": runs, "job": {"method": method, "lib": lib, "task": "trec"}}

    def mem(method: str, lib: str, peak: float, size: int) -> dict:
        return {"ok": True, "peak_mb": peak, "baseline_mb": 400.0, "file_bytes": size, "trainable": 10,
                "base_params": 1000, "job": {"method": method, "lib": lib, "task": "trec"}}

    timing = {"ok": True, "job": {"task": "trec"}, "configs": {
        "full/deltatune": {"step_s": 0.2, "ratio_full_paired": 1.0}, "lora/deltatune": {"step_s": 0.1, "ratio_full_paired": 0.5},
        "lora/peft": {"step_s": 0.12, "ratio_full_paired": 0.6}}}
    machine = {k: "x" for k in ("cpu", "cpu_count", "memory_gb", "platform", "python", "torch", "transformers", "peft",
                                "deltatune", "commit")}
    return {"suite": "unit", "settings": SUITES["quick"].__dict__, "skipped": {}, "started": "now", "machine": machine,
            "accuracy": [acc("full", "deltatune", 0.90), acc("lora", "deltatune", 0.885), acc("lora", "peft", 0.88)],
            "memory": [mem("full", "deltatune", 600.0, 90_000_000), mem("lora", "deltatune", 300.0, 300_000),
                       mem("lora", "peft", 350.0, 300_000)],
            "timing": [timing]}


def test_report_renders_targets_from_raw_results(tmp_path: Path) -> None:
    from bench.report import write_report

    raw = _raw_results()
    md = write_report(raw, tmp_path).read_text()
    assert "| lora within 1 pt of full FT on TREC | -1.50 pt | **missed** |" in md
    assert "| LoRA step time <= 0.65x full FT (TREC) | 0.50x | met |" in md
    assert "| LoRA peak memory <= 0.6x full FT (TREC) | 0.50x | met |" in md
    assert "| LoRA file >= 250x smaller than the model | 300x | met |" in md
    assert "| lora: deltatune/peft step time <= 1.0 (TREC) | 0.833x | met |" in md
    assert "| lora: deltatune/peft peak memory <= 1.0 (TREC) | 0.857x | met |" in md
    assert (tmp_path / "unit_cost.png").stat().st_size > 1000
    assert aggregate.accuracy(raw)[("lora", "peft", "trec", 500)]["mean"] == pytest.approx(88.0)
    assert "measured" not in md.split("## 1. Accuracy")[1].split("## 2.")[0]  # every row is this run's
    json.dumps(raw)


def test_accuracy_table_names_the_run_each_kept_row_comes_from(tmp_path: Path) -> None:
    """A narrower run keeps rows it did not run (bench/run.py ``_carried``); the accuracy table says, per row,
    whether this run measured it or which earlier run (date, commit) did."""
    from bench.report import accuracy_section

    raw = _raw_results()
    raw["accuracy"][1]["reused_from"] = "kept from an earlier run (2026-11-28 10:31:13 (6a91620)), not run by `full`"
    table = [line for line in accuracy_section(raw, aggregate.accuracy(raw), raw["settings"]) if line.startswith("|")]
    assert table[0].endswith("| measured |")
    assert table[2].startswith("| Full fine-tuning |") and table[2].endswith("| this run |")
    assert table[3].startswith("| LoRA") and table[3].endswith("| earlier run, 2026-11-28 (6a91620) |")


def test_job_cache_resumes_only_finished_successful_jobs(tmp_path: Path) -> None:
    from bench.cache import JobCache

    path = tmp_path / ".full.jobs.jsonl"
    done, failed = {"kind": "classify", "method": "lora", "seeds": [0, 1]}, {"kind": "classify", "method": "ia3"}
    cache = JobCache(path, resume=False)
    cache.put(done, {"ok": True, "runs": [1]})
    cache.put(failed, {"ok": False, "error": "boom"})
    with path.open("a") as fh:
        fh.write('{"key": "cut short by a ki')  # a write interrupted by kill -9
    resumed = JobCache(path, resume=True)
    assert resumed.get({"seeds": [0, 1], "method": "lora", "kind": "classify"}) == {"ok": True, "runs": [1]}
    assert resumed.get(failed) is None  # failures run again
    assert resumed.get(done | {"seeds": [0]}) is None  # other settings are another job
    assert JobCache(path, resume=False).get(done) is None  # a fresh run never reuses results


def test_a_partial_run_replaces_only_its_parts_and_keeps_when_each_was_measured() -> None:
    from bench.run import _merge

    old = _raw_results() | {"measured": {"accuracy": "old", "cost": "old"}, "part_seconds": {"accuracy": 60.0, "cost": 30.0}}
    new = _raw_results() | {"started": "later", "part_seconds": {"cost": 10.0}, "memory": ["new"], "timing": ["new"],
                            "accuracy": ["must not be used"]}
    merged = _merge(old, new, ["cost"])
    assert merged["memory"] == ["new"] and merged["accuracy"] == old["accuracy"]
    assert merged["measured"] == {"accuracy": "old", "cost": "later (x)"}
    assert merged["wall_seconds"] == 70.0


def test_timing_runs_each_peft_twin_beside_its_deltatune_configuration() -> None:
    from bench.cost import _twin_units

    names = ["full/deltatune", "lora/deltatune", "ia3/deltatune", "lora/peft", "ia3/peft", "odd/peft"]
    assert _twin_units(names) == [("full/deltatune",), ("lora/deltatune", "lora/peft"), ("ia3/deltatune", "ia3/peft"),
                                  ("odd/peft",)]


def test_recipe_pick_reads_validation_only_and_gap_uses_the_same_seeds() -> None:
    from bench import recipe

    def done(task: str, lr: float, seed: int, val: float, test: float) -> tuple[dict, dict]:
        job = recipe.job(task, seed, "lora", lr, recipe.lora_options("all", 16))
        return job, {"ok": True, "runs": [{"seed": seed, "accuracy": val,
                                            "accuracies": {"validation": val, "test": test}}]}

    runs = [done(t, 1e-3, 0, 0.80, 0.50) for t in ("trec", "rt", "bbc")]  # best validation, worst test
    runs += [done(t, 2e-3, 0, 0.70, 0.99) for t in ("trec", "rt", "bbc")]
    runs += [done("trec", 5e-4, 0, 0.99, 0.99)]  # best of all, but not run on every task: not eligible
    acc = recipe.accuracies(runs)
    _, best = recipe.search_table(acc, ["trec", "rt", "bbc"])
    assert best is not None and best["lr"] == 1e-3 and best["mean"] == pytest.approx(80.0)
    runs.append(done("trec", 1e-3, 1, 0.81, 0.60))
    rows = recipe.test_table(recipe.accuracies(runs), {"trec": {0: 70.0, 1: 80.0, 2: 99.0}})
    row = next(r for r in rows if r.startswith("| TREC |") and "| 0.001 |" in r)
    assert "| 0,1 | 55.00 ± 7.07 | 75.00 (round one) | -20.00 |" in row  # mean of seeds 0 and 1 only


def test_recipe_search_rescores_candidates_with_more_seeds_on_validation() -> None:
    """A candidate with seeds 0 and 1 on every task gets the validation mean over tasks and seeds and the
    sample std over seeds of the per-seed task mean; one with a seed missing on a task gets none."""
    from bench import recipe

    def done(task: str, lr: float, seed: int, val: float) -> tuple[dict, dict]:
        job = recipe.job(task, seed, "lora", lr, recipe.lora_options("all", 16, dropout=0.0))
        return job, {"ok": True, "runs": [{"seed": seed, "accuracy": val, "accuracies": {"validation": val}}]}

    vals = {0: {"trec": 0.90, "rt": 0.80, "bbc": 0.70}, 1: {"trec": 0.93, "rt": 0.83, "bbc": 0.79}}
    runs = [done(t, 1e-3, seed, v) for seed, by_task in vals.items() for t, v in by_task.items()]
    runs += [done(t, 2e-3, 0, 0.5) for t in ("trec", "rt", "bbc")] + [done("trec", 2e-3, 1, 0.5)]
    rows, _ = recipe.search_table(recipe.accuracies(runs), ["trec", "rt", "bbc"])
    per_seed = [100 * sum(by_task.values()) / 3 for by_task in vals.values()]  # 80.0 and 85.0
    mean, std = sum(per_seed) / 2, abs(per_seed[0] - per_seed[1]) / 2 ** 0.5
    row = next(r for r in rows if "| 0.001 |" in r)
    assert "dropout 0" in row and f"| {mean:.2f} (seeds 0,1) | {std:.2f} |" in row
    assert next(r for r in rows if "| 0.002 |" in r).endswith("| — | — |")


def test_split_seed_jobs_come_seed_major_and_pool_back_into_one_cell() -> None:
    """The ``methods`` suite runs one job per seed (every configuration at seed 0 first); the report pools
    them, and deltatune-vs-peft accuracy is judged against twice the larger seed spread."""
    from bench.report_extra import _peft_accuracy_targets
    from bench.run import _accuracy_jobs
    from bench.suites import SUITES

    s = SUITES["methods"]
    jobs = _accuracy_jobs(s, [("full", "deltatune"), ("lora", "deltatune"), ("loha", "deltatune"), ("loha", "peft")])
    assert [j["seeds"] for j in jobs[:4]] == [[0]] * 4 and jobs[4]["seeds"] == [1]  # 3 tasks + 1 peft twin
    assert {j["method"] for j in jobs} == {"loha"}  # LoRA: cost jobs only; full FT: borrowed from full.json
    job = {"method": "loha", "task": "trec", "n_train": 10}

    def res(lib: str, seed: int, acc: float) -> dict:
        return {"ok": True, "n_train": 10, "job": job | {"lib": lib},
                "runs": [{"seed": seed, "accuracy": acc, "trainable": 5, "base_params": 50, "steps": 1, "epochs": 1}]}

    raw = {"accuracy": [res("deltatune", 1, 0.92), res("deltatune", 0, 0.90), res("peft", 0, 0.91), res("peft", 1, 0.93)]}
    cells = aggregate.accuracy(raw)
    assert cells[("loha", "deltatune", "trec", 10)]["seeds"] == [0, 1]
    assert cells[("loha", "deltatune", "trec", 10)]["accs"] == pytest.approx([90.0, 92.0])
    ((label, value, status),) = _peft_accuracy_targets(cells)
    assert label.startswith("loha: ") and value == "-1.00 pt (noise 2.83)" and status == "met"


def test_cached_only_reports_finished_jobs_and_counts_the_rest(tmp_path: Path) -> None:
    from bench.cache import JobCache
    from bench.runner import run_many

    done, missing = {"kind": "classify", "method": "loha", "seeds": [0]}, {"kind": "classify", "method": "lokr", "seeds": [1]}
    cache = JobCache(tmp_path / "jobs.jsonl", resume=False)
    cache.put(done, {"ok": True, "runs": []})
    out = run_many([done, missing], cache=JobCache(tmp_path / "jobs.jsonl", resume=True), cached_only=True,
                   progress=lambda _: None)
    assert out[0]["ok"] and out[0]["reused"] and out[1] == {"ok": False, "error": aggregate.NOT_RUN, "job": missing}
    assert aggregate.failures({"accuracy": out}) == ["not run, the run was cut short: 1 accuracy (seeds [1]) jobs"]


def test_recipe_schedule_candidates_are_told_apart_and_reach_the_trainer(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 3-epoch or 10 %-warm-up candidate is a job of its own, labelled so, and its warm-up reaches ``train``."""
    from bench import classify, recipe

    plain = recipe.job("trec", 0, "lora", 1e-3, recipe.lora_options("all", 16))
    longer = recipe.job("trec", 0, "lora", 1e-3, recipe.lora_options("all", 16), recipe.protocol_with(3))
    warm = recipe.job("trec", 0, "lora", 1e-3, recipe.lora_options("all", 16), recipe.protocol_with(2, 0.1))
    assert plain == recipe.job("trec", 0, "lora", 1e-3, recipe.lora_options("all", 16), recipe.protocol_with())
    assert longer["epochs"] == 3 and "warmup_frac" not in longer and warm["warmup_frac"] == 0.1
    labels = {recipe._label(j) for j in (plain, longer, warm)}
    assert labels == {"LoRA all linear, r=16, alpha=32", "LoRA all linear, r=16, alpha=32, 3 epochs",
                      "LoRA all linear, r=16, alpha=32, warm-up 10%"}
    seen: list[dict] = []

    class Stop(Exception):
        pass

    def fake_train(model: object, batches: object, **kw: object) -> None:
        seen.append(kw)
        raise Stop

    monkeypatch.setattr(classify, "train", fake_train)
    monkeypatch.setattr(classify, "load_model", lambda *a, **k: (None, {}))
    monkeypatch.setattr(classify, "batches_for", lambda *a, **k: [])
    monkeypatch.setattr(classify, "prepare", lambda job: None)
    with pytest.raises(Stop):
        classify.run(warm)
    assert seen[0]["warmup_frac"] == 0.1


def test_recipe_test_table_compares_a_longer_schedule_with_full_fine_tuning_at_that_schedule() -> None:
    """A 3-epoch LoRA row gets two gaps: to round one's 2-epoch full fine-tuning and to a 3-epoch one."""
    from bench import recipe
    from bench.methods import METHODS

    def done(method: str, lr: float, seed: int, test: float, epochs: int) -> tuple[dict, dict]:
        options = recipe.lora_options("all", 16) if method == "lora" else None
        job = recipe.job("trec", seed, method, lr, options, recipe.protocol_with(epochs))
        return job, {"ok": True, "runs": [{"seed": seed, "accuracy": test,
                                            "accuracies": {"validation": test, "test": test}}]}

    full_lr = METHODS["full"].lr
    runs = [done("lora", 1e-3, s, t, 3) for s, t in ((0, 0.90), (1, 0.94))]
    runs += [done("full", full_lr, s, t, 3) for s, t in ((0, 0.95), (1, 0.97), (2, 0.99))]
    rows = recipe.test_table(recipe.accuracies(runs), {"trec": {0: 91.0, 1: 93.0}})
    lora = next(r for r in rows if "LoRA" in r)
    # 92 vs round one's 92 (seeds 0,1): +0.00; vs 3-epoch full fine-tuning over seeds 0,1 only (96): -4.00
    assert lora.endswith("| 0,1 | 92.00 ± 2.83 | 92.00 (round one) | +0.00 | 96.00 | -4.00 |")
    full3 = next(r for r in rows if "full fine-tuning, 3 epochs" in r)
    assert full3.endswith("| 97.00 ± 2.00 | — | — | 97.00 | — |")  # round one has no seed 2: no gap to it
