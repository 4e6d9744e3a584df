"""``LoHaConfig``: HF peft's ``LOHA`` fields and defaults."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .._weight_delta import FactorConfig


@dataclass
class LoHaConfig(FactorConfig):
    """LoHa: ``dW = (alpha / r) * (W1a W1b) * (W2a W2b)`` (Hadamard product; Hyeon-Woo et al., arXiv 2108.06098).

    Fields as :class:`~deltatune.methods._weight_delta.FactorConfig`. With ``init_weights=True``,
    ``W2b`` starts at zero (the model starts equal to the base), the other factors Kaiming-uniform.
    """

    PEFT_TYPE: ClassVar[str] = "LOHA"


__all__ = ["LoHaConfig"]
