"""Joint training of K LoRA jobs on one base vs the same jobs one after another vs K processes at once.

    python -m bench.joint_training                  # K = 4 and 8, MiniLM on TREC (320 rows), 10 steps of 16 rows per job
    python -m bench.joint_training --k 4 --steps 20

Every job is LoRA r=8 (query/value) + the classifier head, with its own learning rate (a sweep) and
seed 42. Each variant runs as ``deltatune train`` child processes, so wall time and peak memory
(``ru_maxrss`` of each child, read from its summary.json) are measured the same way:

* joint: one process, ``--config jobs.yaml`` (K adapters, one mixed batch per step);
* sequential: K processes one after another (wall: the sum; peak: the largest);
* parallel: K processes started together (wall: until the last ends; peak: the sum of the K peaks).

Also prints each job's final test accuracy jointly and alone (same seed and data order, dropout 0).
Writes ``bench/results/joint_training.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
LRS = [5e-4, 1e-3, 2e-3, 3e-3, 5e-3, 8e-3, 1e-2, 2e-2]


def _common(steps: int) -> dict[str, Any]:
    return {"model": "minilm", "data": "trec", "task": "seq_cls", "max_steps": steps, "batch_size": 16,
            "max_length": 64, "max_train_examples": 320, "max_eval_examples": 100, "seed": 42, "threads": 1,
            "quiet": True, "warmup_steps": 0,
            "method_options": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": ["query", "value"]}}


def _cmd(config: Path) -> list[str]:
    return [sys.executable, "-m", "deltatune", "train", "--config", str(config)]


def _write(path: Path, values: dict[str, Any]) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(values), encoding="utf-8")
    return path


def _summary(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "summary.json").read_text(encoding="utf-8"))


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    src = str(Path(__file__).resolve().parent.parent / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_k(k: int, steps: int, root: Path) -> dict[str, Any]:
    common = _common(steps)
    root.mkdir(parents=True, exist_ok=True)
    solo_cfgs = []
    for j in range(k):
        solo_cfgs.append(_write(root / f"solo{j}.yaml", {**common, "lr": LRS[j % len(LRS)],
                                                          "output_dir": str(root / "seq" / f"job{j}")}))
    t0 = time.perf_counter()
    for cfg in solo_cfgs:
        subprocess.run(_cmd(cfg), check=True, env=_env(), stdout=subprocess.DEVNULL)
    seq_wall = time.perf_counter() - t0
    seq = [_summary(root / "seq" / f"job{j}") for j in range(k)]

    par_cfgs = [_write(root / f"par{j}.yaml", {**common, "lr": LRS[j % len(LRS)],
                                                "output_dir": str(root / "par" / f"job{j}")}) for j in range(k)]
    t0 = time.perf_counter()
    procs = [subprocess.Popen(_cmd(cfg), env=_env(), stdout=subprocess.DEVNULL) for cfg in par_cfgs]
    if any(p.wait() != 0 for p in procs):
        raise RuntimeError("a parallel run failed")
    par_wall = time.perf_counter() - t0
    par = [_summary(root / "par" / f"job{j}") for j in range(k)]

    jobs = {**common, "output_dir": str(root / "joint"),
            "jobs": [{"name": f"job{j}", "lr": LRS[j % len(LRS)]} for j in range(k)]}
    t0 = time.perf_counter()
    subprocess.run(_cmd(_write(root / "joint.yaml", jobs)), check=True, env=_env(), stdout=subprocess.DEVNULL)
    joint_wall = time.perf_counter() - t0
    joint = [_summary(root / "joint" / f"job{j}") for j in range(k)]
    acc = [(s["final"]["test"]["accuracy"], j["final"]["test"]["accuracy"]) for s, j in zip(seq, joint)]
    return {
        "k": k, "steps": steps,
        "wall_s": {"joint": joint_wall, "sequential": seq_wall, "parallel": par_wall},
        "peak_bytes": {"joint": max(s["peak_rss_bytes"] for s in joint),
                       "sequential": max(s["peak_rss_bytes"] for s in seq),
                       "parallel": sum(s["peak_rss_bytes"] for s in par)},
        "test_accuracy_solo_vs_joint": acc,
    }


def render(results: list[dict[str, Any]]) -> str:
    lines = ["# Joint training of K LoRA jobs (MiniLM, TREC, LoRA r=8 query/value + head, batch 16 per job)", "",
             ("| K | steps/job | joint wall s | sequential wall s | K processes wall s | joint / sequential wall | "
              "joint peak MiB | K processes peak MiB (sum) | joint / K-processes peak | max |acc joint - solo| |"),
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        w, m = r["wall_s"], r["peak_bytes"]
        gap = max(abs(a - b) for a, b in r["test_accuracy_solo_vs_joint"])
        lines.append(f"| {r['k']} | {r['steps']} | {w['joint']:.1f} | {w['sequential']:.1f} | {w['parallel']:.1f} | "
                     f"{w['joint'] / w['sequential']:.2f} | {m['joint'] / 2**20:.0f} | {m['parallel'] / 2**20:.0f} | "
                     f"{m['joint'] / m['parallel']:.2f} | {gap:.4f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--k", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in args.k:
            results.append(run_k(k, args.steps, Path(tmp) / f"k{k}"))
            print(render(results), flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "joint_training.md").write_text(render(results) + "\n", encoding="utf-8")
    (RESULTS / "joint_training.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
