"""Run jobs as subprocesses (``python -m bench.worker``), a few at a time, and collect their JSON lines."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from bench.aggregate import NOT_RUN
from bench.cache import JobCache
from bench.worker import RESULT_PREFIX

REPO = Path(__file__).resolve().parent.parent
#: Jobs that measure peak memory run with glibc's mmap threshold fixed (see :mod:`bench.measure`).
MEMORY_KINDS = ("memory", "forgetting")
MMAP_THRESHOLD = "131072"


def run_one(job: dict[str, Any], *, threads: int = 2, timeout: float = 3600) -> dict[str, Any]:
    """Run ``job`` in a fresh Python process with ``threads`` torch threads; return its result dict."""
    env = dict(os.environ, BENCH_THREADS=str(threads), HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error",
               OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    if job.get("kind") in MEMORY_KINDS:
        env["MALLOC_MMAP_THRESHOLD_"] = MMAP_THRESHOLD
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "bench.worker", json.dumps(job)], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout:.0f} s", "job": job}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            result = json.loads(line[len(RESULT_PREFIX):])
            break
    else:
        result = {"ok": False, "error": f"worker exited {proc.returncode} without a result", "stderr": proc.stderr[-3000:]}
    result["job"] = job
    result["process_seconds"] = time.perf_counter() - start
    return result


def run_many(jobs: list[dict[str, Any]], *, workers: int = 1, threads: int = 2,
             progress: Callable[[str], None] = print, cache: JobCache | None = None,
             timeout: float = 3600, cached_only: bool = False,
             slots: threading.Semaphore | None = None) -> list[dict[str, Any]]:
    """Run ``jobs`` with ``workers`` processes at once (each with ``threads`` threads); results in job order.

    ``timeout``: seconds before a job's process is killed (reported as failed).
    With a ``cache``, jobs it already holds are not run again and each new success is recorded;
    ``cached_only`` runs nothing and marks the jobs the cache lacks as not run. ``slots``: a semaphore shared
    by several concurrent ``run_many`` calls (the parts of one suite), held while a job's process runs, so
    that no more processes run at once than it allows.
    """
    def describe(job: dict[str, Any]) -> str:
        keys = ("kind", "method", "lib", "task", "n_train", "seeds")
        return " ".join(f"{job[k]}" for k in keys if k in job)

    def one(index: int) -> dict[str, Any]:
        saved = cache.get(jobs[index]) if cache else None
        if saved is not None:
            progress(f"  [{index + 1}/{len(jobs)}] {describe(jobs[index])}: reused from the interrupted run")
            return saved | {"reused": True}
        if cached_only:
            return {"ok": False, "error": NOT_RUN, "job": jobs[index]}
        with slots or nullcontext():
            result = run_one(jobs[index], threads=threads, timeout=timeout)
        if cache:
            cache.put(jobs[index], result)
        status = "ok" if result.get("ok") else f"FAILED: {result.get('error')}"
        progress(f"  [{index + 1}/{len(jobs)}] {describe(jobs[index])}: {result['process_seconds']:.0f} s, {status}")
        return result

    if workers <= 1:
        return [one(i) for i in range(len(jobs))]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, range(len(jobs))))
