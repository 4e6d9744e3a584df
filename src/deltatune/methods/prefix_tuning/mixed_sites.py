"""Encoder and cross-attention prefixes (``encoder_prefix=True``) per row of a mixed-adapter batch.

The solo path (:mod:`.attention`) hands every attention site one ``(P, D)`` prefix. Here row ``b``
has its own adapter's prefix of ``P_b`` positions (``0``: a row without encoder prefixes), left-padded
to ``P = max P_b``; the attention mask gains ``P`` columns in front, attendable on the row's own
``P_b`` and masked on its padding, so a row sees exactly its solo prefix:

    keys_b = [pad ; P_k^(b) ; W_k s_b]      mask_b = [-inf .. -inf, 0 .. 0 ; mask of s_b]

Positions: T5's relative bias puts cached column ``c`` at ``c - P - i`` for query ``i``; a row's prefix
in the last ``P_b`` columns gets ``j - P_b - i``, its solo value; BART's encoder and cross-attention
positions do not involve the keys. ``generate`` repeats rows for beams: the call's row count is a
multiple of the batch and the prefixes repeat with it (``repeat_interleave``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .attention import MASK_KWARGS, SOURCE_KWARGS, Site, _Prefixer, _rebuild


def _rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """``t`` ``(B, ...)`` repeated for a call with ``rows`` rows (beams / returned sequences)."""
    return t if t.shape[0] == rows else t.repeat_interleave(rows // t.shape[0], dim=0)


def _row_heads(prefix: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``(B, P, H * Dh)`` -> ``(rows, H, P, Dh)`` in the dtype of ``like`` (keys ``(rows, H, S, Dh)``)."""
    p = _rows(prefix, like.shape[0]).to(like.dtype)
    return p.view(p.shape[0], p.shape[1], -1, like.shape[-1]).transpose(1, 2)


class RowPrefixKV:
    """A stand-in cache returning ``[P_k^(b) ; K]``, ``[P_v^(b) ; V]`` row by row; stores nothing."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.keys, self.values = keys, values  # (B, P, H * Dh) each

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.keys.shape[1])

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any) -> tuple:
        return (torch.cat([_row_heads(self.keys, keys), keys], dim=-2),  # (rows, H, P + S, Dh)
                torch.cat([_row_heads(self.values, values), values], dim=-2))


def _front(mask: torch.Tensor | None, visible: torch.Tensor, like: torch.Tensor, source: int) -> torch.Tensor:
    """The attention mask with the prefix columns in front: ``visible`` ``(rows, P)`` says which are real."""
    rows, width = visible.shape
    if mask is None:  # nothing masked so far: an additive mask of the call's dtype
        mask = torch.zeros(rows, 1, 1, source, dtype=like.dtype, device=like.device)
    shape = (*mask.shape[:-1], width)
    seen = visible.view(rows, *([1] * (mask.dim() - 2)), width).expand(shape)
    if mask.dtype == torch.bool:
        front = seen
    else:
        front = torch.zeros(shape, dtype=mask.dtype, device=mask.device).masked_fill(
            ~seen, torch.finfo(mask.dtype).min)
    return torch.cat([front, mask], dim=-1)


class _RowPrefixer(_Prefixer):
    """Pre-hook giving one attention module each row's own prefix (see :class:`.attention._Prefixer`)."""

    def __init__(self, attention: nn.Module, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor,
                 index: int) -> None:
        super().__init__(attention, keys, values, index)
        self.visible = visible  # (B, P) bool

    def _give_prefix(self, module: nn.Module, given: dict[str, Any], batch: int) -> None:
        cache = given.get(self.cache_name)
        if cache is None:
            given[self.cache_name] = RowPrefixKV(self.keys, self.values)
            return
        cross = getattr(cache, "cross_attention_cache", None)
        if cross is not None and not cache.is_updated.get(self.index) and cross.get_seq_length(self.index) == 0:
            like = torch.empty(batch, 1, 1, self._head_size(module), dtype=self.keys.dtype, device=self.keys.device)
            cross.update(_row_heads(self.keys, like), _row_heads(self.values, like), self.index)
            return
        super()._give_prefix(module, given, batch)  # the solo checks and their errors

    def _head_size(self, module: nn.Module) -> int:
        from .attention import _head_dim

        return _head_dim(module, self.keys[0])

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple, dict]:
        bound = self.signature.bind(*args, **kwargs)
        given = bound.arguments
        hidden = given.get("hidden_states", args[0] if args else None)
        source = next((given[k] for k in SOURCE_KWARGS if given.get(k) is not None), hidden)
        rows = hidden.shape[0]
        self._give_prefix(module, given, rows)
        visible = _rows(self.visible, rows)
        for name in MASK_KWARGS:
            if name not in self.signature.parameters:
                continue
            mask = given.get(name)
            if mask is None or (isinstance(mask, torch.Tensor) and mask.shape[-1] == source.shape[1]):
                given[name] = _front(mask, visible, hidden, source.shape[1])
            break
        return _rebuild(self.signature, args, kwargs, given)


@contextmanager
def attached_rows(groups: list[tuple[list[Site], torch.Tensor, torch.Tensor]]) -> Iterator[None]:
    """Per-row prefixes on every site of each group: ``table`` ``(B, P, flat)``, ``visible`` ``(B, P)`` bool."""
    handles = []
    try:
        for sites, table, visible in groups:
            start = 0
            for index, site in enumerate(sites):
                keys = table[:, :, start:start + site.width]  # (B, P, D)
                values = table[:, :, start + site.width:start + 2 * site.width]
                start += 2 * site.width
                layer = getattr(site.attention, "layer_idx", None)
                hook = _RowPrefixer(site.attention, keys, values, visible, layer if isinstance(layer, int) else index)
                handles.append(site.attention.register_forward_pre_hook(hook, with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


__all__ = ["RowPrefixKV", "attached_rows"]
