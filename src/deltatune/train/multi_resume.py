"""Checkpoints and ``--resume`` of a joint run (:mod:`.multi_run`): one checkpoint per running job.

Every running job writes ``<its output_dir>/checkpoints/step-N`` at the same steps (``save_every`` is
shared), in the format of a solo run (:mod:`.resume`; under ``torchrun`` with the number of ranks and
every rank's random state, :mod:`.distributed.resume`). ``--resume`` continues from the newest step
that every running job has; jobs that had finished (``summary.json``) stay finished. Under
``torchrun`` every rank takes part (rank 0 writes) and all ranks must see the same checkpoints.
"""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from ..model import DeltaModel
from . import resume as checkpoints
from .distributed import resume as dist_checkpoints
from .distributed.runtime import Distributed
from .multi_loop import JobRun


def _common_step(runs: list[JobRun], dist: Distributed) -> int:
    """The newest checkpoint step every running job has (0 when none), the same on every rank."""
    steps = [{int(p.name.split("-")[1]) for p in checkpoints.list_checkpoints(jr.out)} for jr in runs]
    common = set.intersection(*steps) if steps else set()
    start = max(common) if common else 0
    seen = dist.gather_objects(start)
    if len(set(seen)) > 1:
        raise ConfigError(f"The ranks see different checkpoints of the jobs ({seen} by rank); every job's output_dir "
                          "must be on a file system every node shares (rank 0 writes, every rank reads on --resume).")
    return start


def resume_jobs(model: DeltaModel, runs: list[JobRun], dist: Distributed, say: Any) -> int:
    """Restore every running job from the newest common checkpoint; returns the step to start from."""
    running = [jr for jr in runs if not jr.finished]
    if dist.is_main:
        for jr in running:
            checkpoints.clean_partial(jr.out)
    start = _common_step(running, dist)
    names = list(model.active_adapters)
    for jr in running:
        assert jr.log is not None
        if not start:
            jr.log.path.write_text("", encoding="utf-8")
            continue
        model.set_adapter(jr.name)  # the job's tensors alone are "trainable" in its checkpoint
        state = dist_checkpoints.load_checkpoint(dist, jr.out / checkpoints.FOLDER / f"step-{start:06d}", model,
                                                 jr.optimizer, jr.scheduler)
        diff = jr.job.options.differences(type(jr.job.options)(**state["options"]))
        if diff:
            raise ConfigError(f"Job {jr.name!r}: --resume with options that differ from the checkpointed run: {diff}.")
        jr.log.truncate(start)
    model.set_adapter(names)
    if start:
        say(f"Resumed every running job from step {start}.")
    return start


def save_jobs(model: DeltaModel, runs: list[JobRun], done: int, elapsed: float, dist: Distributed) -> None:
    """The checkpoint of step ``done`` for every job of ``runs`` (every rank calls; rank 0 writes)."""
    names = list(model.active_adapters)
    for jr in runs:
        model.set_adapter(jr.name)
        extra = {"position": jr.schedule.position(done), "options": jr.job.options.to_dict(), "elapsed_s": elapsed}
        dist_checkpoints.save_checkpoint(dist, jr.out, done, model, jr.optimizer, jr.scheduler, extra,
                                         jr.job.options.keep_checkpoints)
    model.set_adapter(names)
