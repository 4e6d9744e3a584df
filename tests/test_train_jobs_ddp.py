"""Joint training (a ``jobs:`` file) under ``torchrun`` on CPU (gloo, 2 processes).

Reference: every job trained alone under ``torchrun`` with the same options (same seed, data order,
per-rank batch, dropout 0). Each jointly trained adapter must equal its solo DDP adapter to float32
tolerance, with the same per-step losses (reduced over both ranks) and final metrics. The jobs are
chosen so that the awkward cases happen: the training files have 43 and 31 rows, so epochs end on
micro-batches of 1 or 3 rows (rank 1's share of a job is empty: its adapter gets no gradient there,
and in the IA3 job's step 6 rank 1 has no row of it at all), the LoRA jobs differ in rank, learning
rate, schedule, clipping, per-rank batch and accumulation (3 vs 1 micro-batches per step), and the
jobs stop at different steps. A run killed after its step-4 checkpoint and resumed with ``--resume``
must end with the uninterrupted run's adapters.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _train_tiny import save_tiny, write_classification
from safetensors.torch import load_file

from deltatune.errors import ConfigError
from deltatune.train.jobs import make_jobs

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
HERE = Path(__file__).resolve().parent
QV = ["query", "value"]


def _jobs(data: dict[str, Path]) -> tuple[dict, list[dict]]:
    shared = {"model": str(data["bert"]), "validation_data": str(data["val"]), "test_data": str(data["test"]),
              "seed": 7, "threads": 1, "batch_size": 3, "warmup_steps": 0, "save_every": 2,
              "dist_timeout": 60.0}
    jobs = [
        {"name": "lora-r4", "data": str(data["cls"]), "max_steps": 6, "grad_accum": 2, "lr": 1e-2, "max_grad_norm": 0.05,
         "method_options": {"r": 4, "lora_dropout": 0.0, "target_modules": QV}},
        {"name": "lora-r8", "data": str(data["cls"]), "max_steps": 4, "lr": 3e-3, "schedule": "cosine",
         "batch_size": 2, "grad_accum": 3,
         "method_options": {"r": 8, "lora_alpha": 4, "lora_dropout": 0.0, "target_modules": QV}},
        {"name": "ia3", "data": str(data["cls2"]), "method": "ia3", "max_steps": 6, "lr": 2e-2,
         "method_options": {"target_modules": ["key", "value", "output.dense"], "feedforward_modules": ["output.dense"]}},
        {"name": "prompt", "data": str(data["cls2"]), "method": "prompt_tuning", "max_steps": 3, "lr": 5e-2,
         "batch_size": 4, "method_options": {"num_virtual_tokens": 3}},
    ]
    return shared, jobs


def _write_job_file(path: Path, shared: dict, jobs: list[dict], out: Path) -> Path:
    path.write_text(json.dumps({**shared, "output_dir": str(out), "jobs": jobs}), encoding="utf-8")  # JSON is YAML
    return path


def _run(cmd: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout, check=False)


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def _children(pid: int) -> list[int]:
    """Process ids of ``pid``'s children (Linux)."""
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _records(out: Path, kind: str = "train") -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The joint DDP run and the four solo DDP runs it is compared with (one torchrun launch)."""
    root = tmp_path_factory.mktemp("jobs_ddp")
    data = {"bert": save_tiny("bert", root / "bert", dropout=0.0),
            "cls": write_classification(root / "cls.jsonl", 43, seed=1),
            "cls2": write_classification(root / "cls2.jsonl", 31, seed=4),
            "val": write_classification(root / "val.jsonl", 12, seed=2),
            "test": write_classification(root / "test.jsonl", 12, seed=3)}
    shared, jobs = _jobs(data)
    job_file = _write_job_file(root / "jobs.yaml", shared, jobs, root / "joint")
    plan: list[dict] = [{"argv": ["train", "--config", str(job_file), "--quiet"]}]  # the joint run
    for job in jobs:  # each job alone, with the same options
        values = {**shared, **{k: v for k, v in job.items() if k != "name"}, "output_dir": str(root / "solo" / job["name"])}
        values.pop("save_every")
        plan.append({"options": {**values, "quiet": True}})
    (root / "plan.json").write_text(json.dumps(plan), encoding="utf-8")
    done = _run([*TORCHRUN, str(HERE / "_ddp_runs.py"), str(root / "plan.json")])
    assert done.returncode == 0, done.stderr[-4000:]
    return {"root": root, "data": data, "shared": shared, "jobs": jobs, "job_file": job_file}


def test_each_job_trained_jointly_under_ddp_equals_its_solo_ddp_run(runs: dict) -> None:
    root = runs["root"]
    for job in runs["jobs"]:
        name = job["name"]
        joint_out, solo_out = root / "joint" / name, root / "solo" / name
        joint, alone = _adapter(joint_out), _adapter(solo_out)
        assert set(joint) == set(alone) and alone
        assert all(t.abs().max() > 0 for t in alone.values())  # trained, not left at a zero init
        for key, want in alone.items():
            torch.testing.assert_close(joint[key], want, atol=1e-5, rtol=1e-5, msg=f"{name}: {key}")
        got, ref = _records(joint_out), _records(solo_out)
        assert [r["step"] for r in got] == list(range(1, job["max_steps"] + 1))  # rank 0 alone logs, once a step
        assert [r["examples"] for r in got] == [r["examples"] for r in ref]  # global rows (both ranks)
        assert [r["tokens"] for r in got] == [r["tokens"] for r in ref]
        assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in ref], rel=1e-5, abs=1e-6)
        summary = json.loads((joint_out / "summary.json").read_text())
        solo_summary = json.loads((solo_out / "summary.json").read_text())
        assert summary["distributed"] == solo_summary["distributed"]
        assert summary["distributed"]["world_size"] == 2
        for split, metrics in solo_summary["final"].items():
            for k, v in metrics.items():
                assert summary["final"][split][k] == pytest.approx(v, rel=1e-5, abs=1e-6), (name, split, k)
        assert (joint_out / "loss.png").is_file() and (joint_out / "adapter" / "deltatune_run.json").is_file()
    # The sharded rows: lora-r4's 43 rows in global micro-batches of 6 (2 a step) -> the 4th step's second
    # micro-batch is 1 row (rank 1's share empty);
    # ia3's step 6 is its 31st row alone, so rank 1 has no row of that job in the whole step.
    assert [r["examples"] for r in _records(root / "joint" / "lora-r4")][:4] == [12, 12, 12, 7]
    assert [r["examples"] for r in _records(root / "joint" / "ia3")] == [6, 6, 6, 6, 6, 1]


def test_killed_joint_ddp_run_resumes_to_the_uninterrupted_adapters(runs: dict, capsys: pytest.CaptureFixture) -> None:
    from deltatune.cli import main

    root = runs["root"]
    cut = root / "cut"
    job_file = _write_job_file(root / "cut.yaml", runs["shared"], runs["jobs"], cut)
    launcher = subprocess.Popen([*TORCHRUN, "-m", "deltatune", "train", "--config", str(job_file), "--quiet"],
                                env={**ENV, "DELTATUNE_STEP_DELAY": "1.0"}, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
    # After step 4: lora-r4 and ia3 checkpointed, lora-r8 finished (prompt finished at step 3).
    marks = [cut / "lora-r4" / "checkpoints" / "step-000004", cut / "ia3" / "checkpoints" / "step-000004",
             cut / "lora-r8" / "summary.json"]
    deadline = time.time() + 180
    while not all(m.exists() for m in marks):
        assert launcher.poll() is None, launcher.communicate()[1][-4000:]
        assert time.time() < deadline, "the step-4 checkpoints did not appear"
        time.sleep(0.05)
    workers = _children(launcher.pid)  # torchrun starts each rank in its own session
    assert len(workers) == 2
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    launcher.communicate(timeout=60)
    assert launcher.returncode != 0
    assert not (cut / "lora-r4" / "adapter").exists() and not (cut / "ia3" / "summary.json").exists()
    assert max(r["step"] for r in _records(cut / "lora-r4")) < 6

    # A checkpoint of 2 ranks does not resume in 1 process (the rows of each step would differ).
    assert main(["train", "--config", str(job_file), "--resume", "--quiet"]) != 0
    assert "2 rank(s)" in capsys.readouterr().err

    resumed = _run([*TORCHRUN, "-m", "deltatune", "train", "--config", str(job_file), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "Resumed every running job from step 4" in resumed.stderr
    for job in runs["jobs"]:
        full, again = _adapter(root / "joint" / job["name"]), _adapter(cut / job["name"])
        assert set(full) == set(again)
        for key, want in full.items():
            torch.testing.assert_close(again[key], want, atol=1e-6, rtol=1e-6, msg=f"{job['name']}: {key}")
        steps = [r["step"] for r in _records(cut / job["name"])]
        assert steps == list(range(1, job["max_steps"] + 1)), (job["name"], steps)


def test_fsdp_jobs_are_refused_before_any_work(runs: dict) -> None:
    shared, jobs = runs["shared"], [dict(j) for j in runs["jobs"][:2]]
    with pytest.raises(ConfigError, match="torchrun without --fsdp"):
        make_jobs({**shared, "fsdp": True}, jobs)
