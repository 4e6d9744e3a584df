"""One explicit gradient all-reduce per optimizer step, for loops that do not call a DDP wrapper.

DDP (Li et al., arXiv 2006.15704) all-reduces gradients inside ``backward`` and insists that every
parameter it registered receives a gradient in every synchronised backward pass; a parameter that
gets none makes it fail (or, with ``find_unused_parameters=True``, walk the autograd graph after
every forward to find such parameters). A loop in which some trainable tensors legitimately get no
gradient on some rank in some step (the joint loop: a job with no rows on that rank, or fewer
accumulation micro-batches than another job) is simpler and cheaper with the reduction done by hand
after the last micro-batch:

    g_p  <-  sum_r g_p^(r)              for every parameter p of ``params``,

where a rank on which ``p`` got no gradient contributes zeros. When rank ``r`` back-propagated
``loss_r / N`` (``N``: the loss terms of all ranks), the sum is the gradient of ``sum_r loss_r / N``:
what DDP's average of ``W * loss_r / N`` gives, and what one process over every rank's rows gives.

Gradients are packed into flat buckets (one per device and dtype, at most ``bucket_bytes`` each), so a
step costs a few collectives however many small adapter tensors there are. Every rank must pass the
same parameters in the same order. Works on gloo (CPU tensors) and NCCL (GPU tensors) alike.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from .runtime import Distributed

BUCKET_BYTES = 64 * 2**20  # bounds the extra memory of one packed bucket


def _buckets(params: list[nn.Parameter], bucket_bytes: int) -> Iterator[list[nn.Parameter]]:
    """Consecutive runs of ``params`` sharing device and dtype, each at most ``bucket_bytes`` (or one tensor)."""
    bucket: list[nn.Parameter] = []
    size = 0
    for p in params:
        nbytes = p.numel() * p.element_size()
        if bucket and (p.device != bucket[0].device or p.dtype != bucket[0].dtype or size + nbytes > bucket_bytes):
            yield bucket
            bucket, size = [], 0
        bucket.append(p)
        size += nbytes
    if bucket:
        yield bucket


@torch.no_grad()
def all_reduce_gradients(dist: Distributed, params: Iterable[nn.Parameter], bucket_bytes: int = BUCKET_BYTES) -> None:
    """Replace each parameter's ``.grad`` by its sum over all ranks (a missing gradient counts as zeros).

    A no-op in a single process. Afterwards the gradients are the same on every rank, so the optimizer
    steps identically everywhere; a parameter that got a gradient on no rank keeps ``grad = None`` (the
    optimizer skips it, as a single process would).
    """
    if not dist.enabled:
        return
    import torch.distributed as tdist

    unique = list({id(p): p for p in params}.values())
    with dist.guard("all-reducing the adapters' gradients"):
        for bucket in _buckets(unique, bucket_bytes):
            grads = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in bucket]
            has = torch.tensor([p.grad is not None for p in bucket], dtype=bucket[0].dtype, device=bucket[0].device)
            flat = torch.cat([*grads, has])  # (sum_p numel + len(bucket),) summed over ranks below
            tdist.all_reduce(flat)
            seen = flat[-len(bucket) :].tolist()  # how many ranks had each gradient (one device sync)
            offset = 0
            for p, count in zip(bucket, seen):
                part = flat[offset : offset + p.numel()].view_as(p)
                offset += p.numel()
                if count == 0:  # no rank had a gradient: stay None, as in one process
                    p.grad = None
                elif p.grad is None:
                    p.grad = part.clone()
                else:
                    p.grad.copy_(part)
