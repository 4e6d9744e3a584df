"""``FactorConfig``: the fields LoHa and LoKr share (HF peft's ``LycorisConfig`` names and defaults)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...config import TargetedConfig
from ...errors import ConfigError


@dataclass
class FactorConfig(TargetedConfig):
    """Rank, scale and dropout of a factorised weight delta ``dW = (alpha / r) * f(factors)``.

    Attributes:
        r: rank of the factors (> 0).
        alpha: scale numerator; ``dW`` is multiplied by ``alpha / r``.
        rank_dropout: while training, each output row of ``dW`` is dropped with this probability.
        module_dropout: while training, the whole delta is skipped with this probability per call.
        use_effective_conv2d: on ``nn.Conv1d`` / ``nn.Conv2d`` with a kernel wider than 1, build the
            filter from a CP core over the kernel axes (``(r, r, *kernel)`` plus ``(r, out)`` and ``(r, in)``
            factors) instead of factorising the flattened ``(out, in * prod(kernel))`` matrix; no effect elsewhere.
        init_weights: ``True``: one factor starts at zero, so the model starts equal to the base;
            ``False``: every factor random (the delta is non-zero from the start; for tests).
        rank_pattern / alpha_pattern: ``{regex: value}`` overriding ``r`` / ``alpha`` for modules whose
            path ends with a match.
    """

    r: int = 8
    alpha: float = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False
    init_weights: bool | str = True
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        ranks = [self.r, *self.rank_pattern.values()]
        if any(not isinstance(r, int) or r <= 0 for r in ranks):
            raise ConfigError(f"rank r must be a positive integer; got r={self.r}, rank_pattern={self.rank_pattern}.")
        for name in ("rank_dropout", "module_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name} must be in [0, 1); got {getattr(self, name)}.")


__all__ = ["FactorConfig"]
