"""DoRA: weight-decomposed low-rank adaptation (Liu et al., arXiv 2402.09353).

The adapted weight is split into a direction and a trained magnitude ``m`` (one per output row):

    W' = m * (W + s B A) / ||W + s B A||_row

and, with the row norm treated as a constant in the backward pass (the paper's section 4.3),

    h = (m / n) * (W x + s B A x) + bias,   n = ||W + s B A||_row (detached).

``m`` starts at ``n``, so the adapted model starts equal to ``W x + s B A x``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ...weights import write_weight


class DoraMixin:
    """Adds the magnitude vector and DoRA's forward/merge to a linear LoRA layer."""

    lora_magnitude_vector: nn.ParameterDict
    row_major_delta: Callable[[str], torch.Tensor]  # s * B A as (out, in), from LoraLinear

    def add_magnitude(self, name: str) -> None:
        with torch.no_grad():
            norm = self._adapted_row_norm(name)
        self.lora_magnitude_vector[name] = nn.Parameter(norm.clone())  # (out,)

    def _adapted_row_norm(self, name: str) -> torch.Tensor:
        """``||W + s B A||`` over the input dimension, one value per output row: ``(out,)``."""
        return (self.base_weight().float() + self.row_major_delta(name)).norm(p=2, dim=1)

    def _dora_factor(self, name: str) -> torch.Tensor:
        """``m / ||W + s B A||_row`` with the norm detached (section 4.3): ``(out,)``."""
        return self.lora_magnitude_vector[name] / self._adapted_row_norm(name).detach()

    def dora_add_delta(self, name: str, result: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
        """``result`` is ``W x + bias``, ``update`` is ``s B A dropout(x)``."""
        scale = self._dora_factor(name)  # (out,)
        bias = self.get_base_layer().bias
        base_only = result if bias is None else result - bias
        out = result + (scale - 1) * base_only + scale * update  # = scale * (W x + s B A x) + bias
        return out.to(result.dtype)

    def merge_one(self, name: str) -> None:
        if name not in self.lora_magnitude_vector:
            return super().merge_one(name)
        with torch.no_grad():
            scale = self.lora_magnitude_vector[name] / self._adapted_row_norm(name)  # (out,)
            self._dora_merge_scale = getattr(self, "_dora_merge_scale", {})
            self._dora_merge_scale[name] = scale
            merged = scale[:, None] * (self.base_weight().float() + self.row_major_delta(name))
            write_weight(self.get_base_layer(), merged.T if self.fan_in_fan_out else merged)

    def unmerge_one(self, name: str) -> None:
        if name not in self.lora_magnitude_vector:
            return super().unmerge_one(name)
        with torch.no_grad():
            scale = self._dora_merge_scale.pop(name)
            original = self.base_weight().float() / scale[:, None] - self.row_major_delta(name)
            write_weight(self.get_base_layer(), original.T if self.fan_in_fan_out else original)

