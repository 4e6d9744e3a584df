"""torchao int8 weight-only quantisation: ``W ~ scale[:, None] * q``, ``q`` int8, one scale per output row.

torchao keeps the module an ``nn.Linear`` and swaps its weight for a tensor subclass (``Int8Tensor``
in torchao 0.18; ``AffineQuantizedTensor`` before), so layer methods wrap it like a float linear layer.
Re-quantising after a merge runs ``quantize_`` on the module again with the same config.
"""

from __future__ import annotations

import torch
from torch import nn


def _is_torchao_tensor(t: object) -> bool:
    return type(t).__module__.startswith("torchao")


def int8_weight_only_config() -> object:
    from torchao.quantization import Int8WeightOnlyConfig

    return Int8WeightOnlyConfig()


class TorchaoInt8Access:
    """An ``nn.Linear`` whose weight is a torchao int8 tensor subclass."""

    def owns(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Linear) and _is_torchao_tensor(module.weight)

    def kind(self, module: nn.Module) -> str:
        name = type(module.weight).__name__
        return "torchao-int8" if "Int8" in name else f"torchao-{name}"

    def read(self, module: nn.Module) -> torch.Tensor:
        return module.weight.dequantize().float()  # (out, in)

    def write(self, module: nn.Module, weight: torch.Tensor) -> None:
        from torchao.quantization import quantize_

        dtype = module.weight.dtype  # the logical (dequantised) dtype
        del module.weight
        module.weight = nn.Parameter(weight.detach().to(dtype), requires_grad=False)
        quantize_(module, int8_weight_only_config(), filter_fn=lambda m, _: m is module)
        module.weight.requires_grad_(False)

    def owns_param(self, param: torch.Tensor) -> bool:
        return _is_torchao_tensor(param)

    def param_tensors(self, param: torch.Tensor) -> list[torch.Tensor]:
        names, _ = param.__tensor_flatten__()
        return [getattr(param, name) for name in names]

    def param_numel(self, param: torch.Tensor) -> int:
        return param.numel()


def quantize_torchao_int8(model: nn.Module, skip: set[str]) -> list[str]:
    """Quantise every ``nn.Linear`` of ``model`` except the paths in ``skip``; returns the quantised paths."""
    from torchao.quantization import quantize_

    done: list[str] = []

    def wanted(module: nn.Module, path: str) -> bool:
        ok = type(module) is nn.Linear and path not in skip and not _is_torchao_tensor(module.weight)
        if ok:
            done.append(path)
        return ok

    quantize_(model, int8_weight_only_config(), filter_fn=wanted)
    for path in done:
        model.get_submodule(path).weight.requires_grad_(False)
    return done
