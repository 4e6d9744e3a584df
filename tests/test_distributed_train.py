"""``torchrun -m deltatune train`` on CPU (gloo, 2 processes): DDP and FSDP against a single process,
a killed rank, and ``--resume``.

The reference is a plain single-process run with the same global batch (per-rank batch x 2) and seed:
with dropout off, two ranks must produce the same adapter up to float rounding. The training file has
43 rows and the global micro-batch 6, so each epoch ends on a 1-row micro-batch: one rank's share is
empty there (the zero-weighted borrowed-row path), and 6 steps cross an epoch boundary (reshuffle).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _train_tiny import save_tiny, write_classification
from safetensors.torch import load_file

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _run(cmd: list[str], timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env or ENV, capture_output=True, text=True, timeout=timeout, check=False)


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def _losses(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if r["kind"] == "train"]
    assert len(steps) == len(set(steps)), "a step is logged twice"
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


def _assert_same_adapter(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], atol: float = 1e-5) -> None:
    assert got.keys() == expected.keys()
    assert any(t.abs().max() > 0 for k, t in expected.items() if "lora_B" in k)  # it trained
    for key, want in expected.items():
        assert got[key].numel() > 0 and got[key].shape == want.shape, key
        torch.testing.assert_close(got[key], want, atol=atol, rtol=0, msg=key)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Assets and the two reference runs (one process; DDP on two) shared by the tests below."""
    root = tmp_path_factory.mktemp("dist")
    model = save_tiny("bert", root / "bert", dropout=0.0)
    train = write_classification(root / "train.jsonl", 43, seed=1)
    val = write_classification(root / "val.jsonl", 12, seed=2)
    test = write_classification(root / "test.jsonl", 12, seed=3)
    common = ["train", "--model", str(model), "--data", str(train), "--validation-data", str(val), "--test-data",
              str(test), "--max-steps", "6", "--grad-accum", "2", "--threads", "1", "--quiet", "--lr", "1e-2",
              "--warmup-steps", "0", "--max-grad-norm", "0.05", "--method-opt", "r=4", "--method-opt", "lora_dropout=0.0"]
    paths = {"root": root, "model": model}
    single = _run([sys.executable, "-m", "deltatune", *common, "--batch-size", "6", "--output-dir", str(root / "one")])
    assert single.returncode == 0, single.stderr
    ddp = _run([*TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "deltatune", *common, "--batch-size", "3",
                "--output-dir", str(root / "ddp")])
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    paths.update(one=root / "one", ddp=root / "ddp")
    paths["args"] = common  # type: ignore[assignment]
    return paths


def test_ddp_on_two_ranks_matches_one_process_with_the_same_global_batch(runs: dict) -> None:
    _assert_same_adapter(_adapter(runs["ddp"]), _adapter(runs["one"]))
    one, two = _losses(runs["one"]), _losses(runs["ddp"])
    assert sorted(two) == list(range(1, 7))
    for step, loss in one.items():
        assert abs(two[step] - loss) <= 1e-5, step  # the logged loss is reduced over both ranks
    summary = json.loads((runs["ddp"] / "summary.json").read_text())
    assert summary["distributed"] == {"mode": "ddp", "world_size": 2, "per_rank_batch_size": 3, "grad_accum": 2,
                                      "effective_batch_size": 12, "lr": 1e-2}
    records = [json.loads(line) for line in (runs["ddp"] / "metrics.jsonl").read_text().splitlines()]
    assert [r["examples"] for r in records if r["kind"] == "train"][:4] == [12, 12, 12, 7]  # 43 = 3 x 12 + 7
    for split in ("validation", "test"):
        for key, value in json.loads((runs["one"] / "summary.json").read_text())["final"][split].items():
            assert abs(summary["final"][split][key] - value) <= 1e-5, (split, key)


def test_fsdp_adapter_is_whole_and_reloads_in_one_process_with_the_trained_outputs(runs: dict) -> None:
    from deltatune.commands.inference import run_evaluation

    out = runs["root"] / "fsdp"
    args = [*TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "deltatune", *runs["args"], "--batch-size", "3",
            "--fsdp", "--save-every", "3", "--keep-checkpoints", "2", "--output-dir", str(out)]
    done = _run(args)
    assert done.returncode == 0, done.stderr[-3000:]
    saved = _adapter(out)
    # Whole tensors (not one rank's slice), equal to the single-process training's result.
    _assert_same_adapter(saved, _adapter(runs["one"]))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["distributed"]["mode"] == "fsdp"
    # The sharded model's own final test metrics vs the saved adapter reloaded in this (single) process.
    again = run_evaluation(str(out), None, None, "test", None, 32, None)
    trained = summary["final"]["test"]
    assert abs(again["loss"] - trained["loss"]) <= 1e-5 and again["accuracy"] == trained["accuracy"]
    # Checkpoints hold whole tensors too; resuming FSDP from step 3 (sharded optimizer state put back)
    # ends with the same adapter.
    step3 = load_file(str(out / "checkpoints" / "step-000003" / "trainable.safetensors"))
    assert step3 and all(t.numel() > 0 for t in step3.values())
    shutil.rmtree(out / "checkpoints" / "step-000006")
    resumed = _run([a for a in args if a != "--quiet"] + ["--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "(step 3)" in resumed.stderr
    _assert_same_adapter(_adapter(out), saved, atol=1e-6)


def test_bf16_runs_on_two_ranks_and_stays_close_to_fp32(runs: dict) -> None:
    out = runs["root"] / "bf16"
    done = _run([*TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "deltatune", *runs["args"], "--batch-size",
                 "3", "--bf16", "--output-dir", str(out)])
    assert done.returncode == 0, done.stderr[-3000:]
    got, fp32 = _adapter(out), _adapter(runs["ddp"])
    assert all(t.dtype == torch.float32 for t in got.values())  # bf16 compute, fp32 master weights
    diff = max((got[k] - fp32[k]).abs().max().item() for k in fp32)
    assert 0 < diff < 0.05  # bf16 rounding changes the result a little, not wholesale


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def test_killed_rank_fails_the_job_quickly_and_resume_recovers(runs: dict) -> None:
    out, ref, port = runs["root"] / "killed", runs["root"] / "uninterrupted", _free_port()
    # Dropout on: each rank's own random stream must come back on resume.
    args = [*runs["args"], "--batch-size", "3", "--save-every", "2", "--dist-timeout", "30", "--method-opt",
            "lora_dropout=0.2"]
    reference = subprocess.Popen([*TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "deltatune", *args,
                                  "--output-dir", str(ref)], env=ENV, stderr=subprocess.PIPE, text=True)
    # Two "nodes" of one process each (static rendezvous), as on a cluster: node 0 cannot rely on its
    # own launcher noticing the death, only on the process group's error.
    nodes = [subprocess.Popen([*TORCHRUN, "--nnodes=2", f"--node-rank={n}", "--nproc-per-node=1",
                               "--master-addr=127.0.0.1", f"--master-port={port}", "-m", "deltatune", *args,
                               "--output-dir", str(out)],
                              env={**ENV, "DELTATUNE_STEP_DELAY": "0.5"}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for n in range(2)]
    deadline = time.time() + 90
    while not (out / "checkpoints" / "step-000002").is_dir():
        assert all(n.poll() is None for n in nodes), nodes[0].communicate()[1][-3000:]
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    workers = _children(nodes[1].pid)
    assert len(workers) == 1
    os.kill(workers[0], signal.SIGKILL)
    killed_at = time.time()
    try:
        err0 = nodes[0].communicate(timeout=60)[1]
    except subprocess.TimeoutExpired:
        for node in nodes:
            node.kill()
        pytest.fail("rank 0 still runs 60 s after rank 1 was killed: the job hangs")
    nodes[1].communicate(timeout=30)
    assert nodes[0].returncode != 0 and nodes[1].returncode != 0
    assert time.time() - killed_at < 40
    assert "another rank stopped answering" in err0 and "--resume" in err0, err0[-3000:]
    assert not (out / "adapter").exists() and max(_losses(out)) < 6  # it stopped half-way

    # A checkpoint of 2 ranks does not resume on 1 (the rows of each step would differ).
    wrong = _run([sys.executable, "-m", "deltatune", *args, "--output-dir", str(out), "--resume"])
    assert wrong.returncode != 0 and "2 rank(s)" in wrong.stderr, wrong.stderr[-2000:]

    resumed = _run([*TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "deltatune", *args, "--output-dir",
                    str(out), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert reference.wait(timeout=120) == 0, reference.stderr.read() if reference.stderr else ""
    _assert_same_adapter(_adapter(out), _adapter(ref), atol=1e-6)
    assert sorted(_losses(out)) == list(range(1, 7))
    for step, loss in _losses(ref).items():
        assert abs(_losses(out)[step] - loss) <= 1e-6, step
