"""Fully-sharded data parallel (FSDP2, ``torch.distributed.fsdp.fully_shard``) for a ``DeltaModel``.

Every parameter, frozen base and trainable delta alike, becomes a ``DTensor`` sharded along dim 0
across the ranks (Zhao et al., "PyTorch FSDP", arXiv 2304.11277). Before a block computes, its
parameters are all-gathered; afterwards they are freed again, so each rank holds ``1/W`` of the base
model between blocks. Only parameters with ``requires_grad`` get gradients, so the frozen base costs no
gradient memory; the delta's gradients are reduce-scattered (averaged) across ranks.

Sharding units: every module whose class the model lists in ``_no_split_modules`` (transformers' own
list of transformer blocks) becomes its own unit, and the whole ``DeltaModel`` the root unit.

Saving: a sharded parameter's local tensor is only a slice (empty on some ranks), so writing
``param`` would save a partial or empty adapter. :func:`full_tensor` all-gathers each tensor first;
:func:`verify_saved` checks what reached the file against the gathered values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...errors import CheckpointError


def _dtensor_cls() -> type:
    from torch.distributed.tensor import DTensor

    return DTensor


def shard_units(model: nn.Module) -> list[nn.Module]:
    """Modules to shard on their own, innermost first (transformer blocks from ``_no_split_modules``)."""
    names: set[str] = set()
    for module in model.modules():
        names |= set(getattr(module, "_no_split_modules", None) or [])
    found = [m for m in model.modules() if m is not model and type(m).__name__ in names]
    return list(reversed(found))  # children before parents: fully_shard wants inner units first


def fully_shard_model(model: nn.Module, device_type: str, world_size: int, bf16: bool) -> nn.Module:
    """Shard ``model`` in place (its class becomes ``FSDP<class>``); returns it for convenience.

    With ``bf16`` every unit computes in bfloat16 (parameters all-gathered as bf16) and reduces
    gradients in float32; the sharded parameters and the optimizer state stay float32.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device_type, (world_size,))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    for unit in shard_units(model):
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def is_sharded(tensor: torch.Tensor) -> bool:
    return isinstance(tensor, _dtensor_cls())


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor on the CPU. A collective for a ``DTensor``: every rank must call it, in the same order."""
    if is_sharded(tensor):
        tensor = tensor.full_tensor()  # type: ignore[attr-defined]
    return tensor.detach().cpu()


def local_part(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's shard of ``full`` laid out as the ``DTensor`` ``like`` (no communication: every rank holds ``full``)."""
    from torch.distributed.tensor import distribute_tensor

    full = full.to(device=like.device, dtype=like.dtype)
    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)  # type: ignore[attr-defined]


def full_trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{parameter name: whole tensor}`` of every trainable parameter (collective under FSDP)."""
    return {name: full_tensor(p) for name, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def load_trainable(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy whole tensors into the (possibly sharded) trainable parameters of the same names."""
    for name, param in model.named_parameters():
        if param.requires_grad and name in tensors:
            source = local_part(tensors[name], param) if is_sharded(param) else tensors[name]
            param.copy_(source)


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` with every sharded state tensor gathered (collective under FSDP)."""
    state = optimizer.state_dict()
    gathered = {index: {k: full_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in values.items()}
                for index, values in state["state"].items()}
    return {"state": gathered, "param_groups": state["param_groups"]}


def shard_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`full_optimizer_state`: whole state tensors laid out like their parameters."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    out: dict[int, dict[str, Any]] = {}
    for index, values in state["state"].items():
        param = params[int(index)]
        out[int(index)] = {
            k: local_part(v, param) if isinstance(v, torch.Tensor) and is_sharded(param) and v.dim() > 0 else v
            for k, v in values.items()
        }
    return {"state": out, "param_groups": state["param_groups"]}


def verify_saved(file: Path, expected: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]]) -> None:
    """Raise unless ``file`` holds exactly ``expected``: same keys, full shapes, non-empty (unless the
    parameter is), equal values.

    Guards against the failure where a sharded save writes each rank's (possibly empty) local slice.
    """
    from safetensors.torch import load_file

    saved = load_file(str(file))
    problems: list[str] = []
    if set(saved) != set(expected):
        problems.append(f"keys differ ({len(set(saved) ^ set(expected))} missing or extra)")
    if not saved:
        problems.append("no tensors at all")
    for key in sorted(set(saved) & set(expected)):
        got, want = saved[key], expected[key]
        # empty only where the parameter is (an AdaLoRA layer pruned to rank 0 saves (0, in) tensors, as peft does)
        if tuple(got.shape) != tuple(shapes[key]) or (got.numel() == 0 and want.numel() != 0):
            problems.append(f"{key} has shape {tuple(got.shape)}, expected {tuple(shapes[key])}")
        elif not torch.equal(got, want.to(got.dtype)):
            problems.append(f"{key} differs from the gathered parameter")
    if problems:
        raise CheckpointError(
            f"The adapter written to {file} is incomplete: {'; '.join(problems[:3])}. This is a bug in sharded "
            "saving; please report it (the trained tensors are still in the last checkpoint)."
        )
