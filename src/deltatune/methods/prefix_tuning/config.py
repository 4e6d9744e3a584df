"""``PrefixTuningConfig``: HF peft's field names and defaults, validated on creation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ...errors import ConfigError
from .._virtual_tokens import VirtualTokenConfig


@dataclass
class PrefixTuningConfig(VirtualTokenConfig):
    """Prefix tuning (Li & Liang, arXiv 2101.00190): trainable key/value prefixes in every attention layer.

    Attributes:
        prefix_projection: train the prefixes through an MLP,
            ``prefix = Linear(H, L*2*D)(tanh(Linear(D, H)(e)))`` with ``e`` a ``(P, D)`` table (the
            paper's reparameterisation, which it found steadier); the saved form is the MLP's output,
            which needs no MLP to use.
        encoder_hidden_size: ``H``, the MLP's hidden width (default: ``token_dim``).
        init_weights: ``None`` (``N(0, 1)``, HF peft's default) or ``"zero"`` (all prefixes zero).
        encoder_prefix: deltatune only, encoder-decoder models only: also give every encoder
            self-attention and every decoder cross-attention layer ``num_virtual_tokens`` trainable
            key/value prefixes (the paper's encoder-decoder setting). Written to the config file only
            when ``True``, so default files stay exactly HF peft's.
        num_attention_heads / token_dim / num_layers: the key/value layout of the model's attention
            caches (key/value heads, ``heads * head_dim``, layers); filled from the model.
    """

    PEFT_TYPE: ClassVar[str] = "PREFIX_TUNING"

    encoder_hidden_size: int | None = None
    prefix_projection: bool = False
    init_weights: str | None = None
    encoder_prefix: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init_weights not in (None, "zero"):
            raise ConfigError(f"init_weights must be None or 'zero'; got {self.init_weights!r}.")
        if self.encoder_hidden_size is not None and (
            not isinstance(self.encoder_hidden_size, int) or self.encoder_hidden_size <= 0
        ):
            raise ConfigError(f"encoder_hidden_size must be a positive integer or None; got {self.encoder_hidden_size!r}.")
        if not isinstance(self.encoder_prefix, bool):
            raise ConfigError(f"encoder_prefix must be True or False; got {self.encoder_prefix!r}.")

    def to_dict(self) -> dict[str, Any]:
        """HF peft's fields; ``encoder_prefix`` (deltatune only) only when switched on."""
        out = super().to_dict()
        if not self.encoder_prefix:
            out.pop("encoder_prefix", None)
        return out
