"""LoRA: low-rank adaptation (Hu et al., arXiv 2106.09685), with rsLoRA, DoRA, PiSSA, OLoRA and LoftQ variants.

    h = W x + s * B (A x),   A: (r, in),  B: (out, r),  s = alpha / r   (rsLoRA: alpha / sqrt(r))

Trains ``A`` and ``B`` (and DoRA's magnitude vector); ``W`` stays frozen. Mergeable: ``W += s B A``.
Wraps ``nn.Linear``, transformers' ``Conv1D``, ``nn.Embedding``, ``nn.Conv1d`` and ``nn.Conv2d``; with
``target_parameters``, the 3-D expert weights of mixture-of-experts layers (:mod:`.experts`).
"""

from __future__ import annotations

from torch import nn

from ...errors import TargetError
from ...model_interface import is_linear_like, role_regex
from ...registry import MethodSpec, register
from ...targeting import find_targets, unwrapped
from .bias import trained_biases
from .combine import combine_lora
from .config import LoftQConfig, LoraConfig
from .experts import LoraExperts, make_lora_experts
from .layer import LoraConv, LoraEmbedding, LoraLayer, LoraLinear, can_wrap, make_lora_layer
from .loftq import check_loftq_targets
from .loftq_quantized import replace_lora_weights_loftq
from .tied import TiedLoraHead, tie_output_head


def default_targets(model: nn.Module, config: LoraConfig) -> str | None:
    """Query and value projections of the attention (HF peft's default choice)."""
    return role_regex(model, ["q", "v"])


def prepare_config(model: nn.Module, config: LoraConfig) -> None:
    """Record ``fan_in_fan_out=True`` when the targets are transposed linear layers (GPT-2's ``Conv1D``).

    deltatune detects the layout per layer anyway; the flag is written for HF peft, which reads it. LoftQ
    replaces every target by a bitsandbytes linear layer (weight ``(out, in)``), so there the flag is ``False``,
    as on a GPT-2 loaded quantized. LoftQ's targets are checked here too, so that no choice of targets lets a
    refusal pass unsaid.
    """
    if config.init_lora_weights == "loftq":
        check_loftq_targets(model, config, default_targets(model, config))
        config.fan_in_fan_out = False
        return
    if config.fan_in_fan_out or config.target_modules is None and default_targets(model, config) is None:
        return
    wanted = config.target_modules if config.target_modules is not None else default_targets(model, config)
    try:
        targets = find_targets(model, config, wanted)
    except TargetError:
        return  # inject_layers raises the same error with its full message
    if any(is_linear_like(t) and not isinstance(t, nn.Linear) for t in (unwrapped(x.module) for x in targets)):
        config.fan_in_fan_out = True


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
        prepare_config=prepare_config,
        extra_trainable=trained_biases,
        loraplus_markers=(".lora_B.", ".lora_embedding_B."),
        combine=combine_lora,
        make_parameter_layer=make_lora_experts,
        finish_injection=tie_output_head,
    )
)

__all__ = ["SPEC", "LoftQConfig", "LoraConfig", "LoraConv", "LoraEmbedding", "LoraExperts", "LoraLayer", "LoraLinear",
           "TiedLoraHead", "replace_lora_weights_loftq"]
