"""The key/value cache of every decoding sequence, as one left-padded batch.

Row ``b`` holds sequence ``b``'s cached keys/values right-aligned in ``(B, H, T, D)`` tensors (one pair
per layer, kept in a transformers ``DynamicCache``); ``mask`` ``(B, T)`` is 1 on real positions and 0
on the left padding, and ``positions`` ``(B,)`` is each sequence's own next position (its real length).
Keys are stored after the rotary embedding, so padding never shifts a sequence's positions: with the
mask, one forward of the batch computes for each row what a forward of that row alone computes.

Sequences join between steps (the newcomers are prefilled together, left-padded to the longest
prompt; then their rows or the batch's are padded to the common width) and leave between steps (their rows are dropped, then columns that are padding in every row).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.nn import functional as F


def layer_tensors(cache: object) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) of every layer of a transformers cache, each ``(B, H, T, D)``."""
    return [(layer.keys, layer.values) for layer in cache.layers]  # type: ignore[attr-defined]


def make_cache(tensors: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> object:
    """A ``DynamicCache`` holding ``tensors`` (one (keys, values) pair per layer)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    for i, (keys, values) in enumerate(tensors):
        cache.update(keys, values, i)
    return cache


def _left_pad(t: torch.Tensor, width: int) -> torch.Tensor:
    """Pad dimension -2 (time) of ``t`` on the left to ``width`` with zeros."""
    extra = width - t.shape[-2]
    return F.pad(t, (0, 0, extra, 0)) if extra > 0 else t


class BatchCache:
    """Left-padded KV cache, attention mask and next positions of the sequences being decoded."""

    def __init__(self) -> None:
        self.tensors: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.mask = torch.zeros(0, 0, dtype=torch.long)  # (B, T)
        self.positions = torch.zeros(0, dtype=torch.long)  # (B,)

    @property
    def rows(self) -> int:
        return self.mask.shape[0]

    def join(self, tensors: Sequence[tuple[torch.Tensor, torch.Tensor]], mask: torch.Tensor) -> None:
        """Append rows prefilled together: ``tensors`` ``(R, H, W, D)`` per layer, left-padded as ``mask`` ``(R, W)``."""
        width = max(self.mask.shape[1], mask.shape[1])
        if not self.tensors:
            self.tensors = list(tensors)
            self.mask = mask.clone()
        else:
            self.tensors = [(torch.cat([_left_pad(k, width), _left_pad(nk, width)]),
                             torch.cat([_left_pad(v, width), _left_pad(nv, width)]))
                            for (k, v), (nk, nv) in zip(self.tensors, tensors)]
            self.mask = torch.cat([F.pad(self.mask, (width - self.mask.shape[1], 0)),
                                   F.pad(mask, (width - mask.shape[1], 0))])
        self.positions = torch.cat([self.positions, mask.sum(-1)])

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only ``rows`` (in that order); drop the columns that are then padding in every row."""
        if len(rows) == self.rows:
            return
        index = torch.tensor(list(rows), dtype=torch.long)
        self.mask = self.mask.index_select(0, index)
        if not len(rows):
            self.__init__()  # type: ignore[misc]
            return
        start = int((self.mask.sum(0) > 0).nonzero()[0]) if self.mask.any() else self.mask.shape[1]
        self.mask = self.mask[:, start:]
        self.positions = self.positions.index_select(0, index)
        self.tensors = [(k.index_select(0, index)[:, :, start:], v.index_select(0, index)[:, :, start:])
                        for k, v in self.tensors]

    @staticmethod
    def prefill_inputs(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> dict[str, torch.Tensor]:
        """Model inputs of one forward over several prompts: left-padded, each at its own positions 0..len-1."""
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)  # (R, W)
        mask = torch.zeros(len(prompts), width, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt):] = torch.tensor(list(prompt), dtype=torch.long)
            mask[row, width - len(prompt):] = 1
        return {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}

    def step_inputs(self, last_tokens: Sequence[int]) -> dict[str, torch.Tensor]:
        """Model inputs for one decoding step: each row's last token at its own position."""
        return {
            "input_ids": torch.tensor(list(last_tokens), dtype=torch.long)[:, None],  # (B, 1)
            "attention_mask": F.pad(self.mask, (0, 1), value=1),  # (B, T + 1)
            "position_ids": self.positions[:, None].clone(),  # (B, 1)
        }

    def advance(self, tensors: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Take the cache after a step (every row one token longer)."""
        self.tensors = tensors
        self.mask = F.pad(self.mask, (0, 1), value=1)
        self.positions = self.positions + 1

    def replace_rows(self, rows: Sequence[int], tensors: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """After a step computed only ``rows`` (the others failed): keep those rows, with their grown ``tensors``."""
        index = torch.tensor(list(rows), dtype=torch.long)
        self.mask = self.mask.index_select(0, index)
        self.positions = self.positions.index_select(0, index)
        self.advance(tensors)
