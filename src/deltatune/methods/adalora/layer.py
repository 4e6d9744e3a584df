"""AdaLoRA layer on linear layers (``nn.Linear``, transformers' ``Conv1D``): LoRA in SVD form.

    h = W x + s / (r0 + 1e-5) * P ((Lambda * Q) x),   Q: (r, in)  "lora_A",  Lambda: (r, 1)  "lora_E",
                                                      P: (out, r) "lora_B",  s = alpha (r0 if alpha <= 0)

``r0`` (``ranknum``) is the starting rank ``init_r``; pruning zeroes entries of ``Lambda`` (the
triplet ``P[:, i], Lambda[i], Q[i]`` stops acting) and records which are kept. A saved adapter holds
the kept triplets only; a layer built from a config with a ``rank_pattern`` starts at its kept rank
(``r0`` unchanged, so the scale is the trained one). Mergeable: ``W <- W + s / (r0 + 1e-5) P (Lambda * Q)``.
Tensor names are HF peft's: ``lora_A``, ``lora_B``, ``lora_E``. A mixed-adapter batch is served as LoRA's
is (:mod:`deltatune.methods.lora.batched`) with ``A_k = Lambda_k * Q_k`` and ranks zero-padded.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...layer import DeltaLayer, row_dropout, to_delta_dtype
from ...model_interface import is_linear_like, linear_dims
from ...targeting import unwrapped
from ..lora.batched import LoraStack, routed_lora, stack_lora
from .config import AdaLoraConfig


class AdaLoraLinear(DeltaLayer):
    adapter_attr_names = ("lora_A", "lora_B", "lora_E")
    method_name = "adalora"

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        base = self.get_base_layer()
        self.transposed = not isinstance(base, nn.Linear)
        self.in_features, self.out_features = linear_dims(base)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_E = nn.ParameterDict()
        self.ranknum: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.dropout_p: dict[str, float] = {}
        self.kept: dict[str, torch.Tensor | None] = {}  # (r,) bool once pruned; None: every triplet kept

    def add(self, name: str, config: AdaLoraConfig, path: str = "") -> None:
        pattern = (config.rank_pattern or {}).get(f"{path}.lora_E")
        r = int(sum(pattern)) if pattern is not None else config.init_r
        device = self.get_base_layer().weight.device
        a, e, b = torch.randn(r, self.in_features), torch.randn(r, 1), torch.randn(self.out_features, r)
        if config.init_lora_weights:
            a.normal_(0.0, 0.02)
            b.normal_(0.0, 0.02)
            e.zero_()
        self.lora_A[name] = nn.Parameter(a.to(device))  # (r, in)
        self.lora_E[name] = nn.Parameter(e.to(device))  # (r, 1)
        self.lora_B[name] = nn.Parameter(b.to(device))  # (out, r)
        self.ranknum[name] = float(config.init_r)
        self.scaling[name] = float(config.lora_alpha) if config.lora_alpha > 0 else float(config.init_r)
        self.dropout_p[name] = config.lora_dropout
        self.kept[name] = None

    def _scale(self, name: str) -> float:
        return self.scaling[name] / (self.ranknum[name] + 1e-5)

    def add_delta(self, name: str, x: torch.Tensor, result: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        a, e, b = self.lora_A[name], self.lora_E[name], self.lora_B[name]
        x = to_delta_dtype(x, a.dtype)
        if self.training and self.dropout_p[name] > 0:
            x = F.dropout(x, self.dropout_p[name], training=True)
        update = F.linear(F.linear(x, a * e), b)  # (..., out)
        return result + (update * self._scale(name)).to(result.dtype)

    def add_routed_delta(self, names: list[str], slots: torch.Tensor, x: torch.Tensor, result: torch.Tensor,
                         *args: Any, **kwargs: Any) -> torch.Tensor:
        """Every row with its own adapter in two gathered ``bmm``, as LoRA (ranks padded with zeros)."""
        stack = self.stacked(names, self._lora_stack)
        x = row_dropout(to_delta_dtype(x, stack.a.dtype), [self.dropout_p[n] for n in names], slots, self.training)
        return routed_lora(stack, slots, x, result, None)

    def _lora_stack(self, names: Sequence[str]) -> LoraStack:
        return stack_lora([self.lora_A[n] * self.lora_E[n] for n in names], [self.lora_B[n] for n in names],
                          [self._scale(n) for n in names], [None] * len(names))

    def row_major_delta(self, name: str) -> torch.Tensor:
        """``s / (r0 + 1e-5) * P (Lambda * Q)``: ``(out, in)``."""
        return self.lora_B[name] @ (self.lora_A[name] * self.lora_E[name]) * self._scale(name)

    def delta_weight(self, name: str) -> torch.Tensor:
        delta = self.row_major_delta(name)
        return delta.T if self.transposed else delta

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        """The kept triplets only (HF peft's saved layout after pruning)."""
        state = super().adapter_state(name)
        kept = self.kept.get(name)
        if kept is None or not state:
            return state
        return {"lora_A": state["lora_A"][kept], "lora_E": state["lora_E"][kept], "lora_B": state["lora_B"][:, kept]}

    def delete(self, name: str) -> None:
        super().delete(name)
        for table in (self.ranknum, self.scaling, self.dropout_p, self.kept):
            table.pop(name, None)


def can_wrap(module: nn.Module, config: AdaLoraConfig, path: str) -> str | None:
    """``None`` when AdaLoRA can wrap ``module``, else why not."""
    base = unwrapped(module)
    return None if is_linear_like(base) else f"{type(base).__name__} is not supported (AdaLoRA wraps nn.Linear and Conv1D)"


__all__ = ["AdaLoraLinear", "can_wrap"]
