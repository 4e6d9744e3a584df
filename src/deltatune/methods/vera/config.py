"""``VeraConfig``: HF peft's ``VERA`` fields and defaults, validated on creation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...config import TargetedConfig
from ...errors import ConfigError


@dataclass
class VeraConfig(TargetedConfig):
    """VeRA: frozen shared random ``A``, ``B`` and trained scaling vectors (Kopiczko et al., arXiv 2310.11454).

        h = W x + Lambda_b B Lambda_d A x,   Lambda_b = diag(b): (out,),  Lambda_d = diag(d): (r,)

    Attributes:
        r: rank of the shared projections (VeRA uses far larger ranks than LoRA: its cost is ``r``
            per layer, not ``r * (in + out)``).
        projection_prng_key: seed of the projections ``A: (r, in_max)`` and ``B: (out_max, r)``
            (Kaiming-uniform, drawn on the CPU in that order), shared by every wrapped layer, which
            reads the top-left block it needs.
        save_projection: write ``A`` and ``B`` into the adapter file (``base_model.vera_A`` /
            ``base_model.vera_B``) so the adapter loads the same on any platform; ``False`` keeps
            files small and regenerates them from the seed.
        vera_dropout: dropout on the layer input of the delta while training.
        d_initial: the value ``d`` starts at (``b`` starts at zero, so the model starts as the base).
        fan_in_fan_out: the base weight is stored ``(in, out)`` (GPT-2's ``Conv1D``); detected
            automatically, kept for HF peft compatibility.
        bias: only ``"none"`` (no bias trains).
        init_weights: ``True``: ``b = 0``, ``d = d_initial``; ``False``: ``b = 1``, ``d ~ N(0, 1)`` (tests).
    """

    PEFT_TYPE: ClassVar[str] = "VERA"

    r: int = 256
    projection_prng_key: int = 0
    save_projection: bool = True
    vera_dropout: float = 0.0
    d_initial: float = 0.1
    fan_in_fan_out: bool = False
    bias: str = "none"
    init_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.r, int) or self.r <= 0:
            raise ConfigError(f"VeRA rank r must be a positive integer; got {self.r!r}.")
        if not 0.0 <= self.vera_dropout < 1.0:
            raise ConfigError(f"vera_dropout must be in [0, 1); got {self.vera_dropout}.")
        if self.bias != "none":
            raise ConfigError(f"bias={self.bias!r}: deltatune's VeRA trains no biases; use bias='none'.")


__all__ = ["VeraConfig"]
