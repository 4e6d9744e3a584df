"""``PTuningConfig``: HF peft's ``PromptEncoderConfig`` fields, validated on creation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...errors import ConfigError
from .._virtual_tokens import VirtualTokenConfig

ENCODER_CHOICES = ("MLP", "LSTM")


@dataclass
class PTuningConfig(VirtualTokenConfig):
    """P-tuning (Liu et al., arXiv 2103.10385): virtual tokens produced by a small trainable encoder.

    Attributes:
        encoder_reparameterization_type: ``"MLP"`` (``encoder_num_layers`` hidden ReLU layers) or
            ``"LSTM"`` (a bidirectional LSTM followed by a two-layer MLP, as in the paper).
        encoder_hidden_size: hidden width of the encoder (default: ``token_dim``).
        encoder_num_layers: MLP hidden layers, or LSTM layers (default 2; for ``"MLP"`` HF peft
            always uses 2 and ignores the field, deltatune honours it).
        encoder_dropout: dropout inside the encoder (between LSTM layers; after each MLP hidden layer).
    """

    PEFT_TYPE: ClassVar[str] = "P_TUNING"

    encoder_reparameterization_type: str = "MLP"
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        kind = getattr(self.encoder_reparameterization_type, "value", self.encoder_reparameterization_type)
        self.encoder_reparameterization_type = str(kind).upper()
        if self.encoder_reparameterization_type not in ENCODER_CHOICES:
            raise ConfigError(
                f"encoder_reparameterization_type={kind!r} is not one of {ENCODER_CHOICES}."
            )
        if self.encoder_hidden_size is not None and (
            not isinstance(self.encoder_hidden_size, int) or self.encoder_hidden_size <= 0
        ):
            raise ConfigError(f"encoder_hidden_size must be a positive integer or None; got {self.encoder_hidden_size!r}.")
        if not isinstance(self.encoder_num_layers, int) or self.encoder_num_layers < 1:
            raise ConfigError(f"encoder_num_layers must be an integer >= 1; got {self.encoder_num_layers!r}.")
        if not 0.0 <= self.encoder_dropout < 1.0:
            raise ConfigError(f"encoder_dropout must be in [0, 1); got {self.encoder_dropout}.")
