"""Block rotations of OFT: skew-symmetric blocks from their upper triangles, and the Cayley map.

A block of size ``b`` is stored as its ``b (b - 1) / 2`` upper-triangle entries (row-major, diagonal
excluded), HF peft's ``oft_R.weight`` layout ``(n_blocks, b (b - 1) / 2)``.
"""

from __future__ import annotations

import functools

import torch
from torch import nn


@functools.lru_cache(maxsize=32)
def _upper_indices(block: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column indices of the strict upper triangle of a ``block x block`` matrix (built once per size)."""
    rows, cols = torch.triu_indices(block, block, 1, device=device)
    return rows, cols


def skew(vec: torch.Tensor, block: int) -> torch.Tensor:
    """``S - S^T`` with ``S``'s strict upper triangle filled from ``vec`` ``(n, b (b - 1) / 2)``: ``(n, b, b)``."""
    rows, cols = _upper_indices(block, vec.device)
    upper = vec.new_zeros(vec.shape[0], block, block)
    upper[:, rows, cols] = vec
    return upper - upper.transpose(-2, -1)


def upper_entries(q: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`skew`: ``(n, b, b) -> (n, b (b - 1) / 2)``."""
    rows, cols = _upper_indices(q.shape[-1], q.device)
    return q[:, rows, cols]


def cayley(q: torch.Tensor, neumann: bool, terms: int) -> torch.Tensor:
    """Rotations from skew blocks ``q`` ``(n, b, b)``.

    ``neumann``: ``I + 2 Q + 2 Q^2 + ... + 2 Q^(k-2) + Q^(k-1)`` for ``k = terms >= 4`` (``k = 3`` gives
    the ``k = 4`` series, ``k = 2`` gives ``I + 2 Q``, ``k = 1`` gives ``I``), HF peft's truncation of
    ``(I + Q)(I - Q)^-1``. Otherwise the exact ``(I - Q)(I + Q)^-1``.
    """
    eye = torch.eye(q.shape[-1], device=q.device, dtype=q.dtype)
    if not neumann:
        eye = eye.expand_as(q)
        return torch.linalg.solve(eye + q, eye - q, left=False)
    if terms < 2:
        return eye.expand_as(q).clone()
    out = torch.add(eye, q, alpha=2.0)  # (n, b, b); the sum is accumulated in place (autograd keeps no partial sums)
    if terms < 3:
        return out
    power = q @ q
    out.add_(power, alpha=2.0)
    for _ in range(3, terms - 1):
        power = power @ q
        out.add_(power, alpha=2.0)
    return out.add_(power @ q)


def constrain(vec: torch.Tensor, block: int, eps: float) -> torch.Tensor:
    """COFT: entries whose skew block lies farther than ``eps / sqrt(n)`` from zero (Frobenius) are scaled back onto that sphere."""
    q = skew(vec, block)
    radius = eps / torch.sqrt(torch.tensor(float(q.shape[0])))
    norm = q.norm(dim=(1, 2), keepdim=True)
    return upper_entries(torch.where(norm <= radius, q, radius * q / norm))


class BlockRotation(nn.Module):
    """One adapter's rotation parameters: ``weight`` ``(n_blocks or 1, b (b - 1) / 2)``."""

    def __init__(self, blocks: int, block_size: int, init_zero: bool) -> None:
        super().__init__()
        self.block_size = block_size
        self.weight = nn.Parameter(torch.zeros(blocks, block_size * (block_size - 1) // 2))
        if not init_zero:
            nn.init.normal_(self.weight, mean=0.0, std=0.1)


__all__ = ["BlockRotation", "cayley", "constrain", "skew", "upper_entries"]
