"""The LoftQ alternation (Li et al., arXiv 2310.08659) written out with bitsandbytes' own ``quantize_4bit`` /
``dequantize_4bit`` and ``torch.linalg.svd``: the independent reference the LoftQ tests compare deltatune with.

``Q_t = quant(W - s B_{t-1} A_{t-1})`` (``Q_1 = quant(W)``), and ``s B_t A_t`` is the rank-``r`` SVD of
``W - dequant(Q_t)`` with the singular values split evenly between the factors.
"""

from __future__ import annotations

import torch


def quantize_roundtrip(weight: torch.Tensor, blocksize: int = 64,
                       quant_type: str = "nf4") -> tuple[torch.Tensor, torch.Tensor]:
    """(4-bit codes, dequantized weight) of bitsandbytes' ``quant_type`` with double quantisation."""
    import bitsandbytes.functional as F

    codes, state = F.quantize_4bit(weight.float(), blocksize=blocksize, compress_statistics=True, quant_type=quant_type)
    return codes, F.dequantize_4bit(codes, state).float()


def reference_loftq(w: torch.Tensor, r: int, s: float, iters: int,
                    blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes of Q_T, dequant(Q_T), A_T (r, in), B_T (out, r)) for ``w`` (out, in), NF4 in blocks of ``blocksize``."""
    a = b = torch.zeros(0)
    for t in range(iters):
        codes, q = quantize_roundtrip(w - s * b @ a if t else w, blocksize)
        u, sv, vh = torch.linalg.svd(w - q, full_matrices=False)
        a = (sv[:r] / s).sqrt()[:, None] * vh[:r]
        b = u[:, :r] * (sv[:r] / s).sqrt()
    return codes, q, a, b
