"""Bottleneck adapters for a mixed-adapter batch: each row through its own adapter, one gathered ``bmm`` pair.

Adapters ``k = 0 .. K-1`` of one placement are stacked, bottleneck sizes padded with zeros to
``b = max b_k`` (exact: a padded unit has zero weights and bias, so it is ``f(0) = 0`` for every
activation offered, and its zero column in ``W_up`` adds nothing), the scaling folded into ``W_up``
and its bias, and an all-zero slot ``K`` added for rows of no adapter:

    z_b = f_{k_b}(W_down[k_b] x_b + c_down[k_b])      (L, b)     one baddbmm over the batch
    a_b = s_{k_b} (W_up[k_b] z_b + c_up[k_b])          (L, d_out) one baddbmm over the batch

Rows whose adapters use different activations get each activation on their rows only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class BottleneckStack:
    """Stacked adapters of one placement; the last slot is all zeros (no adapter)."""

    down: torch.Tensor  # (K+1, b, d_in)
    down_bias: torch.Tensor  # (K+1, b)
    up: torch.Tensor  # (K+1, d_out, b), scaling folded in
    up_bias: torch.Tensor  # (K+1, d_out), scaling folded in


def stack_bottleneck(down: Sequence[nn.Linear], up: Sequence[nn.Linear], scaling: Sequence[float]) -> BottleneckStack:
    """Stack the adapters' linears, padded to the widest bottleneck, plus a zero slot."""
    size = max(d.weight.shape[0] for d in down)

    def stack(tensors: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack([*tensors, torch.zeros_like(tensors[0])])

    return BottleneckStack(
        stack([F.pad(d.weight, (0, 0, 0, size - d.weight.shape[0])) for d in down]),
        stack([F.pad(d.bias, (0, size - d.bias.shape[0])) for d in down]),
        stack([F.pad(u.weight * s, (0, size - u.weight.shape[1])) for u, s in zip(up, scaling)]),
        stack([u.bias * s for u, s in zip(up, scaling)]),
    )


def routed_bottleneck(stack: BottleneckStack, slots: torch.Tensor, x: torch.Tensor,
                      activations: Sequence[Callable[[torch.Tensor], torch.Tensor]]) -> torch.Tensor:
    """Each row's adapter output ``(n, ..., d_out)`` for ``x: (n, ..., d_in)``; ``activations[k]`` is slot ``k``'s."""
    n = x.shape[0]
    x3 = x.reshape(n, -1, x.shape[-1])  # (n, L, d_in)
    z = torch.baddbmm(stack.down_bias[slots].unsqueeze(1), x3, stack.down[slots].transpose(1, 2))  # (n, L, b)
    distinct = list(dict.fromkeys(activations))
    if len(distinct) == 1:
        z = distinct[0](z)
    else:
        h = torch.zeros_like(z)
        for act in distinct:
            ks = [k for k, a in enumerate(activations) if a is act]
            rows = torch.isin(slots, torch.tensor(ks, device=slots.device)).view(n, 1, 1)
            h = torch.where(rows, act(z), h)
        z = h
    out = torch.baddbmm(stack.up_bias[slots].unsqueeze(1), z, stack.up[slots].transpose(1, 2))  # (n, L, d_out)
    return out.view(*x.shape[:-1], out.shape[-1])
