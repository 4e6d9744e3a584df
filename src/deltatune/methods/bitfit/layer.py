"""BitFit layer: a trained bias change ``db`` added to a module's output along its feature dimension.

    h = f(x) + db        f: the frozen module (its own bias included), db: (features,)

For linear layers and layer norms the features are the last dimension of the output; for
convolutions they are dimension 1. Merging adds ``db`` to the module's bias, unmerging subtracts it.
In a mixed-adapter batch each row adds its own gathered ``db`` (a zero row for rows of no adapter).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ...layer import DeltaLayer
from ...model_interface import is_linear_like, is_norm_layer
from ...targeting import unwrapped
from .config import BitFitConfig

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def has_trainable_bias_slot(module: nn.Module) -> bool:
    """A linear, convolution or normalisation layer whose ``bias`` is a 1-D parameter."""
    bias = getattr(module, "bias", None)
    shaped = isinstance(bias, nn.Parameter) and bias.dim() == 1
    return shaped and (is_linear_like(module) or isinstance(module, _CONVS) or is_norm_layer(module))


class BitFitLayer(DeltaLayer):
    """Adds ``bitfit_bias[name]`` (shape ``(features,)``) to the wrapped module's output."""

    adapter_attr_names = ("bitfit_bias",)
    method_name = "bitfit"

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.channel_dim = 1 if isinstance(self.get_base_layer(), _CONVS) else -1
        self.bitfit_bias = nn.ParameterDict()

    def add(self, name: str, config: BitFitConfig, path: str = "") -> None:
        bias = self.get_base_layer().bias
        delta = torch.zeros(bias.shape, device=bias.device, dtype=torch.float32)
        if not config.init_bitfit_weights:
            nn.init.normal_(delta, std=0.02)
        self.bitfit_bias[name] = nn.Parameter(delta)  # (features,)

    def _shaped(self, delta: torch.Tensor, ndim: int) -> torch.Tensor:
        """``delta`` broadcastable over an output with ``ndim`` dimensions."""
        if self.channel_dim == -1:
            return delta
        return delta.view(-1, *([1] * (ndim - 2)))  # (C, 1, ...)

    def add_delta(self, name: str, x: torch.Tensor, result: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        delta = self._shaped(self.bitfit_bias[name], result.dim())
        return result + delta.to(result.dtype)  # the (small) vector is cast, never the activation

    def add_routed_delta(self, names: list[str], slots: torch.Tensor, x: torch.Tensor, result: torch.Tensor,
                         *args: Any, **kwargs: Any) -> torch.Tensor:
        """Each row plus its own adapter's ``db``, gathered from the stacked biases."""
        table = self.stacked(names, self._bias_stack)  # (K+1, C)
        n, rest = result.shape[0], [1] * (result.dim() - 2)
        shape = (n, *rest, -1) if self.channel_dim == -1 else (n, -1, *rest)  # features last, or on dim 1
        return result + table[slots].view(shape).to(result.dtype)

    def _bias_stack(self, names: Sequence[str]) -> torch.Tensor:
        deltas = [self.bitfit_bias[n] for n in names]
        return torch.stack([*deltas, torch.zeros_like(deltas[0])])  # (K+1, C)

    def merge_one(self, name: str) -> None:
        bias = self.get_base_layer().bias
        bias.data += self.bitfit_bias[name].detach().to(bias.dtype)

    def unmerge_one(self, name: str) -> None:
        bias = self.get_base_layer().bias
        bias.data -= self.bitfit_bias[name].detach().to(bias.dtype)


def can_wrap(module: nn.Module, config: BitFitConfig, path: str) -> str | None:
    """``None`` when BitFit can wrap ``module``, else why not."""
    base = unwrapped(module)
    if has_trainable_bias_slot(base):
        return None
    if getattr(base, "bias", None) is None and (is_linear_like(base) or isinstance(base, _CONVS) or is_norm_layer(base)):
        return f"{type(base).__name__} has no bias (bias=False), so BitFit has nothing to train there"
    return (f"{type(base).__name__} is not a linear, convolution or normalisation layer with a bias; "
            "BitFit trains the biases of those")


__all__ = ["BitFitLayer", "can_wrap", "has_trainable_bias_slot"]
