"""``AdaLoraConfig``: HF peft's ``ADALORA`` fields and defaults, validated on creation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...config import TargetedConfig
from ...errors import ConfigError


@dataclass
class AdaLoraConfig(TargetedConfig):
    """AdaLoRA: LoRA in SVD form whose rank budget is pruned while training (Zhang et al., arXiv 2303.10512).

        h = W x + (alpha / (r0 + 1e-5)) * P (Lambda * Q) x,   P: (out, r0), Lambda: (r0, 1), Q: (r0, in)

    Attributes:
        init_r: starting rank ``r0`` of every layer.
        target_r: average rank per layer left when the budget is spent (budget = ``target_r`` x layers).
        tinit: steps at the start without pruning.
        tfinal: steps at the end with the final ranks fixed (only the kept triplets train).
        deltaT: prune every ``deltaT`` steps in between; the budget falls as a cubic from ``init_r`` x
            layers to ``target_r`` x layers.
        beta1 / beta2: smoothing of the importance ``|p * grad|`` and of its uncertainty.
        orth_reg_weight: weight of the regulariser ``mean ||P^T P - I||_F + ||Q Q^T - I||_F``, added to
            the gradients before every optimizer step.
        total_step: optimizer steps of the run; ``None``: the training loop sets it (deltatune's loop and
            :class:`~deltatune.integrations.trainer_callback.DeltaStepCallback` do).
        lora_alpha: scale numerator (``<= 0``: ``r0``); lora_dropout: input dropout of the delta.
        rank_pattern: ``{"<module path>.lora_E": [kept, ...]}``, written by the pruning; a saved adapter
            holds the kept triplets only, and loading builds each layer at its kept rank.
        init_lora_weights: ``True``: ``Lambda = 0``, ``P, Q ~ N(0, 0.02)`` (starts as the base);
            ``False``: all ``N(0, 1)`` (tests).
        r: unused (HF peft writes it); the starting rank is ``init_r``.
    """

    PEFT_TYPE: ClassVar[str] = "ADALORA"
    #: LoRA options peft writes into every AdaLoRA config at their "off" values.
    METADATA_FIELDS: ClassVar[frozenset[str]] = TargetedConfig.METADATA_FIELDS | {
        "megatron_core", "qalora_group_size", "runtime_config", "use_rslora", "use_dora", "alpha_pattern",
        "loftq_config", "lora_bias", "use_qalora", "ensure_weight_tying"}

    init_r: int = 12
    target_r: int = 8
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1  # HF peft's name
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    init_lora_weights: bool = True
    rank_pattern: dict[str, list[bool]] | None = None
    r: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.init_r, int) or self.init_r <= 0:
            raise ConfigError(f"init_r must be a positive integer; got {self.init_r!r}.")
        if not isinstance(self.target_r, int) or not 0 <= self.target_r <= self.init_r:
            raise ConfigError(f"target_r must be an integer in [0, init_r={self.init_r}]; got {self.target_r!r}.")
        if not (0 < self.beta1 < 1 and 0 < self.beta2 < 1):
            raise ConfigError(f"beta1 and beta2 must lie in (0, 1); got {self.beta1}, {self.beta2}.")
        if self.orth_reg_weight < 0:
            raise ConfigError(f"orth_reg_weight must be >= 0; got {self.orth_reg_weight}.")
        if self.deltaT < 1:
            raise ConfigError(f"deltaT must be >= 1; got {self.deltaT}.")
        if self.bias != "none":
            raise ConfigError(f"bias={self.bias!r}: deltatune's AdaLoRA trains no biases; use bias='none'.")
        if self.total_step is not None:
            self.check_schedule(self.total_step)

    def check_schedule(self, total_step: int) -> None:
        """Refuse a schedule with no pruning phase (``tinit + tfinal >= total_step``)."""
        if total_step <= 0 or self.tinit >= total_step - self.tfinal:
            raise ConfigError(
                f"AdaLoRA's schedule needs tinit ({self.tinit}) < total_step ({total_step}) - tfinal ({self.tfinal}) "
                "so that there is a phase where ranks are pruned; lower tinit/tfinal or train for more steps."
            )


__all__ = ["AdaLoraConfig"]
