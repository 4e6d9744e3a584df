"""Shared parts of methods whose delta is a whole weight matrix built from small factors (LoHa, LoKr).

Such a layer computes ``h = W x + dW x`` with ``dW`` formed from the adapter's factors on every
call; merging adds ``dW`` to ``W``. The config fields are the LyCORIS family's in HF peft.
"""

from __future__ import annotations

from .config import FactorConfig
from .layer import CONVS, WeightDeltaLayer, can_wrap_linear_or_conv, cp_filter

__all__ = ["CONVS", "FactorConfig", "WeightDeltaLayer", "can_wrap_linear_or_conv", "cp_filter"]
