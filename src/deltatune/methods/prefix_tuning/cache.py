"""Where prefix tuning's keys and values go: the model's own key/value cache.

Every attention layer of a transformers model that reads a ``Cache`` concatenates the cached keys
and values in front of the new ones, masks them with the attention mask, and starts positions after
them. A cache pre-filled with the prefixes is therefore exactly prefix tuning:

    head_l = softmax(q [P_k^l ; W_k h]^T / sqrt(d)) [P_v^l ; W_v h]

The layout (layers, key/value heads, head size) is read from the model itself: :func:`probe_layout`
runs one token through it with an empty cache and looks at what the layers stored. That covers
grouped-query attention, T5's ``d_kv`` and decoder stacks of any depth without naming an architecture.
Encoder-decoder models keep their cache in the decoder, so the prefixes go to the decoder's
self-attention (the layout HF peft's files describe); the encoder and cross-attention get none.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from ...errors import TargetError
from .._virtual_tokens import is_encoder_decoder

if TYPE_CHECKING:
    from transformers import Cache

CACHE_KWARGS = ("cache", "past_key_values")  # transformers >= 5.x, older


@dataclass(frozen=True)
class KVLayout:
    """Shape of a model's key/value cache: ``num_layers`` x (batch, ``num_heads``, seq, ``head_dim``)."""

    num_layers: int
    num_heads: int
    head_dim: int
    cache_kwarg: str
    encoder_decoder: bool


def cache_kwarg(model: nn.Module) -> str | None:
    """The name under which ``model`` (or its backbone) takes a key/value cache, if any."""
    candidates = [model, getattr(model, "base_model", None)]
    getter = getattr(model, "get_decoder", None)
    if callable(getter):
        candidates.append(getter())
    for module in candidates:
        if module is None or not callable(getattr(module, "forward", None)):
            continue
        params = inspect.signature(module.forward).parameters
        for name in CACHE_KWARGS:
            if name in params:
                return name
    return None


def _new_cache(encoder_decoder: bool) -> Cache:
    from transformers import DynamicCache, EncoderDecoderCache

    return EncoderDecoderCache(DynamicCache(), DynamicCache()) if encoder_decoder else DynamicCache()


def _stored_keys(cache: object) -> list[torch.Tensor]:
    cache = getattr(cache, "self_attention_cache", cache)
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return [layer.keys for layer in layers if getattr(layer, "keys", None) is not None and layer.keys.numel()]
    return [k for k in getattr(cache, "key_cache", []) if k.numel()]


def _cannot(model: nn.Module, why: str) -> TargetError:
    return TargetError(
        f"Prefix tuning cannot apply to {type(model).__name__}: {why}, so there is no place for key/value "
        "prefixes. Use prompt tuning or P-tuning (virtual tokens at the input) or a layer method "
        "(LoRA, IA3, adapters) on this model."
    )


def probe_layout(model: nn.Module) -> KVLayout:
    """Run one token through ``model`` with an empty cache and read the layout its layers stored."""
    kwarg = cache_kwarg(model)
    if kwarg is None:
        raise _cannot(model, "its forward takes no key/value cache (past_key_values)")
    encoder_decoder = is_encoder_decoder(model)
    device = next(model.parameters()).device
    token = torch.zeros(1, 1, dtype=torch.long, device=device)
    cache = _new_cache(encoder_decoder)
    inputs = {"input_ids": token, kwarg: cache}
    if "attention_mask" in inspect.signature(model.forward).parameters:
        inputs["attention_mask"] = torch.ones_like(token)
    if encoder_decoder:
        inputs["decoder_input_ids"] = token
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            model(**inputs)
            _probe_prefixed_call(model, inputs, kwarg, encoder_decoder)
    finally:
        for module, mode in modes:
            module.training = mode
    keys = _stored_keys(cache)
    if not keys:
        raise _cannot(model, "its attention layers do not read the key/value cache they are given")
    shapes = {tuple(k.shape[1:2]) + tuple(k.shape[-1:]) for k in keys}
    if len(shapes) != 1:
        raise _cannot(model, f"its layers cache keys of different shapes {sorted(shapes)}")
    heads, head_dim = shapes.pop()
    return KVLayout(len(keys), heads, head_dim, kwarg, encoder_decoder)


def _probe_prefixed_call(model: nn.Module, inputs: dict, kwarg: str, encoder_decoder: bool) -> None:
    """Call the model as prefix tuning will: one cached position, a mask covering it and the new token."""
    if "attention_mask" not in inputs or encoder_decoder:
        return
    token = inputs["input_ids"]
    call = {"input_ids": token, kwarg: inputs[kwarg], "attention_mask": torch.ones(1, 2, dtype=torch.long, device=token.device)}
    try:
        model(**call)
    except (AssertionError, RuntimeError, ValueError, IndexError) as err:
        raise _cannot(model, f"its forward refuses an attention mask that covers cached positions "
                             f"({type(err).__name__}: {str(err)[:120] or 'assertion failed'})") from err


def build_cache(prefix: torch.Tensor, layout: KVLayout, batch: int, blocks: list[int]) -> Cache:
    """A cache holding the prefixes for ``batch`` sequences.

    Args:
        prefix: ``(P, num_blocks * 2 * heads * head_dim)``, HF peft's flat layout: for each position,
            layer 0 keys, layer 0 values, layer 1 keys, ...
        blocks: which stored layer block feeds each model layer (``blocks[l]``).
    """
    n = prefix.shape[0]
    kv = prefix.view(n, -1, layout.num_heads, layout.head_dim).permute(1, 2, 0, 3)  # (2L, H, P, Dh)
    cache = _new_cache(layout.encoder_decoder)
    self_cache = getattr(cache, "self_attention_cache", cache)
    for layer, block in enumerate(blocks):
        keys = kv[2 * block].unsqueeze(0).expand(batch, -1, -1, -1)  # (B, H, P, Dh)
        values = kv[2 * block + 1].unsqueeze(0).expand(batch, -1, -1, -1)
        self_cache.update(keys, values, layer)
    return cache
