"""Mixed-adapter batches for methods whose delta is a whole matrix ``dW`` built from factors (LoHa, LoKr).

Three exact forms, the cheapest one that fits every adapter of the batch:

* **low rank** (LoHa, small ``r``): ``dW_k = B_k A_k`` with a known rank ``q`` (LoHa's Hadamard
  product of two rank-``r`` products has rank at most ``r^2``); served as LoRA is, two gathered
  ``bmm`` (:func:`deltatune.methods.lora.batched.routed_lora`): ``q (in + out)`` multiply-adds per token.
* **Kronecker** (LoKr, the same factor shapes in every adapter): ``dW_k = kron(W1_k, W2_k)``, so
  ``dW_k x = vec(W1_k X W2_k^T)`` with ``X = x`` as ``(c, d)``; two gathered small batched matmuls:
  ``c b (a + d)`` multiply-adds per token instead of ``out * in = a b c d``.
* **dense** (otherwise): ``dW_k`` built once per forward (cached without gradients), stacked
  ``(K+1, out, in)`` with a zero slot, and one gathered ``bmm``: flat in the number of adapters, but
  each row costs a second dense matmul (``out * in`` per token) and the gather copies ``n * out * in``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KronStack:
    """Kronecker factors of the batch's adapters (scale folded into ``w1``), zero slot last."""

    w1: torch.Tensor  # (K+1, a, c)
    w2: torch.Tensor  # (K+1, b, d)


def stack_kron(w1: Sequence[torch.Tensor], w2: Sequence[torch.Tensor], scaling: Sequence[float]) -> KronStack:
    """``s_k W1_k`` and ``W2_k`` stacked (all of one shape each), plus a zero slot."""
    first = [w * s for w, s in zip(w1, scaling)]
    return KronStack(torch.stack([*first, torch.zeros_like(first[0])]), torch.stack([*w2, torch.zeros_like(w2[0])]))


def routed_kron(stack: KronStack, slots: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``kron(W1_k, W2_k) x`` for each row's slot ``k``: ``x (n, ..., c*d) -> (n, ..., a*b)``."""
    n, (a, c), (b, d) = x.shape[0], stack.w1.shape[1:], stack.w2.shape[1:]
    grid = x.reshape(n, -1, c, d)  # (n, L, c, d)
    right = torch.matmul(grid, stack.w2[slots].transpose(1, 2).unsqueeze(1))  # X W2^T: (n, L, c, b)
    out = torch.matmul(stack.w1[slots].unsqueeze(1), right)  # W1 X W2^T: (n, L, a, b)
    return out.reshape(*x.shape[:-1], a * b)


def stack_dense(deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    """Whole ``dW_k`` ``(out, in)`` stacked, plus a zero slot: ``(K+1, out, in)``."""
    return torch.stack([*deltas, torch.zeros_like(deltas[0])])


def routed_dense(stack: torch.Tensor, slots: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``dW_k x`` for each row's slot ``k``: one gathered ``bmm``; ``x (n, ..., in) -> (n, ..., out)``."""
    n = x.shape[0]
    out = torch.bmm(x.reshape(n, -1, x.shape[-1]), stack[slots].transpose(1, 2))  # (n, L, out)
    return out.reshape(*x.shape[:-1], out.shape[-1])


__all__ = ["KronStack", "routed_dense", "routed_kron", "stack_dense", "stack_kron"]
