"""``WeightDeltaLayer``: ``h = W x + b + dW x`` (``conv(x, W + dW)`` for convolutions), with ``dW`` built by the subclass.

Wraps ``nn.Linear``, transformers' ``Conv1D``, ``nn.Conv1d`` and ``nn.Conv2d``. A convolution's filter
``(out, in / groups, *kernel)`` is seen as the matrix ``(out, in / groups * prod(kernel))`` (HF peft's
layout), so the linear factorisations apply unchanged; with ``use_effective_conv2d`` (and a kernel
larger than 1) the subclass instead builds the filter from a CP-decomposed core over the kernel axes
(LyCORIS's "effective" convolution). A subclass creates its factors in :meth:`create_factors` and forms
``dW`` (scale included) in :meth:`raw_delta_weight`; this class handles rank/alpha patterns, both
dropouts, the forward pass and merging (``W <- W + dW``).
Mixed-adapter batches on linear layers use the cheapest exact gathered form a subclass offers in
:meth:`WeightDeltaLayer.routed_stack` (see :mod:`.batched`; default: the dense ``dW``); on convolutions each
adapter serves its own rows.
"""

from __future__ import annotations

import math
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

CONVS = (nn.Conv1d, nn.Conv2d)


class WeightDeltaLayer(DeltaLayer):
    """Bookkeeping shared by LoHa and LoKr on linear layers and 1-D / 2-D convolutions.

    Attributes:
        conv: the base is ``nn.Conv1d`` / ``nn.Conv2d``; then ``kernel`` is its kernel size,
            ``in_channels`` its input channels per group and ``in_features = in_channels * prod(kernel)``.
        effective: per adapter, whether ``dW`` is built with a CP core over the kernel axes.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        base = self.get_base_layer()
        self.conv = isinstance(base, CONVS)
        if self.conv:
            self.kernel: tuple[int, ...] = tuple(base.kernel_size)
            self.in_channels = base.in_channels // base.groups
            self.in_features, self.out_features = self.in_channels * math.prod(self.kernel), base.out_channels
            self.transposed = False
        else:
            self.transposed = not isinstance(base, nn.Linear)  # transformers' Conv1D keeps its weight (in, out)
            self.in_features, self.out_features = linear_dims(base)
        self.effective: dict[str, bool] = {}
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
        # a 1-wide kernel is a matrix product already: the CP core would only add reshapes (as peft)
        self.effective[name] = self.conv and config.use_effective_conv2d and math.prod(self.kernel) > 1
        self.create_factors(name, r, config)

    def _factor(self, shape: tuple[int, ...]) -> nn.Parameter:
        weight = self.get_base_layer().weight
        return nn.Parameter(torch.empty(shape, device=weight.device, dtype=torch.float32))

    def delta_weight(self, name: str) -> torch.Tensor:
        """``dW`` in the base weight's layout (transposed for ``Conv1D``, the filter shape for convolutions)."""
        delta = self.raw_delta_weight(name)
        if self.conv:
            return delta.reshape(self.get_base_layer().weight.shape)  # (out, in / groups, *kernel)
        return delta.T if self.transposed else delta

    def _row_keep(self, name: str, rows: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Rank dropout's mask ``(rows,)``: each output row kept with probability ``1 - p`` (rescaled by the kept mean)."""
        keep = (torch.rand(rows, device=device) > self.rank_dropout[name]).to(dtype)
        if self.rank_dropout_scale[name]:
            keep = keep / keep.mean().clamp_min(1e-8)
        return keep

    def _dropped_rows(self, name: str, delta: torch.Tensor) -> torch.Tensor:
        """Rank dropout on ``dW``: its output rows times :meth:`_row_keep`'s mask."""
        keep = self._row_keep(name, delta.shape[0], delta.device, delta.dtype)
        return delta * keep.view(-1, *[1] * (delta.dim() - 1))

    def _module_dropped(self, name: str) -> bool:
        """Module dropout: while training, the whole delta is skipped with probability ``p`` (one draw per call)."""
        return self.training and self.module_dropout[name] > 0 and bool(torch.rand(()) < self.module_dropout[name])

    def add_delta(self, name: str, x: torch.Tensor, result: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self._module_dropped(name):
            return result
        # (out, in), or the filter (out, in / groups, *kernel) for a convolution
        delta = self.delta_weight(name) if self.conv else self.raw_delta_weight(name)
        if self.training and self.rank_dropout[name] > 0:
            delta = self._dropped_rows(name, delta)
        x = to_delta_dtype(x, delta.dtype)
        if self.conv:  # the base's own stride, padding (mode included), dilation and groups; no bias
            return result + self.get_base_layer()._conv_forward(x, delta, None).to(result.dtype)
        return result + F.linear(x, delta).to(result.dtype)

    # -- mixed-adapter batches ---------------------------------------------------------------------
    def routed_stack(self, names: Sequence[str]) -> LoraStack | KronStack | torch.Tensor:
        """The adapters ``names`` in the cheapest exact form for a gathered matmul; here the dense ``dW``
        ``(K+1, out, in)``. Subclasses return a :class:`LoraStack` or :class:`KronStack` where that is exact."""
        return stack_dense([self.raw_delta_weight(n) for n in names])

    def add_routed_delta(self, names: list[str], slots: torch.Tensor, x: torch.Tensor, result: torch.Tensor,
                         *args: Any, **kwargs: Any) -> torch.Tensor:
        """Every row with its own adapter's ``dW`` in gathered batched matmuls (see :mod:`.batched`).

        Module and rank dropout draw once per call and adapter, so while they are on in training the
        rows are served one adapter at a time (the base class's loop), as are a convolution's rows."""
        if self.conv or (self.training and any(self.module_dropout[n] > 0 or self.rank_dropout[n] > 0 for n in names)):
            return super().add_routed_delta(names, slots, x, result, *args, **kwargs)
        stack = self.stacked(names, self.routed_stack)
        if isinstance(stack, LoraStack):
            return routed_lora(stack, slots, to_delta_dtype(x, stack.a.dtype), result, None)
        if isinstance(stack, KronStack):
            return result + routed_kron(stack, slots, to_delta_dtype(x, stack.w1.dtype)).to(result.dtype)
        return result + routed_dense(stack, slots, to_delta_dtype(x, stack.dtype)).to(result.dtype)

    def delete(self, name: str) -> None:
        super().delete(name)
        for table in (self.r, self.alpha, self.scaling, self.rank_dropout, self.module_dropout, self.rank_dropout_scale,
                      self.effective):
            table.pop(name, None)


def can_wrap_linear_or_conv(method: str) -> Any:
    """A ``can_wrap`` for methods that wrap linear layers (``nn.Linear``, ``Conv1D``) and ``nn.Conv1d/2d``."""

    def can_wrap(module: nn.Module, config: FactorConfig, path: str) -> str | None:
        base = unwrapped(module)
        if is_linear_like(base) or isinstance(base, CONVS):
            return None
        return (f"{type(base).__name__} is not supported ({method} wraps nn.Linear, transformers' Conv1D, nn.Conv1d "
                "and nn.Conv2d)")

    return can_wrap


def cp_filter(core: torch.Tensor, out_factor: torch.Tensor, in_factor: torch.Tensor) -> torch.Tensor:
    """A filter from a CP core: ``F[p, q, k, l] = sum_ij core[i, j, k, l] out_factor[i, p] in_factor[j, q]``.

    ``core``: ``(r, r, k1, k2)`` (a 1-D kernel is stored as ``(r, r, k, 1)``), ``out_factor``: ``(r, out)``,
    ``in_factor``: ``(r, in)``; returns ``(out, in, k1, k2)``.
    """
    return torch.einsum("ijkl,ip,jq->pqkl", core, out_factor, in_factor)


__all__ = ["CONVS", "WeightDeltaLayer", "can_wrap_linear_or_conv", "cp_filter"]
