"""``BitFitConfig``: train bias terms only (deltatune's own ``peft_type``; HF peft has no BitFit)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...config import TargetedConfig
from ...errors import ConfigError


@dataclass
class BitFitConfig(TargetedConfig):
    """BitFit: every bias term of the chosen modules trains, nothing else (Ben Zaken et al., arXiv 2106.10199).

    The adapter holds a trained change ``db`` of each bias, ``h = W x + (b + db)``, so the base model stays
    untouched, adapters can be switched off or swapped, and merging is ``b <- b + db``.

    Attributes:
        target_modules: modules whose bias trains (see :class:`~deltatune.config.TargetedConfig`). ``None``:
            every linear layer (``nn.Linear``, ``Conv1D``), ungrouped or grouped convolution and
            normalisation layer that has a bias, task heads excepted (they train in full anyway).
        init_bitfit_weights: ``True`` starts every ``db`` at zero (the model starts equal to the base);
            ``False`` draws ``N(0, 0.02)`` (for tests).
    """

    PEFT_TYPE: ClassVar[str] = "BITFIT"

    init_bitfit_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.init_bitfit_weights, bool):
            raise ConfigError(f"init_bitfit_weights must be True or False; got {self.init_bitfit_weights!r}.")


__all__ = ["BitFitConfig"]
