"""Shared code of the virtual-token methods (prompt tuning, P-tuning, prefix tuning)."""

from __future__ import annotations

from .config import (
    VirtualTokenConfig,
    embedding_dim,
    fill_from_model,
    fill_token_dim,
    input_embeddings,
    is_encoder_decoder,
)
from .prompts import VirtualTokenDelta, generate_with_prompts, prepend_prompts
from .table import ReparamTable

__all__ = [
    "ReparamTable", "VirtualTokenConfig", "VirtualTokenDelta", "embedding_dim", "fill_from_model", "fill_token_dim",
    "generate_with_prompts", "input_embeddings", "is_encoder_decoder", "prepend_prompts",
]
