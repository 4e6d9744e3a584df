"""``BottleneckConfig``: bottleneck adapters (Houlsby / Pfeiffer / parallel), validated on creation."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from ...config import TargetedConfig
from ...errors import ConfigError

VARIANTS = ("houlsby", "pfeiffer", "parallel")
NON_LINEARITIES = ("relu", "gelu", "swish", "silu", "tanh")
DEFAULT_REDUCTION_FACTOR = 16


@dataclass
class BottleneckConfig(TargetedConfig):
    """Bottleneck adapters: ``a(h) = s * W_up f(W_down h)`` added to a module's output.

    * ``"houlsby"`` (Houlsby et al., arXiv 1902.00751): ``h + a(h)`` after the attention output
      projection and after the feed-forward output projection of every layer;
    * ``"pfeiffer"`` (Pfeiffer et al., arXiv 2005.00247): the same after the feed-forward block only;
    * ``"parallel"`` (He et al., arXiv 2110.04366): ``FFN(x) + a(x)``, beside the feed-forward block,
      reading the block's input.

    Attributes:
        variant: ``"houlsby"``, ``"pfeiffer"`` or ``"parallel"``.
        bottleneck_size: width of the bottleneck. Give this or ``reduction_factor``, not both.
        reduction_factor: bottleneck width as ``features / reduction_factor`` (rounded, at least 1);
            16 when neither is given.
        non_linearity: ``f``: ``"relu"``, ``"gelu"``, ``"swish"`` (= ``"silu"``) or ``"tanh"``.
        scaling: ``s``, the factor on the adapter's output (He et al. use 4 for parallel adapters).
        adapter_dropout: dropout probability on the adapter's input during training.
        init_weights: ``True``: ``W_up = 0`` (and its bias), so the model starts exactly equal to the
            base; ``False``: ``W_up`` random too (a non-zero start, for tests).
        target_modules: ``None`` places the adapters where the variant says, from the architecture
            table. Given explicitly, ``"houlsby"`` / ``"pfeiffer"`` put an adapter after each target,
            ``"parallel"`` beside each target (reading the target's input).
        parallel_inputs: ``{down projection path: up projection path}`` for parallel adapters beside a
            feed-forward block computed inline in its layer (BART's ``fc1 -> act -> fc2``): the adapter wraps
            the down projection and reads the up projection's input, ``fc2(..) + a(x)``. Filled from the
            model's structure when ``target_modules`` is left ``None``; saved with the adapter.
    """

    PEFT_TYPE: ClassVar[str] = "BOTTLENECK"

    variant: str = "houlsby"
    bottleneck_size: int | None = None
    reduction_factor: float | None = None
    non_linearity: str = "relu"
    scaling: float = 1.0
    adapter_dropout: float = 0.0
    init_weights: bool = True
    parallel_inputs: dict[str, str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.variant not in VARIANTS:
            raise ConfigError(f"variant={self.variant!r} is not one of {VARIANTS}.")
        if self.non_linearity not in NON_LINEARITIES:
            raise ConfigError(f"non_linearity={self.non_linearity!r} is not one of {NON_LINEARITIES}.")
        if self.bottleneck_size is not None and self.reduction_factor is not None:
            raise ConfigError(
                f"Give bottleneck_size ({self.bottleneck_size}) or reduction_factor ({self.reduction_factor}), not both."
            )
        size = self.bottleneck_size
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size <= 0):
            raise ConfigError(f"bottleneck_size must be a positive integer; got {size!r}.")
        rf = self.reduction_factor
        if rf is not None and (isinstance(rf, bool) or not isinstance(rf, (int, float)) or not rf > 0):
            raise ConfigError(f"reduction_factor must be a positive number; got {rf!r}.")
        if isinstance(self.scaling, bool) or not isinstance(self.scaling, (int, float)) or not math.isfinite(self.scaling):
            raise ConfigError(f"scaling must be a finite number; got {self.scaling!r}.")
        if not 0.0 <= self.adapter_dropout < 1.0:
            raise ConfigError(f"adapter_dropout must be in [0, 1); got {self.adapter_dropout}.")
        if not isinstance(self.init_weights, bool):
            raise ConfigError(f"init_weights must be True or False; got {self.init_weights!r}.")

    def size_for(self, features: int) -> int:
        """The bottleneck width for an adapter reading ``features`` values."""
        if self.bottleneck_size is not None:
            return self.bottleneck_size
        return max(1, round(features / (self.reduction_factor or DEFAULT_REDUCTION_FACTOR)))


__all__ = ["NON_LINEARITIES", "VARIANTS", "BottleneckConfig"]
