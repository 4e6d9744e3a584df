"""Finished jobs of a suite run, one JSON line each, so that an interrupted run resumes where it stopped.

``python -m bench --suite full --resume`` reuses every job whose exact settings (the job dict, which
names every hyper-parameter, learning rate included) already finished successfully in the previous
run; failed jobs run again. It assumes the code did not change in between. Without ``--resume`` the file is
started afresh, so a result is never reused across runs by accident.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any


def job_key(job: dict[str, Any]) -> str:
    """A job's identity: its settings as canonical JSON."""
    return json.dumps(job, sort_keys=True, default=str)


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
        """The saved result of ``job``, or ``None`` if it has not finished successfully."""
        return self._done.get(job_key(job))

    def put(self, job: dict[str, Any], result: dict[str, Any]) -> None:
        """Record ``result`` of ``job`` if it succeeded (flushed at once: a kill loses nothing finished)."""
        if not result.get("ok"):
            return
        key = job_key(job)
        with self._lock:
            self._done[key] = result
            with self.path.open("a") as fh:
                fh.write(json.dumps({"key": key, "result": result}, default=str) + "\n")
