"""LoKr layer on linear layers and 1-D / 2-D convolutions: a Kronecker product of two small matrices.

    dW = s * kron(W1, W2),   W1: (a, c),  W2: (b, d),  out = a * b,  in = c * d,  s = alpha / r

``kron(W1, W2)[i * b + j, k * d + l] = W1[i, k] * W2[j, l]``. A factor is stored whole (``lokr_w1``,
``lokr_w2``) or as a rank-r product (``lokr_w1_a @ lokr_w1_b``, ``lokr_w2_a @ lokr_w2_b``), chosen
exactly as HF peft chooses, so files carry over. In a mixed-adapter batch on a linear layer whose adapters share factor
shapes, each row computes ``W1 X W2^T`` from its gathered factors (``X``: the input as ``(c, d)``), else
the dense ``dW`` is gathered (see :mod:`deltatune.methods._weight_delta.batched`). A single adapter on a
linear layer computes ``vec(s W1 X W2^T)`` too (:mod:`.kron_apply`): ``dW`` is formed only to merge.

On a convolution, ``in = c * d`` splits the input channels per group and the kernel goes with ``W2``:
whole, ``W2`` is ``(b, d, *kernel)``; as a product, ``W2a W2b`` is ``(b, d * prod(kernel))``; with
``use_effective_conv2d``, ``W2`` is the CP filter ``sum_ij T2[i, j, k, l] W2a[i, :] W2b[j, :]`` (``T2``:
``(r, r, k1, k2)``). ``dW = s * kron(W1, W2)`` reshaped to the filter, ``torch.kron`` broadcasting ``W1``
over ``W2``'s extra axes exactly as HF peft does (for a whole 1-D kernel that puts the kernel axis of
``W2`` against a leading unit axis of ``W1``: the same parametrisation as peft's, read the same way).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .._weight_delta import WeightDeltaLayer, can_wrap_linear_or_conv, cp_filter
from .._weight_delta.batched import KronStack, stack_kron
from ..lora.batched import LoraStack
from .config import LoKrConfig
from .kron_apply import kron_apply


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """``(m, n)`` with ``m * n == dimension`` and ``m <= n``: ``factor`` itself when it divides, else the
    pair with the smallest sum whose smaller member does not exceed ``factor`` (``-1``: no limit)."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    limit = dimension if factor == -1 else factor
    m, n = 1, dimension
    while m < n:
        candidate = m + 1
        while dimension % candidate:
            candidate += 1
        other = dimension // candidate
        if candidate + other > m + n or candidate > limit:
            break
        m, n = candidate, other
    return (n, m) if m > n else (m, n)


class LoKrLinear(WeightDeltaLayer):
    adapter_attr_names = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
    method_name = "lokr"

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        for attr in self.adapter_attr_names:
            setattr(self, attr, nn.ParameterDict())

    def create_factors(self, name: str, r: int, config: LoKrConfig) -> None:
        a, b = factorization(self.out_features, config.decompose_factor)
        c, d = factorization(self.in_channels if self.conv else self.in_features, config.decompose_factor)
        kernel = self.kernel if self.conv else ()
        whole_w1 = not (config.decompose_both and r < max(a, c) / 2)
        whole_w2 = not r < max(b, d) / 2
        if whole_w1:
            self.lokr_w1[name] = self._factor((a, c))
        else:
            self.lokr_w1_a[name], self.lokr_w1_b[name] = self._factor((a, r)), self._factor((r, c))
        if whole_w2:
            self.lokr_w2[name] = self._factor((b, d, *kernel))
        elif self.effective[name]:
            self.lokr_t2[name] = self._factor((r, r, *kernel) if len(kernel) == 2 else (r, r, kernel[0], 1))
            self.lokr_w2_a[name], self.lokr_w2_b[name] = self._factor((r, b)), self._factor((r, d))
        else:
            self.lokr_w2_a[name], self.lokr_w2_b[name] = self._factor((b, r)), self._factor((r, d * math.prod(kernel)))
        with torch.no_grad():
            for p in self.adapter_parameters(name):
                nn.init.kaiming_uniform_(p, a=math.sqrt(5))
            if config.init_weights is True:  # W1 (or W1a) = 0
                nn.init.zeros_(self.lokr_w1[name] if whole_w1 else self.lokr_w1_a[name])
            elif config.init_weights == "lycoris":  # W2 (or W2b) = 0
                nn.init.zeros_(self.lokr_w2[name] if whole_w2 else self.lokr_w2_b[name])

    def _w(self, name: str, which: str) -> torch.Tensor:
        whole = getattr(self, f"lokr_{which}")
        if name in whole:
            return whole[name]
        a, b = getattr(self, f"lokr_{which}_a")[name], getattr(self, f"lokr_{which}_b")[name]
        if which == "w2" and name in self.lokr_t2:
            return cp_filter(self.lokr_t2[name], a, b)  # (b, d, k1, k2)
        return a @ b

    def raw_delta_weight(self, name: str) -> torch.Tensor:
        w1, w2 = self._w(name, "w1"), self._w(name, "w2")
        if w2.dim() == 4:  # kron(W1[:, :, None, None], W2): out = (i, j), in = (k, l), the kernel from W2 alone
            (a, c), (b, d) = w1.shape, w2.shape[:2]
            return torch.einsum("ik,jlxy->ijklxy", w1, w2).reshape(a * b, c * d, *w2.shape[2:]) * self.scaling[name]
        return torch.kron(w1, w2) * self.scaling[name]  # (out, in), or a filter-sized tensor (reshaped by delta_weight)

    def add_delta(self, name: str, x: torch.Tensor, result: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """On a linear layer ``dW x = vec(s W1 X W2^T)`` on the activations (:mod:`.kron_apply`), never
        forming ``dW``; rank dropout masks the output features (``(dW * keep) x = keep * (dW x)``)."""
        if self.conv:
            return super().add_delta(name, x, result, *args, **kwargs)
        if self._module_dropped(name):
            return result
        out = kron_apply(x, self._w(name, "w1") * self.scaling[name], self._w(name, "w2"))  # (..., out)
        if self.training and self.rank_dropout[name] > 0:
            out = out * self._row_keep(name, out.shape[-1], out.device, torch.float32).to(out.dtype)
        return result + out.to(result.dtype)

    def routed_stack(self, names: Sequence[str]) -> LoraStack | KronStack | torch.Tensor:
        """The Kronecker factors when every adapter's have the same shapes, else the dense ``dW``."""
        w1 = [self._w(n, "w1") for n in names]  # (a, c) each
        w2 = [self._w(n, "w2") for n in names]  # (b, d) each
        if len({t.shape for t in w1}) == 1 and len({t.shape for t in w2}) == 1:
            return stack_kron(w1, w2, [self.scaling[n] for n in names])
        return super().routed_stack(names)


can_wrap = can_wrap_linear_or_conv("LoKr")


__all__ = ["LoKrLinear", "can_wrap", "factorization"]
