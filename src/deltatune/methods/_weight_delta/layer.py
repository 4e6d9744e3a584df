"""``WeightDeltaLayer``: ``h = W x + b + dW x`` for a linear layer (``nn.Linear`` or ``Conv1D``), with ``dW`` built by the subclass.

A subclass creates its factors in :meth:`create_factors` and forms ``dW`` (``(out, in)``, scale
included) in :meth:`raw_delta_weight`; this class handles rank/alpha patterns, both dropouts, the
forward pass and merging (``W <- W + dW``). Mixed-adapter batches use the cheapest exact gathered form a
subclass offers in :meth:`WeightDeltaLayer.routed_stack` (see :mod:`.batched`; default: the dense ``dW``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...layer import DeltaLayer, to_delta_dtype
from ...model_interface import is_linear_like, linear_dims
from ...targeting import pattern_value, unwrapped
from ..lora.batched import LoraStack, routed_lora
from .batched import KronStack, routed_dense, routed_kron, stack_dense
from .config import FactorConfig


class WeightDeltaLayer(DeltaLayer):
    """Bookkeeping shared by LoHa and LoKr on ``nn.Linear`` and transformers' ``Conv1D``."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        base = self.get_base_layer()
        self.transposed = not isinstance(base, nn.Linear)  # transformers' Conv1D keeps its weight (in, out)
        self.in_features, self.out_features = linear_dims(base)
        self.r: dict[str, int] = {}
        self.alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.rank_dropout: dict[str, float] = {}
        self.module_dropout: dict[str, float] = {}
        self.rank_dropout_scale: dict[str, bool] = {}

    # -- to implement -----------------------------------------------------------------------------
    def create_factors(self, name: str, r: int, config: FactorConfig) -> None:
        raise NotImplementedError

    def raw_delta_weight(self, name: str) -> torch.Tensor:
        """``dW`` ``(out, in)`` with the scale ``alpha / r`` applied, in the factors' dtype."""
        raise NotImplementedError

    # -- shared -----------------------------------------------------------------------------------
    def add(self, name: str, config: FactorConfig, path: str = "") -> None:
        r = int(pattern_value(path, config.rank_pattern) or config.r)
        alpha = float(pattern_value(path, config.alpha_pattern) or config.alpha)
        self.r[name], self.alpha[name], self.scaling[name] = r, alpha, alpha / r
        self.rank_dropout[name] = config.rank_dropout
        self.module_dropout[name] = config.module_dropout
        self.rank_dropout_scale[name] = bool(getattr(config, "rank_dropout_scale", True))
        self.create_factors(name, r, config)

    def _factor(self, shape: tuple[int, ...]) -> nn.Parameter:
        weight = self.get_base_layer().weight
        return nn.Parameter(torch.empty(shape, device=weight.device, dtype=torch.float32))

    def delta_weight(self, name: str) -> torch.Tensor:
        """``dW`` in the base weight's layout (transposed for ``Conv1D``)."""
        delta = self.raw_delta_weight(name)
        return delta.T if self.transposed else delta

    def _dropped_rows(self, name: str, delta: torch.Tensor) -> torch.Tensor:
        """Rank dropout: each output row of ``dW`` kept with probability ``1 - p`` (rescaled by the kept mean)."""
        keep = (torch.rand(delta.shape[0], device=delta.device) > self.rank_dropout[name]).to(delta.dtype)
        if self.rank_dropout_scale[name]:
            keep = keep / keep.mean().clamp_min(1e-8)
        return delta * keep[:, None]

    def add_delta(self, name: str, x: torch.Tensor, result: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.training and self.module_dropout[name] > 0 and torch.rand(()) < self.module_dropout[name]:
            return result
        delta = self.raw_delta_weight(name)  # (out, in)
        if self.training and self.rank_dropout[name] > 0:
            delta = self._dropped_rows(name, delta)
        return result + F.linear(to_delta_dtype(x, delta.dtype), delta).to(result.dtype)

    # -- mixed-adapter batches ---------------------------------------------------------------------
    def routed_stack(self, names: Sequence[str]) -> LoraStack | KronStack | torch.Tensor:
        """The adapters ``names`` in the cheapest exact form for a gathered matmul; here the dense ``dW``
        ``(K+1, out, in)``. Subclasses return a :class:`LoraStack` or :class:`KronStack` where that is exact."""
        return stack_dense([self.raw_delta_weight(n) for n in names])

    def add_routed_delta(self, names: list[str], slots: torch.Tensor, x: torch.Tensor, result: torch.Tensor,
                         *args: Any, **kwargs: Any) -> torch.Tensor:
        """Every row with its own adapter's ``dW`` in gathered batched matmuls (see :mod:`.batched`).

        Module and rank dropout draw once per call and adapter, so while they are on in training the
        rows are served one adapter at a time (the base class's loop)."""
        if self.training and any(self.module_dropout[n] > 0 or self.rank_dropout[n] > 0 for n in names):
            return super().add_routed_delta(names, slots, x, result, *args, **kwargs)
        stack = self.stacked(names, self.routed_stack)
        if isinstance(stack, LoraStack):
            return routed_lora(stack, slots, to_delta_dtype(x, stack.a.dtype), result, None)
        if isinstance(stack, KronStack):
            return result + routed_kron(stack, slots, to_delta_dtype(x, stack.w1.dtype)).to(result.dtype)
        return result + routed_dense(stack, slots, to_delta_dtype(x, stack.dtype)).to(result.dtype)

    def delete(self, name: str) -> None:
        super().delete(name)
        for table in (self.r, self.alpha, self.scaling, self.rank_dropout, self.module_dropout, self.rank_dropout_scale):
            table.pop(name, None)


def can_wrap_linear(method: str) -> Any:
    """A ``can_wrap`` for methods that wrap linear layers (``nn.Linear``, ``Conv1D``) only."""

    def can_wrap(module: nn.Module, config: FactorConfig, path: str) -> str | None:
        base = unwrapped(module)
        if is_linear_like(base):
            return None
        return f"{type(base).__name__} is not supported ({method} wraps nn.Linear and transformers' Conv1D)"

    return can_wrap


__all__ = ["WeightDeltaLayer", "can_wrap_linear"]
