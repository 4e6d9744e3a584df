"""Joint training (a ``jobs:`` file): K adapters trained in one process on one base model.

Reference: the same jobs trained alone with ``deltatune train`` (same seed, data order, dropout 0):
each jointly trained adapter must equal its solo adapter to float32 tolerance (LoRA, IA3, prompt
tuning; different learning rates, schedules, clipping, data sizes, ranks), and each job's folder must
hold what a solo run writes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _train_tiny import save_tiny, write_classification, write_pairs
from safetensors.torch import load_file

from deltatune.errors import ConfigError
from deltatune.train.jobs import make_jobs, read_job_file
from deltatune.train.loop import train
from deltatune.train.multi_run import train_jobs
from deltatune.train.options import TrainOptions


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("jobs")
    return {"bert": save_tiny("bert", root / "bert", dropout=0.0), "llama": save_tiny("llama", root / "llama", dropout=0.0),
            "cls": write_classification(root / "cls.jsonl", 60), "cls2": write_classification(root / "cls2.jsonl", 45, seed=3),
            "pairs": write_pairs(root / "pairs.jsonl", 60), "pairs2": write_pairs(root / "pairs2.jsonl", 40, seed=5)}


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def _assert_joint_equals_solo(shared: dict, jobs: list[dict], tmp_path: Path) -> None:
    for job in jobs:
        job["output_dir"] = str(tmp_path / "joint" / job["name"])
    summaries = train_jobs(make_jobs(shared, [dict(j) for j in jobs]))
    assert sorted(s["job"] for s in summaries) == sorted(j["name"] for j in jobs)
    for job in jobs:
        solo_out = tmp_path / "solo" / job["name"]
        values = {**shared, **{k: v for k, v in job.items() if k != "name"}, "output_dir": str(solo_out)}
        values["method_options"] = {**shared.get("method_options", {}), **job.get("method_options", {})}
        solo = train(TrainOptions(**values))
        joint_out = Path(job["output_dir"])
        joint, alone = _adapter(joint_out), _adapter(solo_out)
        assert set(joint) == set(alone)
        for key in alone:
            torch.testing.assert_close(joint[key], alone[key], atol=2e-5, rtol=1e-4, msg=f"{job['name']}: {key}")
        summary = json.loads((joint_out / "summary.json").read_text())
        assert summary["steps"] == solo["steps"] and summary["trainable_params"] == solo["trainable_params"]
        for split, metrics in solo["final"].items():
            for k, v in metrics.items():
                assert summary["final"][split][k] == pytest.approx(v, rel=1e-4, abs=1e-5), (job["name"], split, k)
        records = [json.loads(x) for x in (joint_out / "metrics.jsonl").read_text().splitlines()]
        solo_records = [json.loads(x) for x in (solo_out / "metrics.jsonl").read_text().splitlines()]
        assert [r["loss"] for r in records if r["kind"] == "train"] == pytest.approx(
            [r["loss"] for r in solo_records if r["kind"] == "train"], rel=1e-4)
        assert (joint_out / "loss.png").is_file() and (joint_out / "adapter" / "deltatune_run.json").is_file()


def test_lora_ia3_prompt_jobs_equal_their_solo_runs_classification(assets: dict, tmp_path: Path) -> None:
    shared = {"model": str(assets["bert"]), "quiet": True, "threads": 1, "batch_size": 8, "seed": 7}
    qv = ["query", "value"]
    jobs = [
        {"name": "lora-r4", "data": str(assets["cls"]), "max_steps": 5, "lr": 1e-2, "method_options": {"r": 4, "target_modules": qv}},
        {"name": "lora-r8", "data": str(assets["cls"]), "max_steps": 3, "lr": 3e-3, "schedule": "cosine",
         "method_options": {"r": 8, "lora_alpha": 4, "target_modules": qv}, "max_grad_norm": 0.05, "batch_size": 4, "grad_accum": 2},
        {"name": "ia3", "data": str(assets["cls2"]), "method": "ia3", "max_steps": 4, "lr": 2e-2,
         "method_options": {"target_modules": ["key", "value", "output.dense"], "feedforward_modules": ["output.dense"]}},
        {"name": "prompt", "data": str(assets["cls2"]), "method": "prompt_tuning", "max_steps": 4, "lr": 5e-2,
         "method_options": {"num_virtual_tokens": 3}},
    ]
    _assert_joint_equals_solo(shared, jobs, tmp_path)


def test_lora_prompt_jobs_equal_their_solo_runs_causal_lm(assets: dict, tmp_path: Path) -> None:
    shared = {"model": str(assets["llama"]), "quiet": True, "threads": 1, "batch_size": 6, "seed": 3, "max_steps": 3}
    qv = ["q_proj", "v_proj"]  # explicit: main's default-target inference fails once a first adapter is in place
    jobs = [
        {"name": "a", "data": str(assets["pairs"]), "lr": 1e-2, "method_options": {"r": 4, "target_modules": qv}},
        {"name": "b", "data": str(assets["pairs2"]), "lr": 3e-3,
         "method_options": {"r": 2, "use_rslora": True, "target_modules": qv}},
        {"name": "p", "data": str(assets["pairs2"]), "method": "prompt_tuning", "lr": 3e-2,
         "method_options": {"num_virtual_tokens": 4}},
    ]
    _assert_joint_equals_solo(shared, jobs, tmp_path)


def test_job_file_and_bad_jobs(assets: dict, tmp_path: Path) -> None:
    path = tmp_path / "jobs.yaml"
    path.write_text(f"model: {assets['bert']}\nmax_steps: 2\njobs:\n  - {{name: x, data: {assets['cls']}, lr: 1.0e-3}}\n"
                    f"  - {{name: y, data: {assets['cls']}, method: ia3}}\n")
    shared, jobs = read_job_file(path)
    made = make_jobs(shared, jobs)
    assert [j.name for j in made] == ["x", "y"] and made[0].options.lr == 1e-3 and made[1].options.method == "ia3"
    assert made[0].options.output_dir != made[1].options.output_dir
    base = {"model": str(assets["bert"]), "data": str(assets["cls"])}
    with pytest.raises(ConfigError, match="'model' must be the same"):
        make_jobs(base, [{"name": "a"}, {"name": "b", "model": str(assets["llama"])}])
    with pytest.raises(ConfigError, match="different tasks"):
        make_jobs(base, [{"name": "a"}, {"name": "b", "data": str(assets["pairs"]), "model": str(assets["bert"])}])
    with pytest.raises(ConfigError, match="unique"):
        make_jobs(base, [{"name": "a"}, {"name": "a"}])
    with pytest.raises(ConfigError, match="own output_dir"):
        make_jobs(base, [{"name": "a", "output_dir": "x"}, {"name": "b", "output_dir": "x"}])
    with pytest.raises(ConfigError, match="gradient_checkpointing"):
        make_jobs(base, [{"name": "a", "gradient_checkpointing": True}])
    with pytest.raises(ConfigError, match="Unknown option"):
        make_jobs(base, [{"name": "a", "method_options": {"rank": 3}}])
    with pytest.raises(ConfigError, match="step hook"):  # AdaLoRA's rank budget runs in solo runs only
        make_jobs(base, [{"name": "a", "method": "adalora"}])


def test_cli_jobs_file_and_resume_after_interruption(assets: dict, tmp_path: Path, monkeypatch, capsys) -> None:
    """A joint run killed after its step-2 checkpoint and resumed ends with the uninterrupted run's adapters."""
    from deltatune.cli import main
    from deltatune.train import multi_run

    def job_file(root: Path) -> Path:
        path = root / "jobs.yaml"
        root.mkdir(parents=True, exist_ok=True)
        path.write_text(f"model: {assets['bert']}\nmax_steps: 4\nbatch_size: 8\nsave_every: 2\nthreads: 1\n"
                        f"output_dir: {root}\njobs:\n"
                        f"  - {{name: x, data: {assets['cls']}, lr: 1.0e-2, method_options: {{target_modules: [query]}}}}\n"
                        f"  - {{name: y, data: {assets['cls2']}, method: ia3, max_steps: 3, lr: 2.0e-2, "
                        f"method_options: {{target_modules: [value, output.dense], feedforward_modules: [output.dense]}}}}\n")
        return path

    assert main(["train", "--config", str(job_file(tmp_path / "full")), "--quiet"]) == 0
    err = capsys.readouterr().err  # --quiet drops the bar; each job's result line stays, as in a solo run
    assert "job x done: 4 steps" in err and "job y done: 3 steps" in err
    real_step = multi_run.joint_step
    calls = {"n": 0}

    def dying_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(multi_run, "joint_step", dying_step)
    cut = job_file(tmp_path / "cut")
    assert main(["train", "--config", str(cut), "--quiet"]) != 0  # the command reports the interruption
    assert calls["n"] == 3
    monkeypatch.setattr(multi_run, "joint_step", real_step)
    assert not (tmp_path / "cut" / "x" / "summary.json").exists()
    assert main(["train", "--config", str(cut), "--quiet", "--resume"]) == 0
    for name in ("x", "y"):
        full, resumed = _adapter(tmp_path / "full" / name), _adapter(tmp_path / "cut" / name)
        for key in full:
            torch.testing.assert_close(resumed[key], full[key], atol=1e-6, rtol=1e-6)
        steps = [json.loads(x)["step"] for x in (tmp_path / "cut" / name / "metrics.jsonl").read_text().splitlines()
                 if json.loads(x)["kind"] == "train"]
        assert steps == list(range(1, 5 if name == "x" else 4))
