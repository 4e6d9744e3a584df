"""LoHa layer on linear layers: a Hadamard product of two rank-r products.

    dW = s * (W1a @ W1b) * (W2a @ W2b),   W1a, W2a: (out, r),  W1b, W2b: (r, in),  s = alpha / r

The element-wise product of two rank-r matrices has rank up to r^2, for 4 r (out + in) / 2 = 2 r
(out + in) parameters. Tensor names are HF peft's: ``hada_w1_a``, ``hada_w1_b``, ``hada_w2_a``, ``hada_w2_b``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .._weight_delta import WeightDeltaLayer, can_wrap_linear
from .config import LoHaConfig


class LoHaLinear(WeightDeltaLayer):
    adapter_attr_names = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    method_name = "loha"

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.hada_w1_a = nn.ParameterDict()
        self.hada_w1_b = nn.ParameterDict()
        self.hada_w2_a = nn.ParameterDict()
        self.hada_w2_b = nn.ParameterDict()

    def create_factors(self, name: str, r: int, config: LoHaConfig) -> None:
        out, inp = self.out_features, self.in_features
        self.hada_w1_a[name] = self._factor((out, r))
        self.hada_w1_b[name] = self._factor((r, inp))
        self.hada_w2_a[name] = self._factor((out, r))
        self.hada_w2_b[name] = self._factor((r, inp))
        with torch.no_grad():
            for table in (self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b):
                nn.init.kaiming_uniform_(table[name], a=math.sqrt(5))
            if config.init_weights:
                nn.init.zeros_(self.hada_w2_b[name])  # dW = 0 at the start

    def raw_delta_weight(self, name: str) -> torch.Tensor:
        first = self.hada_w1_a[name] @ self.hada_w1_b[name]  # (out, in)
        second = self.hada_w2_a[name] @ self.hada_w2_b[name]  # (out, in)
        return first * second * self.scaling[name]


can_wrap = can_wrap_linear("LoHa")


def make_loha_layer(module: nn.Module, config: LoHaConfig, name: str, path: str) -> LoHaLinear | None:
    """Wrap a linear ``module`` with LoHa, or ``None`` for other module types."""
    if can_wrap(module, config, path) is not None:
        return None
    layer = LoHaLinear(module)
    layer.add(name, config, path)
    return layer


__all__ = ["LoHaLinear", "can_wrap", "make_loha_layer"]
