"""Reading a model's structure: which module plays which role (attention projections, feed-forward, ...).

See :mod:`deltatune.model_interface` for the API methods use (roles, regexes, overrides).
"""

from __future__ import annotations

from .infer import AttentionSite, FeedForwardSite, ModelRoles, attention_heads, infer_roles, text_config
from .modules import (
    is_linear_like,
    is_norm_layer,
    is_transposed_linear,
    linear_dims,
    original_modules,
    residual_input_arg,
    row_major_weight,
    unwrapped,
)

__all__ = [
    "AttentionSite",
    "FeedForwardSite",
    "ModelRoles",
    "attention_heads",
    "infer_roles",
    "is_linear_like",
    "is_norm_layer",
    "is_transposed_linear",
    "linear_dims",
    "original_modules",
    "residual_input_arg",
    "row_major_weight",
    "text_config",
    "unwrapped",
]
