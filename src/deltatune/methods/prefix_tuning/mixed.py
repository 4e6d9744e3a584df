"""Prefix tuning in a mixed-adapter batch: each row with its own key/value prefix (or none).

Row ``b`` has ``P_b`` prefix positions (``0`` for rows of the base model or of a layer method). The
cache holds ``P = max P_b`` positions per layer, row ``b``'s prefix in its last ``P_b`` with zeros
before it, and the attention mask gains ``[0]*(P - P_b) + [1]*P_b`` in front, so no query attends to
the padding. Positions follow the solo run: the input starts at position ``P_b`` (passed as
``position_ids``; ``generate`` derives the same from the mask). Decoder-only and encoder models;
encoder-decoder models and ``encoder_prefix`` are refused (use one adapter per call there).
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ...errors import ConfigError
from ...routing import Routing
from .cache import KVLayout, _new_cache

if TYPE_CHECKING:
    from transformers import Cache

PrefixTuningDelta = Any  # the package's class (it imports this module); read: layout, extra_sites, table()


def _check(deltas: dict[str, PrefixTuningDelta]) -> KVLayout:
    layout = next(iter(deltas.values())).layout
    if layout.encoder_decoder or any(d.extra_sites for d in deltas.values()):
        raise ConfigError(
            "Prefix-tuning adapters of an encoder-decoder model cannot share a mixed-adapter batch yet; call them "
            "one adapter at a time (set_adapter), or use prompt tuning / a layer method for mixed batches."
        )
    return layout


def routed_prefixes(deltas: dict[str, PrefixTuningDelta], routing: Routing, rows: int,
                    dtype: torch.dtype) -> tuple[Cache, torch.Tensor, int, KVLayout]:
    """A cache with each of ``rows`` rows' own prefix (left-padded), the ``(rows, P)`` mask and ``P``."""
    layout = _check(deltas)
    names = routing.name_of_row()
    repeat = rows // len(names)  # generate: each example's beams / returned sequences
    tables = {n: d.table().to(dtype) for n, d in deltas.items()}  # (P_n, L*2*H*Dh)
    width = max(t.shape[0] for t in tables.values())
    flat = next(iter(tables.values())).shape[1]
    device = next(iter(tables.values())).device
    block = torch.zeros(len(names), width, flat, dtype=dtype, device=device)
    mask = torch.zeros(len(names), width, dtype=torch.long, device=device)
    for b, name in enumerate(names):
        table = tables.get(name)
        if table is not None:
            block[b, width - table.shape[0] :] = table
            mask[b, width - table.shape[0] :] = 1
    if repeat > 1:
        block, mask = block.repeat_interleave(repeat, 0), mask.repeat_interleave(repeat, 0)
    kv = block.view(rows, width, -1, layout.num_heads, layout.head_dim).permute(2, 0, 3, 1, 4)  # (2L, B, H, P, Dh)
    cache = _new_cache(False)
    for layer in range(layout.num_layers):
        cache.update(kv[2 * layer].contiguous(), kv[2 * layer + 1].contiguous(), layer)
    return cache, mask, width, layout


def run_routed(model: nn.Module, call: dict[str, Any], routing: Routing, deltas: dict[str, PrefixTuningDelta],
               batch: int, dtype: torch.dtype) -> Any:
    """``model(**call)`` with every row's own prefix in the cache."""
    cache, prefix_mask, _, layout = routed_prefixes(deltas, routing, batch, dtype)
    seq = next(call[k] for k in ("input_ids", "inputs_embeds") if call.get(k) is not None).shape[1]
    mask = call.get("attention_mask")
    if mask is None:
        mask = torch.ones(batch, seq, dtype=torch.long, device=prefix_mask.device)
    call["attention_mask"] = torch.cat([prefix_mask.to(mask.dtype), mask], dim=1)
    if call.get("position_ids") is None and "position_ids" in inspect.signature(model.forward).parameters:
        lengths = prefix_mask.sum(1, keepdim=True)  # (B, 1)
        call["position_ids"] = lengths + torch.arange(seq, device=lengths.device)  # the solo run's positions
    call[layout.cache_kwarg] = cache
    return model(**call)


def generate_routed(model: nn.Module, kwargs: dict[str, Any], routing: Routing,
                    deltas: dict[str, PrefixTuningDelta], expand: int, dtype: torch.dtype) -> Any:
    """``model.generate`` with every row's own prefix in the cache at every step."""
    kwargs = dict(kwargs)
    source = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"]
    batch, seq = source.shape[:2]
    cache, prefix_mask, _, layout = routed_prefixes(deltas, routing, batch * expand, dtype)
    mask = kwargs.get("attention_mask")
    if mask is None:
        mask = torch.ones(batch, seq, dtype=torch.long, device=source.device)
    kwargs["attention_mask"] = torch.cat([prefix_mask[::expand].to(mask.dtype), mask], dim=1)
    kwargs[layout.cache_kwarg] = cache
    kwargs["use_cache"] = True
    return model.generate(**kwargs)
