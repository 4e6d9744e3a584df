"""``LNTuningConfig``: HF peft's ``LN_TUNING`` fields, validated on creation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...config import TargetedConfig


@dataclass
class LNTuningConfig(TargetedConfig):
    """LayerNorm tuning: a trained copy of each chosen normalisation layer (Zhao et al., arXiv 2312.11420).

    Attributes:
        target_modules: normalisation layers to tune (see :class:`~deltatune.config.TargetedConfig`).
            ``None``: every normalisation layer of the model (``LayerNorm``, ``RMSNorm``, T5's
            ``T5LayerNorm``, ...); the resolved choice is written into ``adapter_config.json`` so HF
            peft rebuilds the same layout.
    """

    PEFT_TYPE: ClassVar[str] = "LN_TUNING"


__all__ = ["LNTuningConfig"]
