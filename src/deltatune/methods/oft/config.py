"""``OFTConfig``: HF peft's ``OFT`` fields and defaults (peft >= 0.18 parametrisation), validated on creation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...config import TargetedConfig
from ...errors import ConfigError


@dataclass
class OFTConfig(TargetedConfig):
    """Orthogonal fine-tuning: a block-diagonal rotation of each wrapped layer's input (Qiu et al., arXiv 2306.07280).

        h = W (R x) + b,   R = diag(R_1, ..., R_n),  R_i = cayley(Q_i),  Q_i = S_i - S_i^T  (b x b, skew)

    Attributes:
        r: number of blocks ``n``; give this or ``oft_block_size``, not both (``n * block = in``).
        oft_block_size: block size ``b`` (default 32). When it does not divide ``in_features`` the
            nearest divisor is taken, with a warning (HF peft's rule).
        module_dropout: while training, this share of the blocks is replaced by the identity per call.
        coft: constrained OFT: before each use, ``Q_i`` is pulled back into a ball of radius
            ``eps / sqrt(n)`` around zero (kept in place in the parameter, as HF peft does).
        eps: that radius, before the ``1 / sqrt(n)`` factor.
        block_share: one rotation shared by every block (``(1, b (b - 1) / 2)`` parameters).
        use_cayley_neumann: ``True`` (HF peft's default): ``R = I + 2 Q + 2 Q^2 + ... + 2 Q^(k-2) + Q^(k-1)``
            with ``k = num_cayley_neumann_terms``, a truncated series of ``(I + Q)(I - Q)^-1`` (only nearly
            orthogonal); ``False``: the exact ``(I - Q)(I + Q)^-1`` (orthogonal). The two are each other's
            transpose to first order: an adapter must be read with the setting it was trained with.
        num_cayley_neumann_terms: ``k`` above.
        fan_in_fan_out: weight stored ``(in, out)`` (GPT-2's ``Conv1D``); detected automatically.
        bias: only ``"none"``.
        init_weights: ``True``: ``Q = 0`` (``R = I``, the model starts as the base); ``False``: ``N(0, 0.1)``.
    """

    PEFT_TYPE: ClassVar[str] = "OFT"

    r: int = 0
    oft_block_size: int = 32
    module_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    init_weights: bool = True
    coft: bool = False
    eps: float = 6e-5
    block_share: bool = False
    use_cayley_neumann: bool = True
    num_cayley_neumann_terms: int = 5

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.r != 0) == (self.oft_block_size != 0):
            raise ConfigError(
                f"Give exactly one of r (number of blocks) and oft_block_size (block size); got r={self.r}, "
                f"oft_block_size={self.oft_block_size}. Set the other to 0."
            )
        if self.r < 0 or self.oft_block_size < 0:
            raise ConfigError(f"r and oft_block_size must not be negative; got {self.r}, {self.oft_block_size}.")
        if not 0.0 <= self.module_dropout < 1.0:
            raise ConfigError(f"module_dropout must be in [0, 1); got {self.module_dropout}.")
        if self.bias != "none":
            raise ConfigError(f"bias={self.bias!r}: deltatune's OFT trains no biases; use bias='none'.")
        if self.num_cayley_neumann_terms < 1:
            raise ConfigError(f"num_cayley_neumann_terms must be >= 1; got {self.num_cayley_neumann_terms}.")


__all__ = ["OFTConfig"]
