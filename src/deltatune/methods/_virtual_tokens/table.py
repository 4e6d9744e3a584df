"""A trainable table of vectors, optionally produced by a small network (reparameterisation).

    rows = E                 (no head: prompt tuning, prefix tuning without projection)
    rows = head(E)           (P-tuning's MLP/LSTM encoder, prefix tuning's MLP projection)

``E`` is an ``nn.Embedding`` weight of shape ``(n, in_dim)``; ``rows`` has shape ``(n, out_dim)``.
The head only helps optimisation: what the frozen model reads, and what HF peft saves under
``prompt_embeddings``, is ``rows``. Loading a saved table therefore drops the head and keeps
``rows`` as the (still trainable) table, so the loaded adapter computes exactly what was saved.
"""

from __future__ import annotations

import torch
from torch import nn


class ReparamTable(nn.Module):
    """``forward() -> (n, out_dim)``: the table ``E`` or ``head(E)``.

    Args:
        num_rows: ``n``.
        in_dim: width of ``E``.
        head: maps ``(1, n, in_dim) -> (1, n, out_dim)``; ``None`` for a plain table.
    """

    def __init__(self, num_rows: int, in_dim: int, head: nn.Module | None = None) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_rows, in_dim)
        self.head = head

    def forward(self) -> torch.Tensor:
        table = self.embedding.weight  # (n, in_dim)
        if self.head is None:
            return table
        return self.head(table.unsqueeze(0))[0]  # (n, out_dim)

    def saved(self) -> torch.Tensor:
        """What the model reads, detached: HF peft's ``prompt_embeddings``."""
        if self.head is None:
            return self.embedding.weight
        with torch.no_grad():
            return self().detach()

    def load_saved(self, rows: torch.Tensor) -> None:
        """Make ``rows`` the table; a head, if any, is dropped (the file does not hold it)."""
        weight = self.embedding.weight
        if self.head is not None:
            self.head = None
            if tuple(weight.shape) != tuple(rows.shape):
                self.embedding = nn.Embedding(*rows.shape, device=weight.device, dtype=weight.dtype)
                self.embedding.weight.requires_grad_(weight.requires_grad)
                weight = self.embedding.weight
        with torch.no_grad():
            weight.copy_(rows.to(device=weight.device, dtype=weight.dtype))
