"""Prompt tuning (Lester et al., arXiv 2104.08691): trainable virtual tokens in front of the input.

    inputs_embeds' = [p_1 ... p_P ; embed(x_1) ... embed(x_S)],   p_i in R^D trainable

Trains only the ``P x D`` table (plus ``modules_to_save`` such as a classification head); the
model stays frozen. Encoder-decoder models get the virtual tokens on the encoder input. Saved in
HF peft's format: ``prompt_embeddings`` of shape ``(num_virtual_tokens * num_transformer_submodules, D)``.
Cannot be merged into the weights. Works on any model with ``get_input_embeddings()`` whose forward
accepts ``inputs_embeds``.
"""

from __future__ import annotations

from torch import nn

from ...registry import MethodSpec, register
from .._virtual_tokens import (
    ReparamTable,
    VirtualTokenDelta,
    fill_from_model,
    fill_token_dim,
    input_embeddings,
)
from .config import PromptTuningConfig
from .init import init_prompt_table


class PromptTuningDelta(VirtualTokenDelta):
    """The virtual-token table of one prompt-tuning adapter."""

    method_name = "prompt_tuning"


def make_prompt_tuning(model: nn.Module, config: PromptTuningConfig, adapter_name: str) -> PromptTuningDelta:
    """Fill the config from ``model`` and build the (initialised) virtual-token table."""
    dim = fill_token_dim(config, model)
    fill_from_model(config, model)
    words = input_embeddings(model)
    table = ReparamTable(config.total_virtual_tokens, dim).to(next(words.parameters()).device)
    if not config.inference_mode:
        init_prompt_table(table.embedding.weight, config, words)
    return PromptTuningDelta(table, config.num_virtual_tokens)


SPEC = register(
    MethodSpec(
        name="prompt_tuning",
        peft_type=PromptTuningConfig.PEFT_TYPE,
        config_cls=PromptTuningConfig,
        kind="input",
        make_input=make_prompt_tuning,
    )
)

__all__ = ["SPEC", "PromptTuningConfig", "PromptTuningDelta", "make_prompt_tuning"]
