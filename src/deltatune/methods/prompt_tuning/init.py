"""Starting values of prompt tuning's virtual tokens (Lester et al., arXiv 2104.08691, section 3.2)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ...errors import ConfigError
from .config import PromptTuningConfig


def load_tokenizer(source: Any, kwargs: dict[str, Any] | None) -> Any:
    """``source`` itself when it is a tokenizer object, else ``AutoTokenizer.from_pretrained(source)``."""
    if not isinstance(source, str):
        if not callable(source):
            raise ConfigError(f"tokenizer_name_or_path must be a tokenizer or a path; got {type(source).__name__}.")
        return source
    from transformers import AutoTokenizer

    options = dict(kwargs or {})
    options.pop("trust_remote_code", None)  # loading an adapter must never run downloaded code
    try:
        return AutoTokenizer.from_pretrained(source, **options)
    except Exception as exc:
        raise ConfigError(
            f"prompt_tuning_init='TEXT' could not load a tokenizer from {source!r} ({type(exc).__name__}: {exc}). "
            "Pass a tokenizer object, or the local folder holding the model's tokenizer files."
        ) from exc


def text_token_ids(config: PromptTuningConfig, rows: int) -> list[int]:
    """The init text's token ids, repeated or cut to ``rows`` (HF peft's rule)."""
    if config.tokenizer_name_or_path is None:
        raise ConfigError(
            "prompt_tuning_init='TEXT' needs a tokenizer: set tokenizer_name_or_path to a tokenizer object or "
            "to the local folder of the model's tokenizer."
        )
    tokenizer = load_tokenizer(config.tokenizer_name_or_path, config.tokenizer_kwargs)
    ids = list(tokenizer(config.prompt_tuning_init_text)["input_ids"])
    if not ids:
        raise ConfigError(f"prompt_tuning_init_text={config.prompt_tuning_init_text!r} gives no tokens.")
    return (ids * math.ceil(rows / len(ids)))[:rows]


def init_prompt_table(weight: torch.Tensor, config: PromptTuningConfig, word_embeddings: nn.Module) -> None:
    """Fill ``weight`` (rows, D) in place as ``config.prompt_tuning_init`` says (``RANDOM`` keeps ``N(0, 1)``)."""
    rows = weight.shape[0]
    if config.prompt_tuning_init == "RANDOM":
        return
    vocab = getattr(word_embeddings, "num_embeddings", None) or word_embeddings.weight.shape[0]
    if config.prompt_tuning_init == "SAMPLE_VOCAB":
        ids = torch.randint(0, vocab, (rows,)).tolist()
    else:
        ids = text_token_ids(config, rows)
        if max(ids) >= vocab:
            raise ConfigError(
                f"The tokenizer gives token id {max(ids)} but the model has only {vocab} embeddings; "
                "use the tokenizer that belongs to this model."
            )
    device = next(word_embeddings.parameters()).device
    with torch.no_grad():
        vectors = word_embeddings(torch.tensor(ids, dtype=torch.long, device=device))  # (rows, D)
        weight.copy_(vectors.to(weight.dtype))
