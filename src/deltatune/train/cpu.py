"""How many CPU threads torch uses for a command: the cores not busy with other work, unless told.

torch's OpenMP threads wait on each other at every operation; on a machine already busy with other
processes, two threads on two cores ran a MiniLM training step 3-5x *slower* than one thread (measured
here: 0.46-0.82 s vs 0.14-0.18 s at load 5.5), and 10x slower at load 10. So ``train``, ``eval`` and
``demo`` use only the cores that are free, unless ``--threads`` or ``OMP_NUM_THREADS`` (which torchrun
sets for its ranks) says otherwise.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch


def free_cores() -> int:
    """CPU cores not busy with other work: ``cpu_count - round(1-minute load average)``, at least 1."""
    cpus = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):  # not available on this platform
        return cpus
    return max(1, min(cpus, cpus - int(load + 0.5)))


def default_threads() -> int | None:
    """:func:`free_cores`, or ``None`` (torch's own choice) when ``OMP_NUM_THREADS`` is set."""
    return None if os.environ.get("OMP_NUM_THREADS") else free_cores()


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[int]:
    """Run the block with ``threads`` torch threads (``None``: :func:`default_threads`); the process gets its
    own setting back afterwards (a library call leaves it as it found it). Yields the number in use."""
    before = torch.get_num_threads()
    wanted = threads or default_threads()
    if wanted:
        torch.set_num_threads(wanted)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
