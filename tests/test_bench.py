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


def test_one_real_configuration_runs_in_its_own_process() -> None:
    from bench.runner import run_one

    job = {"kind": "classify", "model": "minilm", "method": "lora", "lib": "deltatune", "task": "trec", "seeds": [0],
           "n_train": 16, "epochs": 1, "batch_size": 8, "max_length": 32, "warmup_steps": 0, "save": True}
    res = run_one(job, threads=2, timeout=120)
    assert res["ok"], res.get("error")
    run = res["runs"][0]
    assert run["steps"] == 2 and run["trainable"] == 8 * 2 * 6 * 2 * 384 + 384 * 6 + 6  # LoRA q,v + head
    assert 0.0 <= run["accuracy"] <= 1.0 and run["peak_mb"] > 0 and run["file_bytes"] > 0


def test_report_renders_targets_from_raw_results(tmp_path: Path) -> None:
    from bench.report import write_report
    from bench.suites import SUITES

    def res(method: str, lib: str, accs: list[float], step: float, mem: float, size: int) -> dict:
        runs = [{"accuracy": a, "trainable": 10, "base_params": 1000, "steps": 5, "epochs": 1, "seed": i} for i, a in enumerate(accs)]
        runs[0] |= {"step_s": step, "peak_mb": mem, "file_bytes": size}
        return {"ok": True, "n_train": 500, "runs": runs, "job": {"method": method, "lib": lib, "task": "trec"}}

    raw = {"suite": "unit", "settings": SUITES["quick"].__dict__, "skipped": {}, "started": "now",
           "machine": {k: "x" for k in ("cpu", "cpu_count", "memory_gb", "platform", "python", "torch", "transformers", "peft", "deltatune", "commit")},
           "accuracy": [res("full", "deltatune", [0.90], 0.2, 600.0, 90_000_000), res("lora", "deltatune", [0.885], 0.1, 300.0, 300_000),
                        res("lora", "peft", [0.88], 0.12, 350.0, 300_000)]}
    md = write_report(raw, tmp_path).read_text()
    assert "| lora within 1 pt of full FT on TREC | -1.50 pt | **missed** |" in md
    assert "| LoRA step time <= 0.65x full FT (TREC) | 0.50x | met |" in md
    assert "| LoRA file >= 250x smaller than the model | 300x | met |" in md
    assert "| lora: deltatune/peft step time <= 1.0 (TREC) | 0.83x | met |" in md
    assert (tmp_path / "unit_cost.png").stat().st_size > 1000
    assert aggregate.accuracy(raw)[("lora", "peft", "trec", 500)]["mean"] == pytest.approx(88.0)
    json.dumps(raw)
