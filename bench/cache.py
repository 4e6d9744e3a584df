"""Finished jobs of a suite run, one JSON line each, so that an interrupted run resumes where it stopped.

``python -m bench --suite full --resume`` reuses every job whose exact settings (the job dict, which
names every hyper-parameter, learning rate included) already finished successfully in the previous
run; failed jobs run again. It assumes the code did not change in between. Without ``--resume`` the file is
started afresh, so a result is never reused across runs by accident.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any


def job_key(job: dict[str, Any]) -> str:
    """A job's identity: its settings as canonical JSON."""
    return json.dumps(job, sort_keys=True, default=str)


#: How the ``reused_from`` mark of a result a narrower run kept in ``full.json`` starts (bench/run.py ``_carried``):
#: the only record of that job, unlike the copies other marks name (``borrow_full``), so its time still counts.
KEPT_ROW = "kept from an earlier run"
#: A result a fresh run kept from the committed results file, not run by it (see :func:`part_cache`).
KEPT = "kept_from"


class JobCache:
    """Append-only record of successful job results at ``path`` (JSON lines: ``{"key", "result"}``)."""

    def __init__(self, path: Path, *, resume: bool) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._done: dict[str, dict[str, Any]] = {}
        if resume and path.exists():
            for line in path.read_text().splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by a kill: that job simply runs again
                    continue
                self._done[entry["key"]] = entry["result"]
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("")

    def get(self, job: dict[str, Any]) -> dict[str, Any] | None:
        """The saved result of ``job``, or ``None`` if it has not finished successfully in this run (a result kept
        from the committed file by a fresh run, see :func:`part_cache`, does not count: the job runs again)."""
        found = self._done.get(job_key(job))
        return None if found is None or found.get(KEPT) else found

    def put(self, job: dict[str, Any], result: dict[str, Any]) -> None:
        """Record ``result`` of ``job`` if it succeeded (flushed at once: a kill loses nothing finished)."""
        if not result.get("ok"):
            return
        key = job_key(job)
        with self._lock:
            self._done[key] = result
            with self.path.open("a") as fh:
                fh.write(json.dumps({"key": key, "result": result}, default=str) + "\n")


def finished_jobs(path: Path) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Every (job, result) pair recorded in the cache file at ``path``, in the order they finished."""
    if not path.exists():
        return []
    entries = []
    for line in path.read_text().splitlines():
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
    latest = {e["key"]: e["result"] for e in entries}  # a later entry of a job supersedes an earlier one
    return [(json.loads(key), result) for key, result in latest.items()]


def absorb_results(path: Path, saved: Path, read: Callable[[Path], list[dict[str, Any]]] | None = None) -> None:
    """Rewrite the cache file at ``path`` (created if missing) as its own results plus those held by the
    results file ``saved``, so a report rendered from the cache (``--report-only``) holds every saved result.
    A job in both keeps the saved result; a job only the cache holds stays. Without this, a cache older than
    the results file (a developer's box after a pull) rewrote the file from the older cache and dropped what
    the cache lacked."""
    if not saved.exists():
        return
    results = read(saved) if read else results_in(json.loads(saved.read_text()))
    merged = {job_key(job): result for job, result in finished_jobs(path)}
    merged.update((job_key(r["job"]), r) for r in results)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"key": key, "result": r}, default=str) + "\n" for key, r in merged.items()))


def results_in(saved: Any, *, ok_only: bool = True) -> list[dict[str, Any]]:
    """The successful (``ok_only=False``: all) job results held by a committed results JSON.

    Two layouts exist: a part's list of ``{"job", "result"}`` entries (recipe, low data, forgetting), and a
    suite's dict whose measurement keys hold results that carry their own ``"job"`` (``full.json``).
    """
    if isinstance(saved, list):
        out = [e["result"] if "job" in e["result"] else e["result"] | {"job": e["job"]} for e in saved]
    else:
        out = []
        for value in saved.values():
            for res in value if isinstance(value, list) else [value]:
                if isinstance(res, dict) and isinstance(res.get("job"), dict):
                    out.append(res)
    return [r for r in out if r.get("ok") or not ok_only]


def part_cache(path: Path, committed: Path | None, *, resume: bool,
               read: Callable[[Path], list[dict[str, Any]]] | None = None) -> JobCache:
    """A part's job cache. With ``resume``, a missing cache file is first seeded from the part's committed
    results file (a fresh checkout resumes from what was published): ``read(committed)`` gives its results,
    each with its ``"job"`` (default: :func:`results_in` of the JSON). Without ``resume`` every job runs again,
    but the committed results stay in the cache marked :data:`KEPT` (a run that leaves jobs out, such as
    ``full`` leaving the recipe search to ``bench.recipe search``, then rewrites the part's report with those
    results still in it); a job this run finishes supersedes its kept result."""
    seeded = committed is not None and committed.exists() and (not resume or not path.exists())
    done = (read(committed) if read else results_in(json.loads(committed.read_text()))) if seeded else []
    if not resume:
        stamp = f"{committed.name if committed else ''}, before this run"
        done = [r if r.get(KEPT) else r | {KEPT: stamp} for r in done]
    else:  # a published result counts when resuming, even one its own run had kept from an earlier one
        done = [{k: v for k, v in r.items() if k != KEPT} for r in done]
    if seeded:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps({"key": job_key(r["job"]), "result": r}, default=str) + "\n" for r in done))
    return JobCache(path, resume=resume or seeded)
