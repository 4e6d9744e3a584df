"""One forward of a batch whose rows use different adapters (or the base model).

``forward_rows(model, names, inputs, tensors)`` runs the causal LM on ``inputs`` with row ``b`` seeing
adapter ``names[b]`` (``BASE`` for the base model alone) and the cached keys/values ``tensors``; it
returns each row's next-token logits and the grown cache. The routing is the core's mixed-adapter
batch (``delta_model(**batch, adapter_names=[...])``, HF peft's keyword and sentinel): one call for
the whole batch, whatever mix of adapters it holds.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from torch import nn

from ..model import DeltaModel
from .batch_cache import layer_tensors

BASE = "__base__"

Tensors = list[tuple[torch.Tensor, torch.Tensor]]

_SIGNATURES: dict[type, set[str]] = {}


def causal_lm(model: nn.Module) -> nn.Module:
    """The transformers model inside a :class:`DeltaModel` (or the model itself)."""
    return model.base_model if isinstance(model, DeltaModel) else model


def _accepts(model: nn.Module, name: str) -> bool:
    """Whether the causal LM's ``forward`` takes keyword ``name`` (read once per model class)."""
    lm = causal_lm(model)
    if type(lm) not in _SIGNATURES:
        _SIGNATURES[type(lm)] = set(inspect.signature(lm.forward).parameters)
    return name in _SIGNATURES[type(lm)]


def _cache_of(tensors: Tensors) -> object:
    """A transformers ``DynamicCache`` that holds ``tensors`` without copying them."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache()
    layers = []
    for keys, values in tensors:
        layer = DynamicLayer()
        layer.lazy_initialization(keys, values)
        layer.keys, layer.values = keys, values
        layers.append(layer)
    if layers:
        cache.layers = layers
    return cache


@torch.no_grad()
def forward_rows(model: nn.Module, names: Sequence[str], inputs: dict[str, torch.Tensor],
                 tensors: Tensors) -> tuple[torch.Tensor, Tensors]:
    """Next-token logits ``(B, V)`` of every row with its own adapter, and the cache one step longer."""
    cache = _cache_of(tensors)
    kwargs: dict[str, object] = {"cache" if _accepts(model, "cache") else "past_key_values": cache, "use_cache": True}
    if _accepts(model, "logits_to_keep"):
        kwargs["logits_to_keep"] = 1
    if isinstance(model, DeltaModel):
        kwargs["adapter_names"] = list(names)
    elif any(name != BASE for name in names):  # no adapter loaded: only the base can be asked for
        raise ValueError(f"adapters {sorted(set(names) - {BASE})} asked of a model without adapters")
    out = model(**inputs, **kwargs)
    return out.logits[:, -1, :], layer_tensors(cache)  # (B, V)
