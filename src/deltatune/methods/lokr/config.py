"""``LoKrConfig``: HF peft's ``LOKR`` fields and defaults."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...errors import ConfigError
from .._weight_delta import FactorConfig

INIT_CHOICES = (True, False, "lycoris")


@dataclass
class LoKrConfig(FactorConfig):
    """LoKr: ``dW = (alpha / r) * kron(W1, W2)`` (Kronecker product; Yeh et al., arXiv 2212.10650).

    With ``out = a * b`` and ``in = c * d`` (factor pairs picked near the square root, or by
    ``decompose_factor``), ``W1: (a, c)`` and ``W2: (b, d)``. ``W2`` is itself the rank-r product
    ``W2a W2b`` when ``r < max(b, d) / 2``; ``W1`` likewise when also ``decompose_both``.

    Attributes (besides :class:`~deltatune.methods._weight_delta.FactorConfig`'s):
        decompose_both: also write ``W1`` as a rank-r product when that is smaller.
        decompose_factor: the factor ``a`` (and ``c``) of the split when it divides the dimension;
            ``-1`` picks the factor pair closest to the square root.
        rank_dropout_scale: rescale the rows kept by rank dropout by their mean.
        init_weights: ``True``: ``W1`` (or ``W1a``) starts at zero; ``"lycoris"``: ``W2`` (or ``W2b``)
            starts at zero; ``False``: all random (tests).
    """

    PEFT_TYPE: ClassVar[str] = "LOKR"

    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout_scale: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init_weights not in INIT_CHOICES:
            raise ConfigError(f"init_weights={self.init_weights!r} is not one of {INIT_CHOICES}.")


__all__ = ["LoKrConfig"]
