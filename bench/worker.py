"""Subprocess entry: ``python -m bench.worker '<job json>'`` runs one job and prints one JSON line.

The line starts with ``BENCH_RESULT `` so the parent can find it among library warnings.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from typing import Any

RESULT_PREFIX = "BENCH_RESULT "


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Dispatch on ``job["kind"]``: ``classify``, ``memory``, ``timing``, ``forgetting``, ``quantized``, ``inference`` or ``combination``."""
    if job["kind"] == "classify":
        from bench import classify

        return classify.run(job)
    if job["kind"] in ("memory", "timing"):
        from bench import cost

        return cost.run_memory(job) if job["kind"] == "memory" else cost.run_timing(job)
    if job["kind"] == "forgetting":
        from bench import forgetting

        return forgetting.run(job)
    if job["kind"] == "quantized":
        from bench import quantized

        return quantized.run(job)
    if job["kind"] == "inference":
        from bench import inference

        return inference.run(job)
    if job["kind"] == "combination":
        from bench import combination

        return combination.run(job["steps"], job["n_eval"])
    raise ValueError(f"unknown job kind {job['kind']!r}")


def main(argv: list[str]) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    job = json.loads(argv[0])
    start = time.perf_counter()
    try:
        out: dict[str, Any] = {"ok": True, **run_job(job)}
    except Exception as exc:  # noqa: BLE001 - reported as a failed configuration, the suite goes on
        out = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    out["wall_seconds"] = time.perf_counter() - start
    print(RESULT_PREFIX + json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
