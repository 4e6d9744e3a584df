"""Weighted combinations of LoRA adapters (``DeltaModel.add_weighted_adapter``).

Per wrapped layer, adapter ``i`` (weight ``w_i``, scale ``s_i``) contributes ``w_i s_i B_i A_i``; an
adapter that does not wrap the layer contributes nothing. The new adapter wraps the union of the
layers, with ``lora_alpha = r`` (scale 1) and ``r`` as below; factors of lower rank are zero-padded.

* ``cat``: ``A = [w_1 s_1 A_1; ...; w_k s_k A_k]``, ``B = [B_1 ... B_k]``; ``r`` = the sum of the ranks. Exact.
* ``svd``: the same stack ``dW = B A`` (``R`` = stacked rank) re-factorised through thin QR factors,
  ``B = Q_B R_B``, ``A^T = Q_A R_A``, ``R_B R_A^T = U S V^T`` (an ``R x R`` SVD), so
  ``dW = (Q_B U) S (Q_A V)^T``; the top ``r`` triplets give ``B = Q_B U_r S_r^1/2``, ``A = S_r^1/2 V_r^T Q_A^T``.
  ``r`` defaults to the largest stacked rank (exact); a smaller ``svd_rank`` gives the best rank-r
  approximation. Never forms an ``out x in`` matrix.
* ``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``: HF peft's factor-wise merges:
  ``A = merge(sgn(w_i s_i) sqrt|w_i s_i| A_i)``, ``B = merge(sqrt|w_i s_i| B_i)``. ``B A`` then has cross
  terms ``B_i A_j``: these are not the weighted sum of the deltas. All ranks must be equal.
"""

from __future__ import annotations

import math
import re
from dataclasses import replace

import torch

from ...combination import CombineRequest
from ...errors import ConfigError
from ...inject import iter_wrappers
from .._merge_ops import merge_tensors
from .config import LoraConfig
from .layer import LoraConv, LoraEmbedding, LoraLayer, LoraLinear

EXACT = ("cat", "svd")


def factors(layer: LoraLayer, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A (r, in'), B (out', r))`` of adapter ``name`` as matrices, so that ``dW ~ s * B A``."""
    if isinstance(layer, LoraEmbedding):
        return layer.lora_embedding_A[name].detach(), layer.lora_embedding_B[name].detach()
    a, b = layer.lora_A[name].weight.detach(), layer.lora_B[name].weight.detach()
    return a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)


def set_factors(layer: LoraLayer, name: str, a: torch.Tensor, b: torch.Tensor) -> None:
    """Write matrices ``a`` ``(r, in')`` and ``b`` ``(out', r)`` into adapter ``name``'s tensors."""
    targets = ((layer.lora_embedding_A[name], layer.lora_embedding_B[name]) if isinstance(layer, LoraEmbedding)
               else (layer.lora_A[name].weight, layer.lora_B[name].weight))
    with torch.no_grad():
        for target, value in zip(targets, (a, b)):
            target.copy_(value.reshape(target.shape).to(target.dtype))


def _pad(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero rows of ``a`` / columns of ``b`` up to ``rank`` (they add nothing to ``B A``)."""
    extra = rank - a.shape[0]
    return torch.cat([a, a.new_zeros(extra, a.shape[1])]), torch.cat([b, b.new_zeros(b.shape[0], extra)], dim=1)


def low_rank_svd(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best rank-``rank`` factors of ``b @ a`` (``b``: ``(out, R)``, ``a``: ``(R, in)``) from two thin QRs
    and an ``R x R`` SVD; exact when ``rank >= R``. Computed in float64."""
    q_b, r_b = torch.linalg.qr(b.double())  # (out, R'), (R', R)
    q_a, r_a = torch.linalg.qr(a.double().T)  # (in, R''), (R'', R)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)  # core (R', R'')
    k = min(rank, s.numel())
    root = s[:k].sqrt()
    new_b = (q_b @ u[:, :k]) * root  # (out, k)
    new_a = root[:, None] * (vh[:k] @ q_a.T)  # (k, in)
    return new_a.float(), new_b.float()


def _check(model: object, request: CombineRequest, configs: list[LoraConfig]) -> None:
    if any(c.use_dora for c in configs):
        raise ConfigError("DoRA adapters cannot be combined by weighting: their magnitude vector rescales the whole "
                          "weight, not an additive delta. Combine plain LoRA adapters.")
    if any(c.bias != "none" for c in configs):
        raise ConfigError("Adapters trained with bias='all' or 'lora_only' changed base biases in place, which no "
                          "weighting can separate; combine adapters trained with bias='none'.")


def _layers(model: object, adapters: list[str]) -> dict[str, LoraLayer]:
    return {p: w for p, w in iter_wrappers(model.get_base_model())
            if isinstance(w, (LoraLinear, LoraEmbedding, LoraConv)) and any(a in w.r for a in adapters)}


def _new_rank(request: CombineRequest, layers: dict[str, LoraLayer]) -> int:
    adapters = request.adapters
    per_layer = [[layer.r[a] for a in adapters if a in layer.r] for layer in layers.values()]
    kind = request.combination_type
    if kind == "cat":
        return max(sum(r) for r in per_layer)
    if kind == "svd":
        return request.rank or max(sum(r) for r in per_layer)
    ranks = {r for rs in per_layer for r in rs}
    if len(ranks) > 1:
        raise ConfigError(f"combination_type={kind!r} combines the A and B factors entry by entry, so every adapter "
                          f"must have the same rank; found ranks {sorted(ranks)}. Use 'cat' or 'svd' (exact) instead.")
    return ranks.pop()


def _factor_wise(request: CombineRequest, layer: LoraLayer, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    a_list, b_list, wa, wb = [], [], [], []
    for adapter, weight in zip(request.adapters, request.weights):
        if adapter not in layer.r:
            continue
        a, b = factors(layer, adapter)
        scaled = weight * layer.scaling[adapter]
        a_list.append(a.float())
        b_list.append(b.float())
        wa.append(math.copysign(math.sqrt(abs(scaled)), scaled))
        wb.append(math.sqrt(abs(scaled)))
    kind, density, sign = request.combination_type, request.density, request.majority_sign_method
    return (merge_tensors(kind, a_list, wa, density, sign, generator),
            merge_tensors(kind, b_list, wb, density, sign, generator))


def _stacked(request: CombineRequest, layer: LoraLayer) -> tuple[torch.Tensor, torch.Tensor]:
    """``[w_i s_i A_i]`` stacked over rows and ``[B_i]`` over columns: ``B A = sum_i w_i s_i B_i A_i``."""
    pairs = [(factors(layer, a), w * layer.scaling[a]) for a, w in zip(request.adapters, request.weights) if a in layer.r]
    a = torch.cat([f[0].float() * scale for f, scale in pairs])
    b = torch.cat([f[1].float() for f, _ in pairs], dim=1)
    return a, b


def combine_lora(model: object, request: CombineRequest) -> None:
    """``MethodSpec.combine`` of LoRA (see the module docstring)."""
    configs = [model.peft_config[a] for a in request.adapters]
    _check(model, request, configs)
    layers = _layers(model, request.adapters)
    rank = _new_rank(request, layers)
    targets = "(?:" + "|".join(re.escape(p) for p in layers) + ")"
    config = replace(configs[0], r=rank, lora_alpha=rank, use_rslora=False, use_dora=False, rank_pattern={},
                     alpha_pattern={}, target_modules=targets, exclude_modules=None, layers_to_transform=None,
                     layers_pattern=None, init_lora_weights=True, inference_mode=False,
                     modules_to_save=next((c.modules_to_save for a, c in zip(request.adapters, configs)
                                           if model.saved_module_paths.get(a)), configs[0].modules_to_save))
    model.add_adapter(request.name, config)
    generator = request.generator()
    for layer in layers.values():
        if request.combination_type in EXACT:
            a, b = _stacked(request, layer)
            if request.combination_type == "svd":
                a, b = low_rank_svd(a, b, rank)
        else:
            a, b = _factor_wise(request, layer, generator)
        set_factors(layer, request.name, *_pad(a, b, rank))


__all__ = ["combine_lora", "factors", "low_rank_svd"]
