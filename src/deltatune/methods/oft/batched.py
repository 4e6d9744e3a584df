"""OFT for a mixed-adapter batch: every row rotated by its own adapter's block-diagonal ``R``, one batched matmul.

Adapter ``k`` rotates the input with ``R_k = diag(R_k1, ..., R_kn)``, blocks of size ``b_k`` (a divisor
of ``in``). Adapters with different block sizes share one stack at the common block size
``c = lcm(b_k)`` (itself a divisor of ``in``): each ``c x c`` block of adapter ``k`` is the block
diagonal of its ``c / b_k`` consecutive small blocks, which is exactly the same rotation. With an
identity slot ``K`` for rows of no adapter (the base model, or an adapter not on this layer):

    R: (K+1, m, c, c),   m = in / c
    x_b: (L, m, c)  ->  x_b[:, i] R[k_b, i]         one batched matmul over (row, block)

so the cost is that of one adapter whatever the number of distinct adapters (the gather copies
``B * in * c`` numbers; with equal block sizes the matmul has the same FLOPs as a single adapter's).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def common_block(sizes: Sequence[int]) -> int:
    """The least common multiple of the block sizes (a divisor of ``in`` when each size is)."""
    return math.lcm(*sizes)


def widen_blocks(blocks: torch.Tensor, n: int, size: int) -> torch.Tensor:
    """``n`` blocks ``(n or 1, b, b)`` (one shared block repeated) as ``(n b / size, size, size)`` blocks,
    each the block diagonal of ``size / b`` consecutive small blocks."""
    b = blocks.shape[-1]
    if blocks.shape[0] == 1 and n > 1:
        blocks = blocks.expand(n, b, b)
    group = size // b
    if group == 1:
        return blocks
    grouped = blocks.reshape(n // group, group, b, b)  # (m, g, b, b)
    eye = torch.eye(group, device=blocks.device, dtype=blocks.dtype)  # (g, g)
    wide = torch.einsum("mgij,gh->mgihj", grouped, eye)  # (m, g, b, g, b): block (g, g') zero unless g == g'
    return wide.reshape(n // group, size, size)


def stack_rotations(blocks: Sequence[torch.Tensor], counts: Sequence[int]) -> torch.Tensor:
    """Adapters' rotation blocks (``blocks[k]``: ``(counts[k] or 1, b_k, b_k)``) at their common block size,
    plus an identity slot: ``(K+1, m, c, c)``."""
    size = common_block([t.shape[-1] for t in blocks])
    wide = [widen_blocks(t, n, size) for t, n in zip(blocks, counts)]  # each (m, c, c)
    eye = torch.eye(size, device=wide[0].device, dtype=wide[0].dtype).expand_as(wide[0])
    return torch.stack([*wide, eye])


def routed_rotate(stack: torch.Tensor, slots: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``x: (n, ..., in)`` with row ``i`` rotated by slot ``slots[i]`` of ``stack`` ``(K+1, m, c, c)``."""
    n, (m, size) = x.shape[0], stack.shape[1:3]
    parts = x.to(stack.dtype).reshape(n, -1, m, size)  # (n, L, m, c)
    rotated = torch.einsum("nlmk,nmkc->nlmc", parts, stack[slots])  # (n, L, m, c)
    return rotated.reshape(x.shape).to(x.dtype)


__all__ = ["common_block", "routed_rotate", "stack_rotations", "widen_blocks"]
