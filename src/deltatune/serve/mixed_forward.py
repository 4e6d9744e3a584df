"""One forward of a batch whose rows use different adapters (or the base model).

``forward_rows(model, names, inputs, tensors)`` runs the causal LM on ``inputs`` with row ``b`` seeing
adapter ``names[b]`` (``BASE`` for the base model alone) and the cached keys/values ``tensors``; it
returns each row's next-token logits and the grown cache.

The mixed-batch path of the core (issue 12: ``delta_model(**batch, adapter_names=[...])``, HF peft's
API) serves the whole batch in one call. Where the core lacks it (before issue 12), :func:`forward_rows`
falls back to one call per adapter group (rows split by adapter, cache rows gathered and scattered
back): :func:`_forward_per_adapter`; :func:`core_mixes_adapters` decides which path runs.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from ..model import DeltaModel
from .batch_cache import layer_tensors

BASE = "__base__"



def core_mixes_adapters() -> bool:
    """Whether ``DeltaModel.forward(..., adapter_names=[...])`` (issue 12) routes each row to its adapter."""
    return "adapter_names" in inspect.signature(DeltaModel.forward).parameters


MIXED_BATCH_FORWARD = core_mixes_adapters()

Tensors = list[tuple[torch.Tensor, torch.Tensor]]


def causal_lm(model: nn.Module) -> nn.Module:
    """The transformers model inside a :class:`DeltaModel` (or the model itself)."""
    return model.base_model if isinstance(model, DeltaModel) else model


_SIGNATURES: dict[type, set[str]] = {}


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


def _call(model: nn.Module, inputs: dict[str, torch.Tensor], tensors: Tensors,
          adapter_names: list[str] | None = None) -> tuple[torch.Tensor, Tensors]:
    cache = _cache_of(tensors)
    kwargs: dict[str, object] = {"cache" if _accepts(model, "cache") else "past_key_values": cache, "use_cache": True}
    if _accepts(model, "logits_to_keep"):
        kwargs["logits_to_keep"] = 1
    if adapter_names is not None:
        kwargs["adapter_names"] = adapter_names
    out = model(**inputs, **kwargs)
    return out.logits[:, -1, :], layer_tensors(cache)  # (B, V)


@contextlib.contextmanager
def _only_adapter(model: nn.Module, name: str) -> Iterator[None]:
    """Inside, ``model`` computes with adapter ``name`` alone (or the bare base for ``BASE``)."""
    if not isinstance(model, DeltaModel):
        yield
    elif name == BASE:
        with model.disable_adapter():
            yield
    else:
        if model.active_adapters != [name]:
            model.set_adapter(name)
        yield


def _forward_per_adapter(model: nn.Module, names: Sequence[str], inputs: dict[str, torch.Tensor],
                         tensors: Tensors) -> tuple[torch.Tensor, Tensors]:
    """Fallback while the core lacks mixed batches: one call per adapter, cache rows split and rejoined."""
    groups: dict[str, list[int]] = {}
    for row, name in enumerate(names):
        groups.setdefault(name, []).append(row)
    if len(groups) == 1:
        with _only_adapter(model, names[0]):
            return _call(model, inputs, tensors)
    logits: torch.Tensor | None = None
    grown: list[list[torch.Tensor]] = []
    for name, rows in groups.items():
        index = torch.tensor(rows)
        sub_inputs = {k: v.index_select(0, index) for k, v in inputs.items()}
        sub_tensors = [(k.index_select(0, index), v.index_select(0, index)) for k, v in tensors]
        with _only_adapter(model, name):
            sub_logits, sub_grown = _call(model, sub_inputs, sub_tensors)
        if logits is None:
            logits = sub_logits.new_empty(len(names), sub_logits.shape[-1])  # (B, V)
            grown = [[t.new_empty(len(names), *t.shape[1:]) for t in pair] for pair in sub_grown]
        logits.index_copy_(0, index, sub_logits)
        for full, part in zip(grown, sub_grown):
            full[0].index_copy_(0, index, part[0])
            full[1].index_copy_(0, index, part[1])
    assert logits is not None
    return logits, [(k, v) for k, v in grown]


@torch.no_grad()
def forward_rows(model: nn.Module, names: Sequence[str], inputs: dict[str, torch.Tensor],
                 tensors: Tensors) -> tuple[torch.Tensor, Tensors]:
    """Next-token logits ``(B, V)`` of every row with its own adapter, and the cache one step longer."""
    if MIXED_BATCH_FORWARD and isinstance(model, DeltaModel):
        return _call(model, inputs, tensors, adapter_names=list(names))
    return _forward_per_adapter(model, names, inputs, tensors)
