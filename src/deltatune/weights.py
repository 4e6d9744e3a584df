"""Read and write the weight of a wrapped base module, whether it is stored in float or quantized.

Layer methods never touch a quantized weight's storage. Merging asks this module to

    W <- requantize(dequantize(W) + delta)          (quantized backends)
    W <- W + delta                                  (float weights, in place, in W's dtype)

and each quantization backend (bitsandbytes 4/8-bit, torchao int8, see :mod:`deltatune.quant`) plugs
in one :class:`WeightAccess` through :func:`register_weight_access`. A module no backend claims is a
float module and is handled here directly. Logical shapes are always ``(out, in)`` for linear layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn


class WeightAccess(Protocol):
    """How one quantization backend stores a linear layer's weight."""

    def owns(self, module: nn.Module) -> bool:
        """Whether ``module`` is a linear layer of this backend."""

    def kind(self, module: nn.Module) -> str:
        """The quantization of ``module`` (``"nf4"``, ``"int8"``, ``"torchao-int8"`` ...)."""

    def read(self, module: nn.Module) -> torch.Tensor:
        """The dequantized weight, float32 ``(out, in)``."""

    def write(self, module: nn.Module, weight: torch.Tensor) -> None:
        """Quantize ``weight`` (float ``(out, in)``) and make it the module's weight."""

    def owns_param(self, param: torch.Tensor) -> bool:
        """Whether ``param`` is a quantized tensor of this backend."""

    def param_tensors(self, param: torch.Tensor) -> list[torch.Tensor]:
        """The plain tensors that hold ``param``'s data (packed values, scales): what a fingerprint hashes."""

    def param_numel(self, param: torch.Tensor) -> int:
        """The number of values ``param`` stands for (the dequantized weight's size)."""


_ACCESSORS: list[WeightAccess] = []


def register_weight_access(access: WeightAccess) -> None:
    """Make a quantization backend known to merging, fingerprints and :func:`quantization`."""
    _ACCESSORS.append(access)


def _access(module: nn.Module) -> WeightAccess | None:
    for access in _ACCESSORS:
        if access.owns(module):
            return access
    return None


def _param_access(param: torch.Tensor) -> WeightAccess | None:
    for access in _ACCESSORS:
        if access.owns_param(param):
            return access
    return None


def quantization(module: nn.Module) -> str | None:
    """The quantization of ``module``'s weight (``"nf4"``, ...), ``None`` for a float module."""
    access = _access(module)
    return access.kind(module) if access else None


def read_weight(module: nn.Module) -> torch.Tensor:
    """``module``'s weight as a float tensor: the parameter itself for float modules, a dequantized
    float32 copy ``(out, in)`` for quantized ones. Treat it as read-only."""
    access = _access(module)
    return access.read(module) if access else module.weight


def write_weight(module: nn.Module, value: torch.Tensor) -> None:
    """Make ``value`` (float, same logical shape) ``module``'s weight (requantized if need be)."""
    access = _access(module)
    with torch.no_grad():
        if access:
            access.write(module, value.float())
        else:
            module.weight.data.copy_(value.to(module.weight.dtype))


def add_to_weight(module: nn.Module, delta: torch.Tensor) -> None:
    """``W <- W + delta``; float weights are updated in place in their own dtype."""
    access = _access(module)
    with torch.no_grad():
        if access:
            access.write(module, access.read(module) + delta.float())
        else:
            weight = module.weight
            weight.data += delta.to(weight.dtype)


@dataclass
class WeightSnapshot:
    """What :func:`restore_weight` needs to put a module's weight and bias back exactly."""

    weight: Any  # a float clone, the quantized weight object, or what the backend's ``snapshot`` returns
    bias: torch.Tensor | None
    quantized: bool


def snapshot_weight(module: nn.Module) -> WeightSnapshot:
    """Keep ``module``'s weight and bias aside. A quantized backend replaces the weight object on
    every write, so the old object is kept as it is (no copy); float weights are cloned."""
    bias = getattr(module, "bias", None)
    kept_bias = None if bias is None else bias.detach().clone()
    access = _access(module)
    if access:
        keep = getattr(access, "snapshot", None)  # backends whose weight carries state elsewhere keep that too
        return WeightSnapshot(keep(module) if keep else module.weight, kept_bias, True)
    return WeightSnapshot(module.weight.detach().clone(), kept_bias, False)


def restore_weight(module: nn.Module, snapshot: WeightSnapshot) -> None:
    """Put back what :func:`snapshot_weight` kept, bit for bit (also the bias, which IA3 rescales)."""
    with torch.no_grad():
        if snapshot.quantized:
            restore = getattr(_access(module), "restore", None)
            if restore is not None:
                restore(module, snapshot.weight)
            else:
                module.weight = snapshot.weight
        else:
            module.weight.data.copy_(snapshot.weight)
        if snapshot.bias is not None:
            module.bias.data.copy_(snapshot.bias)


def param_tensors(param: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors holding ``param``'s values (itself, for a float parameter)."""
    access = _param_access(param)
    return access.param_tensors(param) if access else [param]


def param_numel(param: torch.Tensor) -> int:
    """How many values ``param`` stands for (a packed 4-bit tensor holds two per byte)."""
    access = _param_access(param)
    return access.param_numel(param) if access else param.numel()


def model_quantization(model: nn.Module) -> str | None:
    """The quantizations used by ``model``'s modules, e.g. ``"nf4"`` or ``"int8+nf4"``; ``None`` if none."""
    kinds = sorted({k for k in (quantization(m) for m in model.modules()) if k})
    return "+".join(kinds) if kinds else None
