"""Forwards of a batch whose rows use different adapters (or the base model).

``prefill_rows(model, names, inputs)`` runs the first forward of new sequences, row ``b`` with adapter
``names[b]`` (``BASE`` for the base model alone), through the core's mixed-adapter batch
(``delta_model(**batch, adapter_names=[...])``, HF peft's keyword and sentinel). Whatever the row's
adapter adds in front of its input (an input method's virtual tokens or key/value prefix) enters the
row's cache there, at the positions of the solo ``generate``; the cache's attention mask is the
input's with :func:`deltatune.mixed_batch.leading_mask` in front:

    cache row b = [pad .. ; lead_1 .. lead_{P_b} ; pad .. ; x_1 .. x_{S_b}]     (P + S columns)

``step_rows(model, names, inputs, tensors)`` runs one decoding step on the cached keys/values: the
input methods' part is in the cache, so only layer methods route
(:func:`deltatune.mixed_batch.routed_continuation`). Rows of every kind share that one call. Both
return each row's next-token logits and the cache; the serve code never asks which method a row uses.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from torch import nn

from ..mixed_batch import input_groups, leading_mask, routed_continuation
from ..model import DeltaModel
from .batch_cache import layer_tensors

BASE = "__base__"

Tensors = list[tuple[torch.Tensor, torch.Tensor]]

_SIGNATURES: dict[type, set[str]] = {}


def causal_lm(model: nn.Module) -> nn.Module:
    """The transformers model inside a :class:`DeltaModel` (or the model itself)."""
    return model.get_base_model() if isinstance(model, DeltaModel) else model


def _accepts(model: nn.Module, name: str) -> bool:
    """Whether the causal LM's ``forward`` takes keyword ``name`` (read once per model class)."""
    lm = causal_lm(model)
    if type(lm) not in _SIGNATURES:
        _SIGNATURES[type(lm)] = set(inspect.signature(lm.forward).parameters)
    return name in _SIGNATURES[type(lm)]


def _cache_kwarg(model: nn.Module) -> str:
    return "cache" if _accepts(model, "cache") else "past_key_values"


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


def _common(model: nn.Module, names: Sequence[str]) -> dict[str, object]:
    kwargs: dict[str, object] = {"use_cache": True}
    if _accepts(model, "logits_to_keep"):
        kwargs["logits_to_keep"] = 1
    if not isinstance(model, DeltaModel) and any(name != BASE for name in names):
        raise ValueError(f"adapters {sorted(set(names) - {BASE})} asked of a model without adapters")
    return kwargs


def prefill_groups(model: nn.Module, names: Sequence[str]) -> list[list[int]]:
    """Rows of ``names`` that may share one :func:`prefill_rows` call (one input-method family each)."""
    if not isinstance(model, DeltaModel):
        return [list(range(len(names)))]
    return input_groups(model, list(names))


@torch.no_grad()
def prefill_rows(model: nn.Module, names: Sequence[str], inputs: dict[str, torch.Tensor]
                 ) -> tuple[torch.Tensor, Tensors, torch.Tensor]:
    """First forward of new rows: logits ``(B, V)``, the cache ``(B, H, P + S, D)`` per layer and its mask ``(B, P + S)``."""
    kwargs = _common(model, names)
    if isinstance(model, DeltaModel):
        out = model(**inputs, **kwargs, adapter_names=list(names))
        lead = leading_mask(model, list(names)).to(inputs["attention_mask"])  # (B, P)
    else:
        out = model(**inputs, **kwargs)
        lead = inputs["attention_mask"][:, :0]
    cache = getattr(out, "cache", None)  # transformers >= 5.x; older: past_key_values
    cache = cache if cache is not None else out.past_key_values
    tensors = layer_tensors(cache)
    mask = torch.cat([lead, inputs["attention_mask"]], dim=1)
    if tensors and tensors[0][0].shape[-2] != mask.shape[1]:
        raise RuntimeError(f"the first forward cached {tensors[0][0].shape[-2]} positions per row, but the adapters "
                           f"account for {mask.shape[1]} (input {inputs['attention_mask'].shape[1]}, in front "
                           f"{lead.shape[1]}); this model's cache layout cannot be batched by the server")
    return out.logits[:, -1, :], tensors, mask


@torch.no_grad()
def step_rows(model: nn.Module, names: Sequence[str], inputs: dict[str, torch.Tensor],
              tensors: Tensors) -> tuple[torch.Tensor, Tensors]:
    """Next-token logits ``(B, V)`` of every row with its own adapter, and the cache one step longer."""
    cache = _cache_of(tensors)
    kwargs = {**_common(model, names), _cache_kwarg(model): cache, **inputs}
    if isinstance(model, DeltaModel):
        out = routed_continuation(model, list(names), kwargs)
    else:
        out = model(**kwargs)
    return out.logits[:, -1, :], layer_tensors(cache)
