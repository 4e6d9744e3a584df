"""P-tuning (Liu et al., arXiv 2103.10385): virtual tokens produced by a small trainable encoder.

    p_1 ... p_P = f(e_1 ... e_P),   f = MLP or MLP(BiLSTM),   e_i in R^D trainable
    inputs_embeds' = [p_1 ... p_P ; embed(x_1) ... embed(x_S)]

Trains the table ``e`` and the encoder ``f`` (plus ``modules_to_save``); the model stays frozen.
The encoder only reparameterises the prompt for easier optimisation, so the saved form, as in HF
peft, is its output ``p`` under ``prompt_embeddings``. Loading keeps ``p`` as a plain trainable
table without the encoder: outputs are exactly those that were saved, and training can go on from
there (as prompt tuning). Encoder-decoder models get the virtual tokens on the encoder input.
Cannot be merged into the weights.
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
from .config import PTuningConfig
from .encoder import LstmEncoder, make_encoder, mlp_encoder


class PTuningDelta(VirtualTokenDelta):
    """The virtual-token table and prompt encoder of one P-tuning adapter."""

    method_name = "p_tuning"


def make_p_tuning(model: nn.Module, config: PTuningConfig, adapter_name: str) -> PTuningDelta:
    """Fill the config from ``model`` and build table + encoder (only the table when loading for inference)."""
    dim = fill_token_dim(config, model)
    fill_from_model(config, model)
    if config.encoder_hidden_size is None:
        config.encoder_hidden_size = dim
    encoder = None if config.inference_mode else make_encoder(config)
    table = ReparamTable(config.total_virtual_tokens, dim, encoder)
    return PTuningDelta(table.to(next(input_embeddings(model).parameters()).device), config.num_virtual_tokens)


SPEC = register(
    MethodSpec(
        name="p_tuning",
        peft_type=PTuningConfig.PEFT_TYPE,
        config_cls=PTuningConfig,
        kind="input",
        make_input=make_p_tuning,
    )
)

__all__ = ["SPEC", "LstmEncoder", "PTuningConfig", "PTuningDelta", "make_encoder", "make_p_tuning", "mlp_encoder"]
