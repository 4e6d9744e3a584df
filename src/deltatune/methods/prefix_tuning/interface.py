"""Prefixes for models whose attention reads no key/value cache, through transformers' attention interface.

    head_l = softmax(q [P_k^l ; K]^T * scale + [0 ; mask]) [P_v^l ; V]

Encoders such as DistilBERT or ALBERT take no cache, so the cache route of :mod:`.cache` has no place
for prefixes. Their attention modules call the function ``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]``
with the projected ``query, key, value`` ``(B, H, S, Dh)`` and the attention mask. For one model call
deltatune switches that name to a registered function that puts the layer's prefix in front of the
keys and values, gives the mask ``P`` attendable columns, and calls PyTorch's scaled-dot-product
attention (transformers' ``"sdpa"`` function). Which modules are the self-attention layers and how
wide their keys are comes from :mod:`deltatune.model_interface`. A model whose attention does not go
through the interface gets the clear error of the cache route.

Saved as the cache route saves: ``prompt_embeddings`` ``(P, L * 2 * D)``, layer 0 keys, layer 0 values, ...
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ...errors import ConfigError
from ...model_interface import model_roles
from ...structure import linear_dims, original_modules

NAME = "deltatune_prefix"
_ACTIVE: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(attention module) -> (P, D) keys, values
_CALLED: set[int] = set()


def _heads(prefix: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``(P, H * Dh)`` -> ``(B, H, P, Dh)`` in the dtype of ``like`` (keys ``(B, H, S, Dh)``)."""
    rows = prefix.to(like.dtype).view(prefix.shape[0], -1, like.shape[-1]).transpose(0, 1)  # (H, P, Dh)
    return rows.unsqueeze(0).expand(like.shape[0], -1, -1, -1)


def _widen(mask: torch.Tensor, n: int) -> torch.Tensor:
    fill = True if mask.dtype == torch.bool else 0.0
    return torch.cat([torch.full((*mask.shape[:-1], n), fill, dtype=mask.dtype, device=mask.device), mask], dim=-1)


def _prefixed_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    _CALLED.add(id(module))
    entry = _ACTIVE.get(id(module))
    if entry is not None:
        keys, values = entry
        n = keys.shape[0]
        if attention_mask is not None and attention_mask.shape[-1] == key.shape[-2]:
            attention_mask = _widen(attention_mask, n)  # (B, 1, Q, P + S)
        key = torch.cat([_heads(keys, key), key], dim=-2)  # (B, H, P + S, Dh)
        value = torch.cat([_heads(values, value), value], dim=-2)
    return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, **kwargs)


def _register() -> None:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if NAME not in ALL_ATTENTION_FUNCTIONS:
        ALL_ATTENTION_FUNCTIONS.register(NAME, _prefixed_attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)


def _configs(model: nn.Module) -> list[Any]:
    found: dict[int, Any] = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            found[id(config)] = config
    return list(found.values())


@contextmanager
def switched(model: nn.Module, prefixes: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]]) -> Iterator[None]:
    """For one call: the model's attention goes through :func:`_prefixed_attention` with ``prefixes``."""
    _register()
    configs = _configs(model)
    saved = [(c, c._attn_implementation) for c in configs]
    for module, kv in prefixes.items():
        _ACTIVE[id(module)] = kv
    try:
        for config in configs:
            config._attn_implementation = NAME
        yield
    finally:
        for config, name in saved:
            config._attn_implementation = name
        for module in prefixes:
            _ACTIVE.pop(id(module), None)


def interface_sites(model: nn.Module) -> list[tuple[nn.Module, int]]:
    """``[(attention module, key width D)]`` of every self-attention that goes through the attention interface.

    Raises:
        ConfigError: the model has self-attention modules that the interface does not reach.
    """
    modules = original_modules(model)
    found = [s for s in model_roles(model).attention if not s.cross and (s.k or s.qkv)]
    sites = [(modules[s.path], linear_dims(modules[s.k or s.qkv])[1]) for s in found]  # type: ignore[index]
    if not sites:
        raise ConfigError(f"{type(model).__name__} has no self-attention module deltatune can find.")
    _CALLED.clear()
    token = torch.ones(1, 2, dtype=torch.long, device=next(model.parameters()).device)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad(), switched(model, {}):
            model(input_ids=token, attention_mask=torch.ones_like(token))
    finally:
        for module, mode in modes:
            module.training = mode
    missed = [type(m).__name__ for m, _ in sites if id(m) not in _CALLED]
    if missed:
        raise ConfigError(f"the attention of {type(model).__name__} ({missed[0]}) does not go through transformers' "
                          "attention interface")
    return sites


__all__ = ["NAME", "interface_sites", "switched"]
