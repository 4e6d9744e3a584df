"""Measuring instruments: peak memory above a baseline, step timing, machine and version records.

Peak memory. Linux keeps a process's peak resident set size in ``/proc/self/status`` (``VmHWM``).
Writing ``5`` to ``/proc/self/clear_refs`` resets that peak to the current RSS (kernel doc
``Documentation/filesystems/proc.rst``, "clear_refs"). So a training run measures

    peak_above_baseline = VmHWM(after training) - VmRSS(baseline)

where the baseline is taken after the model, the method and the batches are loaded, and the peak is
reset right then. Loading spikes (``from_pretrained`` briefly holds two copies of the weights) are thus
excluded, and everything training adds (gradients, optimizer state, activations, autograd buffers) is
counted. Two things would otherwise blur the baseline, and :meth:`PeakMemory.start` removes both:

* transformers may leave weights memory-mapped from the safetensors file, so their pages become
  resident only when first read. Whichever code reads them first (a library's fingerprint, or the
  first forward pass) would move them into or out of the measured window. We read every byte of every
  parameter and buffer before the baseline, so the whole model is resident for every configuration.
* memory freed before the baseline but kept by ``malloc`` would be reused by training unseen. We
  call glibc's ``malloc_trim(0)`` after a GC pass, so the baseline holds live memory only.

The memory runs also set ``MALLOC_MMAP_THRESHOLD_`` (see :mod:`bench.runner`), which fixes glibc's
threshold for serving large blocks by ``mmap`` (otherwise it rises after every large free, and heap
fragmentation adds tens of MB of noise that depends on the order of batch shapes). RSS then tracks
live tensors closely. Where ``clear_refs`` is not writable we fall back to the unreset ``VmHWM`` and
say so in the record (``mem_method``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import platform
import statistics
import subprocess
from pathlib import Path
from typing import Any

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kb(field: str) -> int | None:
    """One ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``), or ``None`` off Linux."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def torch_no_grad() -> Any:
    import torch

    return torch.no_grad()


def _malloc_trim() -> None:
    """Give free heap memory back to the OS (glibc only; a no-op elsewhere)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        if libc is not None and hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)
    except OSError:
        pass


class PeakMemory:
    """Peak RSS above a baseline: ``start()`` after loading, ``peak_mb()`` after training."""

    def __init__(self) -> None:
        self.baseline_kb: int | None = None
        self.method = "none"

    def start(self, model: Any = None) -> None:
        """Take the baseline now (after loading ``model``, whose pages are made resident first)."""
        if model is not None:
            with torch_no_grad():
                for tensor in [*model.parameters(), *model.buffers()]:
                    tensor.detach().sum()  # touches every page (memory-mapped weights become resident)
        gc.collect()
        _malloc_trim()
        self.baseline_kb = _status_kb("VmRSS")
        try:
            _CLEAR_REFS.write_text("5")
            self.method = "clear_refs+VmHWM"
        except OSError:
            self.method = "VmHWM (peak not reset: includes loading)"

    def peak_mb(self) -> float | None:
        hwm = _status_kb("VmHWM")
        if hwm is None or self.baseline_kb is None:
            return None
        return (hwm - self.baseline_kb) / 1024.0

    def baseline_mb(self) -> float | None:
        return None if self.baseline_kb is None else self.baseline_kb / 1024.0


def median_after_warmup(times: list[float], warmup: int) -> float | None:
    """Median of ``times[warmup:]`` (seconds), or ``None`` when too few steps ran."""
    kept = times[warmup:]
    return statistics.median(kept) if kept else None


def folder_bytes(folder: str | os.PathLike[str]) -> int:
    """Total size of the files under ``folder`` (what a user would copy)."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_commit(repo: Path) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10, check=False)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_info(repo: Path) -> dict[str, Any]:
    """Machine, library versions and commit, recorded with every result file."""
    import peft
    import torch
    import transformers

    import deltatune

    mem_kb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    except OSError:
        pass
    return {
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": 2,
        "memory_gb": round(mem_kb / 1024**2, 1) if mem_kb else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "deltatune": deltatune.__version__,
        "commit": _git_commit(repo),
    }
