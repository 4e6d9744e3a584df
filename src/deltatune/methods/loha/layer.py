"""LoHa layer on linear layers and 1-D / 2-D convolutions: a Hadamard product of two rank-r products.

    dW = s * (W1a @ W1b) * (W2a @ W2b),   W1a, W2a: (out, r),  W1b, W2b: (r, in),  s = alpha / r

The element-wise product of two rank-r matrices has rank up to r^2, for 4 r (out + in) / 2 = 2 r
(out + in) parameters. On a convolution ``in`` is ``in_channels / groups * prod(kernel)`` and ``dW`` is
reshaped to the filter; with ``use_effective_conv2d`` each product is a CP filter instead,

    dW[p, q, k, l] = s * (sum_ij T1[i, j, k, l] W1a[i, p] W1b[j, q]) * (same with T2, W2a, W2b),
    T: (r, r, k1, k2),  Wa: (r, out),  Wb: (r, in_channels / groups)     (a 1-D kernel: (r, r, k, 1))

Tensor names are HF peft's: ``hada_w1_a``, ``hada_w1_b``, ``hada_w2_a``, ``hada_w2_b``, ``hada_t1``, ``hada_t2``.

In a mixed-adapter batch on a linear layer, while ``r^2 (in + out) < in * out``, ``dW`` is served in its
rank-``r^2`` form (:meth:`LoHaLinear.low_rank_form`) like LoRA, else as a dense gathered ``dW`` (see
:mod:`deltatune.methods._weight_delta.batched`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .._weight_delta import WeightDeltaLayer, can_wrap_linear_or_conv, cp_filter
from .._weight_delta.batched import KronStack
from ..lora.batched import LoraStack, stack_lora
from .config import LoHaConfig


class HadamardDelta(torch.autograd.Function):
    """``s * (W1a W1b) * (W2a W2b)`` keeping only the four factors for backward.

    Plain autograd would keep both ``(out, in)`` products until the backward pass (one pair per wrapped
    layer); here they are recomputed there: ``dL/dW1a = (G * P2) W1b^T``, ``dL/dW1b = W1a^T (G * P2)``
    with ``G = s dL/d(dW)``, ``P2 = W2a W2b``, and the same with 1 and 2 swapped.
    """

    @staticmethod
    def forward(ctx: Any, w1a: torch.Tensor, w1b: torch.Tensor, w2a: torch.Tensor, w2b: torch.Tensor,
                scale: float) -> torch.Tensor:
        ctx.save_for_backward(w1a, w1b, w2a, w2b)
        ctx.scale = scale
        return (w1a @ w1b) * (w2a @ w2b) * scale  # (out, in)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        w1a, w1b, w2a, w2b = ctx.saved_tensors
        grad = grad.to(w1a.dtype) * ctx.scale
        g1 = grad * (w2a @ w2b)  # dL/d(W1a W1b)
        g2 = grad * (w1a @ w1b)  # dL/d(W2a W2b)
        return g1 @ w1b.T, w1a.T @ g1, g2 @ w2b.T, w2a.T @ g2, None


class LoHaLinear(WeightDeltaLayer):
    adapter_attr_names = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
    method_name = "loha"

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.hada_w1_a = nn.ParameterDict()
        self.hada_w1_b = nn.ParameterDict()
        self.hada_w2_a = nn.ParameterDict()
        self.hada_w2_b = nn.ParameterDict()
        self.hada_t1 = nn.ParameterDict()
        self.hada_t2 = nn.ParameterDict()

    def create_factors(self, name: str, r: int, config: LoHaConfig) -> None:
        out, inp = self.out_features, self.in_features
        if self.effective[name]:
            core = (r, r, *self.kernel) if len(self.kernel) == 2 else (r, r, self.kernel[0], 1)
            self.hada_t1[name], self.hada_t2[name] = self._factor(core), self._factor(core)
            self.hada_w1_a[name], self.hada_w2_a[name] = self._factor((r, out)), self._factor((r, out))
            self.hada_w1_b[name] = self._factor((r, self.in_channels))
            self.hada_w2_b[name] = self._factor((r, self.in_channels))
        else:
            self.hada_w1_a[name], self.hada_w2_a[name] = self._factor((out, r)), self._factor((out, r))
            self.hada_w1_b[name], self.hada_w2_b[name] = self._factor((r, inp)), self._factor((r, inp))
        with torch.no_grad():
            for p in self.adapter_parameters(name):
                nn.init.kaiming_uniform_(p, a=math.sqrt(5))
            if config.init_weights:
                nn.init.zeros_(self.hada_w2_b[name])  # dW = 0 at the start

    def raw_delta_weight(self, name: str) -> torch.Tensor:
        if self.effective[name]:  # (out, in_channels, k1, k2)
            first = cp_filter(self.hada_t1[name], self.hada_w1_a[name], self.hada_w1_b[name])
            second = cp_filter(self.hada_t2[name], self.hada_w2_a[name], self.hada_w2_b[name])
            return first * second * self.scaling[name]
        return HadamardDelta.apply(self.hada_w1_a[name], self.hada_w1_b[name], self.hada_w2_a[name],
                                   self.hada_w2_b[name], self.scaling[name])  # (out, in)

    def low_rank_form(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` with ``B A = (W1a W1b) * (W2a W2b)`` (scale not applied): ``(r^2, in)``, ``(out, r^2)``.

        ``A[p r + q] = W1b[p] * W2b[q]`` and ``B[:, p r + q] = W1a[:, p] * W2a[:, q]``."""
        w1a, w1b, w2a, w2b = (t[name] for t in (self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b))
        r = w1b.shape[0]
        a = (w1b[:, None, :] * w2b[None, :, :]).reshape(r * r, -1)  # (r^2, in)
        b = (w1a[:, :, None] * w2a[:, None, :]).reshape(w1a.shape[0], r * r)  # (out, r^2)
        return a, b

    def routed_stack(self, names: Sequence[str]) -> LoraStack | KronStack | torch.Tensor:
        """The rank-``r^2`` form when it is cheaper than the dense ``dW`` for every adapter, else the dense one."""
        size = self.in_features * self.out_features
        if all(self.r[n] ** 2 * (self.in_features + self.out_features) < size for n in names):
            forms = [self.low_rank_form(n) for n in names]
            return stack_lora([a for a, _ in forms], [b for _, b in forms], [self.scaling[n] for n in names],
                              [None] * len(names))
        return super().routed_stack(names)


can_wrap = can_wrap_linear_or_conv("LoHa")


__all__ = ["LoHaLinear", "can_wrap"]
