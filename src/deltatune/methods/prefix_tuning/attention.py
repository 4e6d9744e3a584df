"""Prefixes outside the decoder cache: encoder self-attention and decoder cross-attention (``encoder_prefix=True``).

    head = softmax(q [P_k ; W_k s]^T * scale + bias + mask) [P_v ; W_v s]      (s: the keys' source states)

An encoder-decoder model's key/value cache only reaches the decoder's self-attention. The two other
attention kinds get their prefixes from a forward pre-hook on each attention module, present for one
model call (or one ``generate``):

* encoder self-attention is called without a cache; the hook passes it a :class:`PrefixKV`, a
  stand-in cache whose ``update`` returns ``[P_k ; K]`` and ``[P_v ; V]`` and stores nothing;
* decoder cross-attention gets transformers' ``EncoderDecoderCache``; before the keys of the encoder
  states are computed (``is_updated`` false for the layer) the hook writes the prefix into that
  layer's cross-attention cache, the attention appends the encoder keys to it and marks the layer
  updated, and every later decoding step reuses ``[P_k ; K]``: the prefix is cached exactly once;
* the attention mask gains ``P`` attendable columns in front (``True`` / ``0.0``).

Positions: the prefix sits just before the input, as a decoder-cache prefix does. Attention that
places its keys after the cached ones (T5's relative position bias, computed in the first layer with
``past_seen_tokens = P`` and handed on, already ``P + S`` wide, to the later layers) gives prefix
column ``j`` the bias of relative position ``j - P - i`` for query ``i``; BART's absolute positions are
added before the attention, so the prefix has none. Encoder outputs computed outside the
:class:`~deltatune.DeltaModel` call (``encoder_outputs=`` given by the caller) carry no prefix.

Which modules are the encoder self-attention / cross-attention and their projections comes from
:mod:`deltatune.model_interface` (roles ``enc_self_attn``, ``cross_attn``, ``k``, ``v``).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...errors import ConfigError, TargetError
from ...model_interface import linear_dims, model_roles, model_type, role_paths, structure_summary
from ...structure import original_modules
from .cache import CACHE_KWARGS

ROLES = ("enc_self_attn", "cross_attn")  # the two groups, in the order their tables are stored
MASK_KWARGS = ("attention_mask", "mask")
SOURCE_KWARGS = ("key_value_states", "encoder_hidden_states")


@dataclass(frozen=True)
class Site:
    """One attention module and its key / value projections (``width`` = their output size)."""

    attention: nn.Module
    key: nn.Module
    value: nn.Module
    width: int


def find_sites(model: nn.Module, role: str) -> list[Site]:
    """The attention modules of ``role`` (``enc_self_attn`` / ``cross_attn``), in model order."""
    found = model_roles(model)
    wanted = set(role_paths(model, role, found))
    sites = []
    modules = original_modules(model)
    for site in found.attention:
        if site.path not in wanted:
            continue
        if site.k is None or site.v is None:
            raise TargetError(f"{site.path} computes keys and values in one fused projection ({site.qkv}); "
                              "encoder_prefix needs separate key and value projections.")
        key, value = modules[site.k], modules[site.v]
        width = linear_dims(key)[1]  # type: ignore[index]
        if linear_dims(value)[1] != width:  # type: ignore[index]
            raise TargetError(f"{site.path}: key and value projections differ in width; cannot give them one prefix.")
        sites.append(Site(modules[site.path], key, value, width))
    if not sites:
        raise TargetError(
            f"encoder_prefix found no {role.replace('_', ' ')} layer in {type(model).__name__} "
            f"(model_type {model_type(model)!r}): {structure_summary(model)}. Use encoder_prefix=False (decoder "
            "self-attention prefixes only), or name the modules with deltatune.register_architecture(...)."
        )
    return sites


def flat_width(sites: list[Site]) -> int:
    """Columns of a group's stored table: ``sum_l 2 * D_l`` (layer 0 keys, layer 0 values, layer 1 keys ...)."""
    return sum(2 * site.width for site in sites)


def _heads(prefix: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``(P, H * Dh)`` -> ``(B, H, P, Dh)`` in the dtype of ``like`` (keys ``(B, H, S, Dh)``)."""
    rows = prefix.to(like.dtype).view(prefix.shape[0], -1, like.shape[-1]).transpose(0, 1)  # (H, P, Dh)
    return rows.unsqueeze(0).expand(like.shape[0], -1, -1, -1)


class PrefixKV:
    """A stand-in key/value cache holding one layer's prefix: ``update`` returns ``[P_k ; K]``, ``[P_v ; V]``.

    Stores nothing, so every call of the attention sees the prefix exactly once. ``get_seq_length``
    is ``P``: attention that places its positions after the cached ones (T5's relative position bias)
    puts the prefix just before the input, as prefix tuning does in a decoder's cache.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.keys, self.values = keys, values  # (P, H * Dh) each

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.keys.shape[0])

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any) -> tuple:
        return (torch.cat([_heads(self.keys, keys), keys], dim=-2),  # (B, H, P + S, Dh)
                torch.cat([_heads(self.values, values), values], dim=-2))


def _widen(mask: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` attendable columns in front of the last dimension (``True`` / ``0.0``)."""
    fill = True if mask.dtype == torch.bool else 0.0
    front = torch.full((*mask.shape[:-1], n), fill, dtype=mask.dtype, device=mask.device)
    return torch.cat([front, mask], dim=-1)


class _Prefixer:
    """Forward pre-hook on one attention module: hand it the prefix and widen its attention mask.

    No cache given (encoder self-attention): a :class:`PrefixKV` is passed as the cache. An
    encoder-decoder cache (decoder cross-attention): the prefix is written into its cross-attention
    layer before the keys of the encoder states are computed and appended, i.e. once per cache.
    """

    def __init__(self, attention: nn.Module, keys: torch.Tensor, values: torch.Tensor, index: int) -> None:
        self.keys, self.values, self.index = keys, values, index
        self.signature = _forward_signature(getattr(attention.forward, "__func__", attention.forward))
        names = [k for k in CACHE_KWARGS if k in self.signature.parameters]
        if not names:
            raise TargetError(f"{type(attention).__name__} takes no key/value cache; encoder_prefix cannot reach it.")
        self.cache_name = names[0]

    def _give_prefix(self, module: nn.Module, given: dict[str, Any], batch: int) -> None:
        cache = given.get(self.cache_name)
        if cache is None:
            given[self.cache_name] = PrefixKV(self.keys, self.values)
            return
        cross = getattr(cache, "cross_attention_cache", None)
        if cross is None:
            raise ConfigError(f"encoder_prefix: {type(module).__name__} got a {type(cache).__name__}, not an "
                              "encoder-decoder cache; pass no cache.")
        if not cache.is_updated.get(self.index):  # keys of the encoder states not computed yet
            if cross.get_seq_length(self.index) != 0:
                raise ConfigError("encoder_prefix: the cross-attention cache already holds keys; pass no cache.")
            like = torch.empty(batch, 1, 1, _head_dim(module, self.keys), dtype=self.keys.dtype)
            cross.update(_heads(self.keys, like), _heads(self.values, like), self.index)

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple, dict]:
        bound = self.signature.bind(*args, **kwargs)
        given = bound.arguments
        hidden = given.get("hidden_states", args[0] if args else None)
        source = next((given[k] for k in SOURCE_KWARGS if given.get(k) is not None), hidden)
        if not isinstance(source, torch.Tensor) or not isinstance(hidden, torch.Tensor):
            raise ConfigError(f"encoder_prefix: cannot tell the key length of {type(module).__name__}'s call.")
        self._give_prefix(module, given, hidden.shape[0])
        for name in MASK_KWARGS:
            mask = given.get(name)
            if mask is None or name not in self.signature.parameters:
                continue
            if not isinstance(mask, torch.Tensor):
                raise ConfigError(
                    f"encoder_prefix needs a tensor attention mask; {type(module).__name__} got {type(mask).__name__}. "
                    "Load the model with attn_implementation='sdpa' or 'eager'."
                )
            if mask.shape[-1] == source.shape[1]:  # (B, 1, Q | 1, S) -> (B, 1, Q | 1, P + S)
                given[name] = _widen(mask, self.keys.shape[0])
        return _rebuild(self.signature, args, kwargs, given)


@functools.lru_cache(maxsize=64)
def _forward_signature(forward: Any) -> inspect.Signature:
    """``forward``'s signature without ``self``; hooks are attached on every model call, so it is read once."""
    signature = inspect.signature(forward)
    params = list(signature.parameters.values())
    if params and params[0].name == "self" and not inspect.ismethod(forward):
        signature = signature.replace(parameters=params[1:])
    return signature


def _rebuild(signature: inspect.Signature, args: tuple, kwargs: dict[str, Any], given: dict[str, Any]) -> tuple:
    """The call with the edited ``given`` values, each where it came from (new ones by keyword)."""
    args, kwargs = list(args), dict(kwargs)
    position = {name: i for i, name in enumerate(signature.parameters)}
    for name in (CACHE_KWARGS + MASK_KWARGS):
        if name not in given or name not in signature.parameters:
            continue
        if name not in kwargs and position[name] < len(args):
            args[position[name]] = given[name]
        else:
            kwargs[name] = given[name]
    return tuple(args), kwargs


def _head_dim(module: nn.Module, keys: torch.Tensor) -> int:
    for name in ("head_dim", "key_value_proj_dim"):
        value = getattr(module, name, None)
        if isinstance(value, int) and value > 0:
            return value
    heads = next((getattr(module, n) for n in ("num_heads", "n_heads") if isinstance(getattr(module, n, None), int)),
                 None)
    if heads is None:
        raise TargetError(f"encoder_prefix cannot tell the head size of {type(module).__name__}.")
    return keys.shape[-1] // heads


@contextmanager
def attached(groups: list[tuple[list[Site], torch.Tensor]]) -> Iterator[None]:
    """Pre-hooks giving every site of each group its prefixes; ``table`` is ``(P, flat_width(sites))``."""
    handles = []
    try:
        for sites, table in groups:
            start = 0
            for index, site in enumerate(sites):
                keys = table[:, start:start + site.width]  # (P, D)
                values = table[:, start + site.width:start + 2 * site.width]
                start += 2 * site.width
                layer = getattr(site.attention, "layer_idx", None)
                hook = _Prefixer(site.attention, keys, values, layer if isinstance(layer, int) else index)
                handles.append(site.attention.register_forward_pre_hook(hook, with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()
