"""Element-wise merges of task tensors (one tensor per adapter, same shape), as named in the model-merging papers.

* ``weighted_sum``: ``sum_i w_i T_i`` (task arithmetic, Ilharco et al., arXiv 2212.04089);
* ``magnitude_prune``: each ``T_i`` keeps its ``int(density * numel)`` largest-magnitude entries, then the weighted sum;
* ``ties``: magnitude pruning, a sign elected per entry (the sign of ``sum_i T_i``, or of the count of
  signs with ``"frequency"``), then the mean of the weighted entries that agree with it (TIES-merging,
  Yadav et al., arXiv 2306.01708);
* ``dare_linear`` / ``dare_ties``: each entry kept with probability ``density`` and rescaled by ``1 / density``
  (DARE, Yu et al., arXiv 2311.03099), then the weighted sum / the TIES sign election and mean.

The same definitions as HF peft's ``merge_utils``; the random drops come from a seeded
``torch.Generator``, so a merge is reproducible.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError


def _weighted(tensors: torch.Tensor, weights: list[float]) -> torch.Tensor:
    """``(k, ...)`` tensors times their weights, broadcast over the other dimensions."""
    w = torch.tensor(weights, dtype=tensors.dtype, device=tensors.device)
    return tensors * w.view(-1, *([1] * (tensors.dim() - 1)))


def _keep_largest(t: torch.Tensor, density: float) -> torch.Tensor:
    if density >= 1:
        return t
    k = int(density * t.numel())
    mask = torch.zeros(t.numel(), dtype=t.dtype, device=t.device)
    mask[torch.topk(t.abs().reshape(-1), k=k).indices] = 1
    return t * mask.view(t.shape)


def _drop_random(t: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    if density >= 1:
        return t
    keep = torch.bernoulli(torch.full(t.shape, density, dtype=t.dtype), generator=generator).to(t.device)
    return t * keep / density


def _elect_and_average(weighted: torch.Tensor, unweighted: torch.Tensor, sign_method: str) -> torch.Tensor:
    """TIES: the entries whose sign agrees with the elected one, averaged over how many agree."""
    if sign_method == "total":
        elected = unweighted.sum(dim=0)
    elif sign_method == "frequency":
        elected = unweighted.sign().sum(dim=0)
    else:
        raise ConfigError(f"majority_sign_method={sign_method!r} is not 'total' or 'frequency'.")
    agree = unweighted.sign() == torch.where(elected >= 0, 1.0, -1.0).to(unweighted.dtype)
    return (weighted * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1)


def merge_tensors(
    kind: str, tensors: list[torch.Tensor], weights: list[float], density: float | None = None,
    sign_method: str = "total", generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Merge ``tensors`` (one per adapter) with ``weights`` by ``kind`` (see the module docstring)."""
    stacked = torch.stack(tensors)  # (k, ...)
    if kind in ("linear", "weighted_sum"):
        return _weighted(stacked, weights).sum(dim=0)
    if density is None or not 0 <= density <= 1:
        raise ConfigError(f"combination_type={kind!r} needs density in [0, 1] (the share of entries kept); got {density}.")
    if kind in ("magnitude_prune", "ties"):
        stacked = torch.stack([_keep_largest(t, density) for t in tensors])
    elif kind in ("dare_linear", "dare_ties"):
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        stacked = torch.stack([_drop_random(t, density, gen) for t in tensors])
    else:
        raise ConfigError(f"unknown element-wise merge {kind!r}")
    if kind in ("magnitude_prune", "dare_linear"):
        return _weighted(stacked, weights).sum(dim=0)
    return _elect_and_average(_weighted(stacked, weights), stacked, sign_method)


__all__ = ["merge_tensors"]
