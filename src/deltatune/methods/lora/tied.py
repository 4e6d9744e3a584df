"""LoRA on an input embedding tied to the output head (``ensure_weight_tying=True``, HF peft's option).

With ``tie_word_embeddings=True`` (SmolLM2, Gemma, ...) the head computes ``logits = h E^T`` with the
embedding matrix ``E: (V, d)`` itself. LoRA on the embedding changes ``E`` by

    dE = s (B A)^T = s A^T B^T,     A: (r, V),  B: (d, r)

and keeps the tie: the head becomes ``logits = h (E + dE)^T = h E^T + s (h B) A``. :class:`TiedLoraHead`
wraps the head and adds that term from the embedding layer's own ``A`` and ``B`` (no tensors of its
own, so one update trains both sides). Merging adds ``dE`` once, to the shared ``E``: the head wrapper
merges nothing, it only stops adding its term while the embedding's adapter is merged. HF peft's
file holds the head's factors too, ``lm_head.lora_A.weight = B^T`` ``(r, d)`` and
``lm_head.lora_B.weight = A^T`` ``(V, r)``: they are written so, and read as what they are, the
embedding's factors (nothing to load).

Without ``ensure_weight_tying`` the head keeps ``E`` (HF peft's default too) and merging is refused,
since writing ``dE`` into the shared ``E`` would change the head as well.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...layer import DeltaLayer
from .config import LoraConfig


class TiedLoraHead(DeltaLayer):
    """The output head of a tied model whose input embedding carries LoRA (see the module docstring)."""

    method_name = "lora"

    def __init__(self, base_layer: nn.Module, source: DeltaLayer) -> None:
        super().__init__(base_layer)
        self._source = [source]  # a list: the embedding wrapper is not a submodule of the head
        #: the wrapper whose merge writes this module's (shared) weight; the core's tie check reads it
        self.merges_through = source

    @property
    def source(self) -> DeltaLayer:
        return self._source[0]

    @property
    def adapter_names(self) -> list[str]:
        return list(self.source.adapter_names)

    def add(self, name: str, config: Any, path: str = "") -> None:
        self.set_active(self.active_adapters)

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        if name not in self.source.adapter_names:
            return {}
        a, b = self.source.lora_embedding_A[name], self.source.lora_embedding_B[name]  # (r, V), (d, r)
        return {"lora_A.weight": b.detach().T.contiguous(), "lora_B.weight": a.detach().T.contiguous()}

    def load_adapter_state(self, name: str, state: dict[str, torch.Tensor]) -> None:
        """Nothing to load: the file's head factors are the embedding's, loaded with the embedding."""

    def add_delta(self, name: str, x: torch.Tensor, result: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if name in self.source.merged_adapters:  # dE is in the shared weight already
            return result
        a, b = self.source.lora_embedding_A[name], self.source.lora_embedding_B[name]  # (r, V), (d, r)
        h = x.to(b.dtype)
        return result + ((h @ b) @ a * self.source.scaling[name]).to(result.dtype)  # (..., V)

    def merge_one(self, name: str) -> None:
        """The embedding's merge writes the shared weight; nothing to do here."""

    def unmerge_one(self, name: str) -> None:
        """See :meth:`merge_one`."""


def tie_output_head(model: nn.Module, config: LoraConfig, name: str) -> None:
    """With ``ensure_weight_tying``, wrap the output head tied to a LoRA-wrapped input embedding."""
    if not getattr(config, "ensure_weight_tying", False):
        return
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    embedding = get_in() if callable(get_in) else None
    head = get_out() if callable(get_out) else None
    if not isinstance(embedding, DeltaLayer) or head is None or isinstance(head, TiedLoraHead):
        return
    if getattr(head, "weight", None) is not getattr(embedding.get_base_layer(), "weight", None):
        return  # not tied: nothing to keep consistent
    path = next(p for p, m in model.named_modules() if m is head)
    parent_path, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent_path), child, TiedLoraHead(head, embedding))


__all__ = ["TiedLoraHead", "tie_output_head"]
