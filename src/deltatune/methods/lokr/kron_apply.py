"""``kron(W1, W2) x`` without forming ``kron(W1, W2)``: the LoKr delta applied to the activations.

With ``x`` of ``in = c d`` features read as the ``(c, d)`` matrix ``X`` (row-major, as ``kron`` lays
out its columns) and ``W1: (a, c)``, ``W2: (b, d)``,

    kron(W1, W2) x = vec(W1 X W2^T)      (an ``(a, b)`` matrix read row-major: ``out = a b`` features)

(Van Loan, "The ubiquitous Kronecker product", J. Comput. Appl. Math. 123, 2000). Per token that is
``c d b + a c b`` multiply-adds instead of ``a b c d`` (MiniLM's 384 x 384 query: 15k instead of 147k), and
no ``(out, in)`` matrix is built, kept for backward or differentiated. Backward recomputes the
intermediate ``X W2^T`` (``n c b`` numbers, larger than ``(out, in)`` once a batch has more than ``a d``
tokens) rather than keeping it, so the graph holds ``x`` and the two small factors only, as a dense
``F.linear(x, dW)`` holds ``x`` (and ``dW`` besides). With ``G`` the output gradient as ``(a, b)`` per token:

    dL/dW1 = sum_tokens G (X W2^T)^T,   dL/dX = W1^T G W2,   dL/dW2 = sum_tokens (W1^T G)^T X

Every product is one plain matrix multiply over all tokens (the token axis moved next to ``b`` or ``d``
with one copy), the fastest layout on CPU for LoKr's small factors.
"""

from __future__ import annotations

from typing import Any

import torch


def _right(xt: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """``X W2^T`` for every token with the token axis inside: ``xt (c, n, d) -> (c, n b)``."""
    c, n, _ = xt.shape
    return (xt.reshape(c * n, -1) @ w2.T).reshape(c, n * w2.shape[0])  # (c, n b)


class KronApply(torch.autograd.Function):
    """``y = x kron(W1, W2)^T`` for ``x (n, c d)``, ``W1 (a, c)``, ``W2 (b, d)`` (one dtype): ``(n, a b)``.

    Saves ``x``, ``W1`` and ``W2`` only (see the module docstring for the gradients).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
        (a, c), (b, d), n = w1.shape, w2.shape, x.shape[0]
        ctx.save_for_backward(x, w1, w2)
        xt = x.reshape(n, c, d).transpose(0, 1)  # (c, n, d), a view
        out = w1 @ _right(xt, w2)  # W1 X W2^T: (a, n b)
        return out.reshape(a, n, b).transpose(0, 1).reshape(n, a * b)  # (n, a b)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, w1, w2 = ctx.saved_tensors
        (a, c), (b, d), n = w1.shape, w2.shape, x.shape[0]
        xt = x.reshape(n, c, d).transpose(0, 1).reshape(c, n, d)  # (c, n, d), one copy
        gt = grad.to(x.dtype).reshape(n, a, b).transpose(0, 1).reshape(a, n * b)  # G with tokens inside: (a, n b)
        grad_x = grad_w1 = grad_w2 = None
        if ctx.needs_input_grad[1]:
            grad_w1 = gt @ _right(xt, w2).T  # (a, c)
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[2]:
            left = (w1.T @ gt).reshape(c * n, b)  # W1^T G: (c n, b)
            if ctx.needs_input_grad[2]:
                grad_w2 = left.T @ xt.reshape(c * n, d)  # (b, d)
            if ctx.needs_input_grad[0]:
                grad_x = (left @ w2).reshape(c, n, d).transpose(0, 1).reshape(n, c * d)  # W1^T G W2: (n, c d)
        return grad_x, grad_w1, grad_w2


def kron_apply(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """``x kron(W1, W2)^T`` for ``x (..., c d)``: ``(..., a b)``, in the dtype the product runs in.

    Under autocast the three tensors are cast to the autocast dtype first (as ``F.linear`` would cast
    ``x`` and ``dW``); otherwise ``x`` is cast to the factors' dtype.
    """
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else w1.dtype
    lead = x.shape[:-1]
    flat = x.reshape(-1, x.shape[-1]).to(dtype)  # (n, c d)
    out = KronApply.apply(flat, w1.to(dtype), w2.to(dtype))  # (n, a b)
    return out.reshape(*lead, out.shape[-1])


__all__ = ["KronApply", "kron_apply"]
