"""Prefix tuning in a mixed-adapter batch: each row with its own key/value prefix (or none).

Row ``b`` has ``P_b`` prefix positions (``0`` for rows of the base model or of a layer method). The
cache holds ``P = max P_b`` positions per layer, row ``b``'s prefix in its last ``P_b`` with zeros
before it, and the (decoder) attention mask gains ``[0]*(P - P_b) + [1]*P_b`` in front, so no query
attends to the padding. Positions follow the solo run:

* decoder-only and encoder models: the input starts at position ``P_b`` (passed as ``position_ids``;
  ``generate`` derives the same from the mask). Explicit ``position_ids`` count the input's own tokens
  (as in the virtual-token mixed batch) and are shifted by ``P_b``, so a left-padded input keeps each
  row's solo positions;
* encoder-decoder models: the prefixes sit in the decoder self-attention cache, each adapter's layers
  fed from its own stored blocks (HF peft's ``2l mod L`` pairing included). The decoder's positions
  start after the whole cache, which equals the solo run only where positions are relative (T5's
  bias depends on ``key - query``, the same for every real column whatever the padding). A probe run
  once per model (:func:`padding_is_position_free`) checks that a masked padding column changes
  nothing; decoders with absolute positions (BART) are refused with a clear error when the prefix
  counts of the batch differ.

``encoder_prefix`` adapters also get their encoder self-attention and decoder cross-attention
prefixes per row (:mod:`.mixed_sites`).
"""

from __future__ import annotations

import inspect
import weakref
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ...errors import ConfigError
from ...routing import Routing, routed
from .cache import KVLayout, _new_cache
from .mixed_sites import attached_rows

if TYPE_CHECKING:
    from transformers import Cache

PrefixTuningDelta = Any  # the package's class (it imports this module); read: layout, blocks, extra_sites, table()

_POSITION_FREE: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


def _check(deltas: dict[str, PrefixTuningDelta]) -> KVLayout:
    return next(iter(deltas.values())).layout


def _site_groups(deltas: dict[str, PrefixTuningDelta], routing: Routing,
                 dtype: torch.dtype) -> list[tuple[list[Any], torch.Tensor, torch.Tensor]]:
    """``encoder_prefix`` tables per row, one group per role: ``(sites, (B, P, flat), visible (B, P))``."""
    extra = {n: d for n, d in deltas.items() if d.extra_sites}
    if not extra:
        return []
    names = routing.name_of_row()
    groups = []
    for g, sites in enumerate(next(iter(extra.values())).extra_sites):
        tables = {n: d.extra_tables[g]().to(dtype) for n, d in extra.items()}  # (P_n, flat)
        width = max(t.shape[0] for t in tables.values())
        first = next(iter(tables.values()))
        block = first.new_zeros(len(names), width, first.shape[1])  # (B, P, flat)
        visible = torch.zeros(len(names), width, dtype=torch.bool, device=first.device)  # (B, P)
        for b, name in enumerate(names):
            table = tables.get(name)
            if table is not None:
                block[b, width - table.shape[0] :] = table
                visible[b, width - table.shape[0] :] = True
        groups.append((sites, block, visible))
    return groups


def _by_model_layer(delta: PrefixTuningDelta, dtype: torch.dtype) -> torch.Tensor:
    """Adapter ``delta``'s prefix table ``(P_n, L*2*D)`` with block ``l`` the one model layer ``l`` reads."""
    table = delta.table().to(dtype)  # (P_n, blocks*2*D)
    blocks = list(delta.blocks)
    if blocks == list(range(len(blocks))):
        return table
    width = 2 * delta.layout.num_heads * delta.layout.head_dim
    return table.view(table.shape[0], -1, width)[:, blocks].reshape(table.shape[0], -1)


def padding_is_position_free(model: nn.Module, layout: KVLayout, dtype: torch.dtype) -> bool:
    """Whether a masked padding column in front of the decoder cache leaves the output unchanged.

    Runs the model twice on one token (outside the routing, in eval mode, once per model): with a
    one-position cache, and with the same cache behind one masked zero column."""
    found = _POSITION_FREE.get(model)
    if found is not None:
        return found
    device = next(model.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(0)
    kv = torch.randn(2, 1, layout.num_heads, 1, layout.head_dim, generator=gen).to(device, dtype)
    token = torch.zeros(1, 1, dtype=torch.long, device=device)
    outputs = []
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        for pad in (0, 1):
            cache = _new_cache(layout.encoder_decoder)
            target = getattr(cache, "self_attention_cache", cache)
            keys = torch.cat([torch.zeros_like(kv[:, :, :, :pad]), kv], dim=3)  # (2, 1, H, 1 + pad, Dh)
            for layer in range(layout.num_layers):
                target.update(keys[0], keys[1], layer)
            mask = torch.tensor([[0] * pad + [1, 1]], device=device)
            with routed(None), torch.no_grad():
                out = model(input_ids=token, attention_mask=torch.ones_like(token), decoder_input_ids=token,
                            decoder_attention_mask=mask, **{layout.cache_kwarg: cache})
            outputs.append(out[0].float())
    finally:
        for module, mode in modes:
            module.training = mode
    found = bool(torch.allclose(outputs[0], outputs[1], rtol=1e-4, atol=1e-5))
    _POSITION_FREE[model] = found
    return found


def _refuse_absolute_positions(model: nn.Module, layout: KVLayout, counts: set[int], dtype: torch.dtype) -> None:
    if layout.encoder_decoder and len(counts) > 1 and not padding_is_position_free(model, layout, dtype):
        raise ConfigError(
            f"{type(model).__name__}'s decoder counts positions from the length of its cache, so rows with different "
            f"prefix lengths {sorted(counts)} (0: no prefix) cannot share a mixed-adapter batch exactly. Batch rows "
            "whose adapters have equal num_virtual_tokens (and no rows without a prefix), or call one adapter at a time."
        )


def routed_prefixes(deltas: dict[str, PrefixTuningDelta], routing: Routing, rows: int,
                    dtype: torch.dtype) -> tuple[Cache, torch.Tensor, int, KVLayout]:
    """A cache with each of ``rows`` rows' own prefix (left-padded), the ``(rows, P)`` mask and ``P``."""
    layout = _check(deltas)
    names = routing.name_of_row()
    repeat = rows // len(names)  # generate: each example's beams / returned sequences
    tables = {n: _by_model_layer(d, dtype) for n, d in deltas.items()}  # (P_n, L*2*H*Dh)
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
    cache = _new_cache(layout.encoder_decoder)
    target = getattr(cache, "self_attention_cache", cache)  # encoder-decoder: the decoder's self-attention
    for layer in range(layout.num_layers):
        target.update(kv[2 * layer].contiguous(), kv[2 * layer + 1].contiguous(), layer)
    return cache, mask, width, layout


def _counts(routing: Routing, deltas: dict[str, PrefixTuningDelta]) -> set[int]:
    """The distinct prefix lengths of the batch's rows (0: a row without a prefix)."""
    return {deltas[n].num_virtual_tokens if n in deltas else 0 for n in routing.name_of_row()}


def run_routed(model: nn.Module, call: dict[str, Any], routing: Routing, deltas: dict[str, PrefixTuningDelta],
               batch: int, dtype: torch.dtype) -> Any:
    """``model(**call)`` with every row's own prefix in the cache."""
    _refuse_absolute_positions(model, _check(deltas), _counts(routing, deltas), dtype)
    cache, prefix_mask, _, layout = routed_prefixes(deltas, routing, batch, dtype)
    mask_key, inputs = "attention_mask", ("input_ids", "inputs_embeds")
    if layout.encoder_decoder:  # the prefixes are the decoder's; its input may come from the labels
        mask_key, inputs = "decoder_attention_mask", ("decoder_input_ids", "decoder_inputs_embeds", "labels")
    seq = next(call[k] for k in inputs if call.get(k) is not None).shape[1]
    mask = call.get(mask_key)
    if mask is None:
        mask = torch.ones(batch, seq, dtype=torch.long, device=prefix_mask.device)
    call[mask_key] = torch.cat([prefix_mask.to(mask.dtype), mask], dim=1)
    lengths = prefix_mask.sum(1, keepdim=True)  # (B, 1)
    own_positions = not layout.encoder_decoder  # an encoder-decoder's decoder starts after the whole cache
    if own_positions and call.get("position_ids") is not None:  # counted on the input: shift past the prefix
        call["position_ids"] = call["position_ids"] + lengths.to(call["position_ids"].dtype)
    elif own_positions and "position_ids" in inspect.signature(model.forward).parameters:
        call["position_ids"] = lengths + torch.arange(seq, device=lengths.device)  # the solo run's positions
    call[layout.cache_kwarg] = cache
    with attached_rows(_site_groups(deltas, routing, dtype)):
        return model(**call)


def generate_routed(model: nn.Module, kwargs: dict[str, Any], routing: Routing,
                    deltas: dict[str, PrefixTuningDelta], expand: int, dtype: torch.dtype) -> Any:
    """``model.generate`` with every row's own prefix in the cache at every step."""
    kwargs = dict(kwargs)
    source = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"]
    batch, seq = source.shape[:2]
    _refuse_absolute_positions(model, _check(deltas), _counts(routing, deltas), dtype)
    cache, prefix_mask, _, layout = routed_prefixes(deltas, routing, batch * expand, dtype)
    if layout.encoder_decoder:  # the decoder starts from its start token; generate extends this mask every step
        if kwargs.get("decoder_input_ids") is not None or kwargs.get("decoder_attention_mask") is not None:
            raise ConfigError("A mixed-adapter prefix-tuning generate on an encoder-decoder model starts the decoder "
                              "itself; leave out decoder_input_ids and decoder_attention_mask.")
        ones = torch.ones(batch, 1, dtype=torch.long, device=source.device)
        kwargs["decoder_attention_mask"] = torch.cat([prefix_mask[::expand].to(ones.dtype), ones], dim=1)
    else:
        mask = kwargs.get("attention_mask")
        if mask is None:
            mask = torch.ones(batch, seq, dtype=torch.long, device=source.device)
        kwargs["attention_mask"] = torch.cat([prefix_mask[::expand].to(mask.dtype), mask], dim=1)
    kwargs[layout.cache_kwarg] = cache
    kwargs["use_cache"] = True
    with attached_rows(_site_groups(deltas, routing, dtype)):
        return model.generate(**kwargs)
