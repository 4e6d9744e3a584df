"""Resumable checkpoints under torchrun: every rank takes part, rank 0 writes the files.

The files are those of :mod:`deltatune.train.resume` (a single-process run's format), plus in
``state.json``:

* ``world_size``: a checkpoint resumes only with the same number of ranks, since the rows of step
  ``s`` depend on the global batch ``per-rank batch x ranks``;
* ``rank_rng``: every rank's torch generator state, so each rank's dropout continues where it stopped.

Under FSDP the trainable tensors and the optimizer state are sharded; they are all-gathered into
whole tensors before rank 0 writes them, and cut back into this rank's shards when loading. The
single-process writer and reader are reused unchanged through two small stand-ins that show them
whole tensors (:class:`_WholeModel`, :class:`_WholeOptimizer`).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ...errors import ConfigError
from .. import resume as checkpoints
from . import fsdp as fsdp_lib

if TYPE_CHECKING:
    from .runtime import Distributed


class _WholeModel:
    """What :mod:`.checkpoints` reads from a model: ``named_parameters()``, here whole (unsharded) tensors."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.params = {name: nn.Parameter(t.detach().clone()) for name, t in tensors.items()}

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return iter(self.params.items())


class _WholeOptimizer:
    """What :mod:`.checkpoints` reads from / writes to an optimizer, as whole tensors."""

    def __init__(self, state: dict[str, Any] | None = None) -> None:
        self.state = state

    def state_dict(self) -> dict[str, Any]:
        assert self.state is not None
        return self.state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = state


def _local_rng() -> dict[str, list[int]]:
    state = {"cpu": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def _set_local_rng(state: dict[str, list[int]]) -> None:
    torch.set_rng_state(torch.tensor(state["cpu"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


def save_checkpoint(
    dist: Distributed, root: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
    extra: dict[str, Any], keep: int,
) -> None:
    """Every rank calls this; rank 0 writes ``root/checkpoints/step-<step>`` (see the module docstring)."""
    if not dist.enabled:
        checkpoints.save_checkpoint(root, step, model, optimizer, scheduler, extra, keep)
        return
    extra = {**extra, "world_size": dist.world_size, "rank_rng": dist.gather_objects(_local_rng())}
    writer_model: Any = model
    writer_optimizer: Any = optimizer
    if dist.fsdp:
        with dist.guard("gathering the checkpoint"):
            writer_model = _WholeModel(fsdp_lib.full_trainable(model))
            writer_optimizer = _WholeOptimizer(fsdp_lib.full_optimizer_state(optimizer))
    if dist.is_main:
        checkpoints.save_checkpoint(root, step, writer_model, writer_optimizer, scheduler, extra, keep)


def newest_checkpoint(dist: Distributed, root: Path) -> Path | None:
    """The newest complete checkpoint, the same on every rank (the output folder must be shared)."""
    found = checkpoints.list_checkpoints(root)
    newest = found[-1] if found else None
    seen = dist.gather_objects(newest.name if newest else None)
    if len(set(seen)) > 1:
        raise ConfigError(
            f"The ranks see different checkpoints in {root / checkpoints.FOLDER} ({seen}); --output-dir must be on a "
            "file system every node shares (rank 0 writes, every rank reads on --resume)."
        )
    return newest


def load_checkpoint(
    dist: Distributed, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
) -> dict[str, Any]:
    """Restore this rank's part of the checkpoint at ``path``; returns its ``state.json``."""
    if not dist.fsdp:
        state = checkpoints.load_checkpoint(path, model, optimizer, scheduler)
    else:
        shapes = {n: torch.zeros(p.shape, dtype=p.dtype) for n, p in model.named_parameters() if p.requires_grad}
        whole_model, whole_optimizer = _WholeModel(shapes), _WholeOptimizer()
        state = checkpoints.load_checkpoint(path, whole_model, whole_optimizer, scheduler)  # type: ignore[arg-type]
        fsdp_lib.load_trainable(model, {n: p.detach() for n, p in whole_model.named_parameters()})
        assert whole_optimizer.state is not None
        optimizer.load_state_dict(fsdp_lib.shard_optimizer_state(optimizer, whole_optimizer.state))
    saved_world = int(state.get("world_size", 1))
    if saved_world != dist.world_size:
        raise ConfigError(
            f"Checkpoint {path} was written by a run with {saved_world} rank(s), this one has {dist.world_size}. The "
            "rows of each step depend on the global batch (per-rank batch x ranks), so resume with "
            f"{saved_world} rank(s) (torchrun --nproc_per_node/--nnodes), or start a new run."
        )
    rank_rng = state.get("rank_rng")
    if rank_rng:
        _set_local_rng(rank_rng[dist.rank])
    return state
