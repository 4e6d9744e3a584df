"""VeRA for a mixed-adapter batch: each row with its own scaling vectors, at the cost of one adapter.

Adapter ``k`` adds ``lb_k * (B_k (ld_k * (A_k x)))`` with frozen random ``A_k: (r, in)``, ``B_k: (out, r)``.
Adapters drawn from the same key with the same rank share ``A`` and ``B`` (the usual case), so a
batch runs the two shared projections once and gathers only the vectors (a zero slot for rows of
no adapter):

    h_b = W x_b + lb[k_b] * (B (ld[k_b] * (A x_b)))       ld: (K+1, r), lb: (K+1, out)

Adapters with different projections are served as LoRA is, with the vectors folded into the
factors (``A'_k = diag(ld_k) A_k``, ``B'_k = diag(lb_k) B_k``) and two gathered ``bmm``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..lora.batched import LoraStack, stack_lora


@dataclass(frozen=True)
class SharedVera:
    """One pair of projections shared by the batch's adapters, their vectors stacked (zero slot last)."""

    a: torch.Tensor  # (r, in)
    b: torch.Tensor  # (out, r)
    lambda_d: torch.Tensor  # (K+1, r)
    lambda_b: torch.Tensor  # (K+1, out)


def stack_vera(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor], lambda_d: Sequence[torch.Tensor],
               lambda_b: Sequence[torch.Tensor]) -> SharedVera | LoraStack:
    """The shared form when every adapter's ``A`` and ``B`` are equal, else the LoRA form."""
    shared = all(t.shape == a[0].shape and torch.equal(t, a[0]) for t in a) and all(
        t.shape == b[0].shape and torch.equal(t, b[0]) for t in b)
    if shared:
        d, lb = torch.stack(list(lambda_d)), torch.stack(list(lambda_b))
        return SharedVera(a[0], b[0], torch.cat([d, torch.zeros_like(d[:1])]), torch.cat([lb, torch.zeros_like(lb[:1])]))
    return stack_lora([d[:, None] * t for d, t in zip(lambda_d, a)], [lb[:, None] * t for lb, t in zip(lambda_b, b)],
                      [1.0] * len(a), [None] * len(a))


def routed_shared_vera(stack: SharedVera, slots: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``lb[k] * (B (ld[k] * (A x)))`` for each row's slot ``k``: ``x (n, ..., in) -> (n, ..., out)``."""
    n, ones = x.shape[0], [1] * (x.dim() - 2)
    hidden = F.linear(x, stack.a) * stack.lambda_d[slots].view(n, *ones, -1)  # (n, ..., r)
    return F.linear(hidden, stack.b) * stack.lambda_b[slots].view(n, *ones, -1)  # (n, ..., out)


__all__ = ["SharedVera", "routed_shared_vera", "stack_vera"]
