"""LoRA for a mixed-adapter batch: every row with its own adapter, in two gathered batched matmuls.

Adapters ``k = 0 .. K-1`` are stacked, ranks padded with zeros to ``R = max r_k`` (exact: the padded
rows of ``A`` and columns of ``B`` add nothing), the scaling folded into ``B``, and one all-zero slot
``K`` added for rows of no adapter (the base model, or an adapter that does not touch this layer):

    A: (K+1, R, in)    B': (K+1, out, R) = s_k B_k    (zero-padded)

For rows ``b`` with slot ``k_b`` and ``x_b: (L, in)`` (``L`` tokens of one sequence):

    h_b = W x_b + B'_{k_b} (A_{k_b} x_b)        one ``bmm`` down, one up, over the whole batch

so the cost stays that of one adapter whatever the number of distinct adapters (the gather copies
``B * R * (in + out)`` numbers; the per-sequence matmuls are the same FLOPs as a single adapter's).
DoRA rows (arXiv 2402.09353) are rescaled by their gathered factor ``g = m / ||W + s B A||_row``
(``1`` for plain LoRA rows): ``h = g * (W x + s B A x) + bias``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LoraStack:
    """Stacked adapters of one layer; the last slot is all zeros (no adapter)."""

    a: torch.Tensor  # (K+1, R, in)
    b: torch.Tensor  # (K+1, out, R), scaling folded in
    dora: torch.Tensor | None  # (K+1, out) DoRA factor, 1 for plain LoRA rows and the zero slot; None: no DoRA


def stack_lora(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor], scaling: Sequence[float],
               dora: Sequence[torch.Tensor | None]) -> LoraStack:
    """Stack ``A_k: (r_k, in)``, ``s_k B_k: (out, r_k)`` padded to the largest rank, plus a zero slot."""
    rank = max(t.shape[0] for t in a)
    a_pad = [F.pad(t, (0, 0, 0, rank - t.shape[0])) for t in a]  # (R, in)
    b_pad = [F.pad(t * s, (0, rank - t.shape[1])) for t, s in zip(b, scaling)]  # (out, R)
    a_stack = torch.stack([*a_pad, torch.zeros_like(a_pad[0])])  # (K+1, R, in)
    b_stack = torch.stack([*b_pad, torch.zeros_like(b_pad[0])])  # (K+1, out, R)
    factor = None
    if any(f is not None for f in dora):
        ones = b_stack.new_ones(b_stack.shape[1])
        factor = torch.stack([f if f is not None else ones for f in dora] + [ones])  # (K+1, out)
    return LoraStack(a_stack, b_stack, factor)


def routed_lora(stack: LoraStack, slots: torch.Tensor, x: torch.Tensor, result: torch.Tensor,
                bias: torch.Tensor | None, in_place: bool = False) -> torch.Tensor:
    """``result`` (``W x + bias``, ``(n, ..., out)``) plus each row's adapter delta; ``x``: ``(n, ..., in)``.

    ``in_place`` (the caller owns ``result``, no gradients): the delta is added into ``result`` itself;
    a new ``(n, ..., out)`` tensor can cost more than the adapter's matmuls (page faults of fresh memory).
    """
    n = x.shape[0]
    x3 = x.reshape(n, -1, x.shape[-1])  # (n, L, in)
    down = torch.bmm(x3, stack.a.index_select(0, slots).transpose(1, 2))  # (n, L, R)
    up = torch.bmm(down, stack.b.index_select(0, slots).transpose(1, 2)).view(result.shape)  # (n, ..., out)
    if stack.dora is None:
        if in_place and up.dtype == result.dtype and result.is_contiguous():
            return result.add_(up)
        return result + up.to(result.dtype)
    g = stack.dora.index_select(0, slots).view(n, *([1] * (result.dim() - 2)), -1)  # (n, 1.., out)
    base_only = result if bias is None else result - bias
    return (result + (g - 1) * base_only + g * up).to(result.dtype)
