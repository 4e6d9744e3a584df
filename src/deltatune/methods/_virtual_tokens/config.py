"""``VirtualTokenConfig``: the fields prompt tuning, P-tuning and prefix tuning share.

Names and meaning follow HF peft's ``PromptLearningConfig`` so ``adapter_config.json`` files load in
either library. The model-derived fields (``token_dim``, ``num_layers`` ...) are left ``None`` by the
user and filled from the model when the adapter is created, as peft does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...config import DeltaConfig
from ...errors import ConfigError


def _positive(name: str, value: Any, optional: bool = True) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer{' or None' if optional else ''}; got {value!r}.")


@dataclass
class VirtualTokenConfig(DeltaConfig):
    """Shared fields of the virtual-token methods.

    Attributes:
        num_virtual_tokens: how many virtual tokens (prompt methods) or prefix positions (prefix
            tuning) the adapter adds.
        token_dim: width of one virtual token: the input embedding size for prompt methods; for
            prefix tuning ``num_attention_heads * head_dim`` of the key/value cache. Filled from the model.
        num_transformer_submodules: HF peft's count of stacks that get virtual tokens (1, or 2 for
            its ``SEQ_2_SEQ_LM`` default). deltatune writes 1 for new adapters; 2 is read from peft
            files and reproduced exactly (see each method for what it means there).
        num_attention_heads: attention heads of the model (prefix tuning: key/value heads). Filled.
        num_layers: transformer layers of the model (prefix tuning: layers that read a cache). Filled.
    """

    num_virtual_tokens: int = 20
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive("num_virtual_tokens", self.num_virtual_tokens, optional=False)
        for name in ("token_dim", "num_attention_heads", "num_layers"):
            _positive(name, getattr(self, name))
        if self.num_transformer_submodules not in (None, 1, 2):
            raise ConfigError(f"num_transformer_submodules must be 1, 2 or None; got {self.num_transformer_submodules!r}.")

    @property
    def total_virtual_tokens(self) -> int:
        """Rows of the stored table: ``num_virtual_tokens * num_transformer_submodules``."""
        return self.num_virtual_tokens * (self.num_transformer_submodules or 1)


def text_config(model: nn.Module) -> Any:
    """The language part of a model's transformers config (``None`` for a plain module)."""
    config = getattr(model, "config", None)
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config


def input_embeddings(model: nn.Module) -> nn.Module:
    """The model's token embedding module, through transformers' generic ``get_input_embeddings()``."""
    getter = getattr(model, "get_input_embeddings", None)
    module = getter() if callable(getter) else None
    if module is None:
        raise ConfigError(
            f"{type(model).__name__} has no get_input_embeddings(); virtual-token methods need a model whose "
            "token embeddings they can find (a transformers model, or one that defines get_input_embeddings())."
        )
    return module


def embedding_dim(model: nn.Module) -> int:
    """Width of the model's token embeddings."""
    module = input_embeddings(model)
    dim = getattr(module, "embedding_dim", None)
    if dim is None:
        weight = getattr(module, "weight", None)
        dim = weight.shape[-1] if weight is not None else None
    if dim is None:
        raise ConfigError(f"Cannot tell the embedding width of {type(module).__name__}; set token_dim in the config.")
    return int(dim)


def fill_from_model(config: VirtualTokenConfig, model: nn.Module) -> None:
    """Fill the model-derived fields left ``None`` (HF peft does the same when it wraps a model)."""
    cfg = text_config(model)
    if config.num_layers is None:
        config.num_layers = getattr(cfg, "num_hidden_layers", None)
    if config.num_attention_heads is None:
        config.num_attention_heads = getattr(cfg, "num_attention_heads", None)
    if config.num_transformer_submodules is None:
        config.num_transformer_submodules = 1


def fill_token_dim(config: VirtualTokenConfig, model: nn.Module) -> int:
    """Set ``config.token_dim`` to the width of ``model``'s token embeddings and return it.

    A ``token_dim`` already set (from a saved adapter) must agree: otherwise the adapter was made for
    another model.
    """
    dim = embedding_dim(model)
    if config.token_dim is not None and config.token_dim != dim:
        raise ConfigError(
            f"token_dim={config.token_dim} but {type(model).__name__}'s token embeddings are {dim} wide; "
            "the adapter belongs to another model (or leave token_dim unset)."
        )
    config.token_dim = dim
    return dim


def is_encoder_decoder(model: nn.Module) -> bool:
    """Whether ``model`` is a transformers encoder-decoder (T5, BART ...)."""
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def embed_inputs(model: nn.Module, call: dict[str, Any]) -> torch.Tensor:
    """The input embeddings of a keyword call ``(B, S, D)``; ``input_ids`` / ``inputs_embeds`` are popped from ``call``."""
    ids = call.pop("input_ids", None)
    embeds = call.pop("inputs_embeds", None)
    if embeds is not None:
        return embeds
    if ids is None:
        raise ConfigError("Virtual tokens need the model input: pass input_ids or inputs_embeds.")
    return input_embeddings(model)(ids)  # (B, S, D)
