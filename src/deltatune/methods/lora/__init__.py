"""LoRA: low-rank adaptation (Hu et al., arXiv 2106.09685), with rsLoRA, DoRA and PiSSA variants.

    h = W x + s * B (A x),   A: (r, in),  B: (out, r),  s = alpha / r   (rsLoRA: alpha / sqrt(r))

Trains ``A`` and ``B`` (and DoRA's magnitude vector); ``W`` stays frozen. Mergeable: ``W += s B A``.
Wraps ``nn.Linear``, transformers' ``Conv1D``, ``nn.Embedding``, ``nn.Conv1d`` and ``nn.Conv2d``.
"""

from __future__ import annotations

from torch import nn

from ...model_interface import role_regex
from ...registry import MethodSpec, register
from .config import LoraConfig
from .layer import LoraConv, LoraEmbedding, LoraLayer, LoraLinear, can_wrap, make_lora_layer


def default_targets(model: nn.Module, config: LoraConfig) -> str | None:
    """Query and value projections of the attention (HF peft's default choice)."""
    return role_regex(model, ["q", "v"])


SPEC = register(
    MethodSpec(
        name="lora",
        peft_type=LoraConfig.PEFT_TYPE,
        config_cls=LoraConfig,
        kind="layer",
        make_layer=make_lora_layer,
        default_targets=default_targets,
        mergeable=True,
        can_wrap=can_wrap,
    )
)

__all__ = ["SPEC", "LoraConfig", "LoraConv", "LoraEmbedding", "LoraLayer", "LoraLinear"]
