"""``deltatune train --resume`` after ``kill -9``: the resumed run ends with the uninterrupted run's adapter."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from _train_tiny import save_tiny, write_classification
from safetensors.torch import load_file


def _train_losses(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if r["kind"] == "train"]
    assert len(steps) == len(set(steps)), "a step is logged twice after resuming"
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


def test_kill_9_mid_run_then_resume_gives_the_same_adapter(tmp_path: Path) -> None:
    model = save_tiny("bert", tmp_path / "bert", dropout=0.1)  # dropout on: the RNG state must be restored
    data = write_classification(tmp_path / "cls.jsonl", 80)
    args = [sys.executable, "-m", "deltatune", "train", "--model", str(model), "--data", str(data),
            "--max-steps", "12", "--batch-size", "8", "--save-every", "3", "--eval-every", "4", "--threads", "1",
            "--quiet", "--lr", "1e-2", "--method-opt", "r=4", "--method-opt", "lora_dropout=0.1"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    ref, out = tmp_path / "reference", tmp_path / "interrupted"
    reference = subprocess.Popen([*args, "--output-dir", str(ref)], env=env, stderr=subprocess.PIPE, text=True)
    victim = subprocess.Popen([*args, "--output-dir", str(out)], env={**env, "DELTATUNE_STEP_DELAY": "0.4"},
                              stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (out / "checkpoints" / "step-000006").is_dir():
        assert victim.poll() is None, victim.stderr.read() if victim.stderr else ""
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    assert not (out / "summary.json").exists() and not (out / "adapter").exists()  # it really stopped half-way
    killed_at = max(_train_losses(out))
    assert 6 <= killed_at < 12

    resumed = subprocess.run([*args, "--output-dir", str(out), "--resume"], env=env, capture_output=True, text=True,
                             check=False)
    assert resumed.returncode == 0, resumed.stderr
    assert reference.wait() == 0, reference.stderr.read() if reference.stderr else ""

    expected, got = load_file(str(ref / "adapter" / "adapter_model.safetensors")), load_file(
        str(out / "adapter" / "adapter_model.safetensors"))
    assert expected.keys() == got.keys()
    assert any(t.abs().max() > 0 for k, t in expected.items() if "lora_B" in k)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-6, rtol=0)
    ref_losses, got_losses = _train_losses(ref), _train_losses(out)
    assert sorted(got_losses) == list(range(1, 13))
    for step, loss in ref_losses.items():
        assert abs(got_losses[step] - loss) <= 1e-6, step
    assert json.loads((out / "summary.json").read_text())["final"] == json.loads((ref / "summary.json").read_text())["final"]
