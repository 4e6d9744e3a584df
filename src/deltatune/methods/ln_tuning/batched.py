"""LayerNorm tuning for a mixed-adapter batch: normalise once, then each row's own scale and shift.

Every normalisation layer LayerNorm tuning wraps (``LayerNorm``, ``RMSNorm``, ``T5LayerNorm``, ...)
computes, for its scale ``gamma`` and (optional) shift ``beta``,

    LN(x; gamma, beta) = gamma * n(x) + beta       n(x) = LN(x; 1, 0)

so a batch whose rows use different adapters normalises once and gathers per row:

    y_b = gamma[k_b] * n(x_b) + beta[k_b]     gamma, beta: (K+1, C), slot K = the base layer's own

A norm of another form (Gemma's and Nemotron's ``(1 + gamma) * n(x)``, anything else) is found by a
probe (:func:`is_affine_in_parameters`) and served by one run of each adapter's copy on its rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.func import functional_call

AFFINE_PARAMETERS = ("weight", "bias")


def _parameters(norm: nn.Module) -> dict[str, torch.Tensor]:
    return dict(norm.named_parameters(recurse=False))


def normalised(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``n(x) = LN(x; 1, 0)``: ``norm`` run with unit scale and zero shift."""
    identity = {k: torch.ones_like(p) if k == "weight" else torch.zeros_like(p) for k, p in _parameters(norm).items()}
    return functional_call(norm, identity, (x,))


def is_affine_in_parameters(norm: nn.Module) -> bool:
    """Whether ``norm(x) == weight * n(x) + bias`` (checked on a random probe, parameters ``weight``/``bias`` only)."""
    params = _parameters(norm)
    if "weight" not in params or set(params) - set(AFFINE_PARAMETERS) or any(
            len(list(m.parameters())) for m in norm.children()):
        return False
    weight = params["weight"]
    gen = torch.Generator(device="cpu").manual_seed(0)
    probe = torch.randn((3, *weight.shape), generator=gen).to(weight.device, weight.dtype)
    trial = {k: (torch.randn(p.shape, generator=gen) + 2).to(p.device, p.dtype) for k, p in params.items()}
    with torch.no_grad():
        got = functional_call(norm, trial, (probe,))
        want = trial["weight"] * normalised(norm, probe) + trial.get("bias", 0)
    return got.shape == want.shape and torch.allclose(got.float(), want.float(), rtol=1e-3, atol=1e-3)


def stack_affine(norms: Sequence[nn.Module]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales ``(K+1, *C)`` and shifts ``(K+1, *C)`` (``None`` when no norm has one) of ``norms``; the
    last norm is the base layer (the slot of rows of no adapter)."""
    params = [_parameters(n) for n in norms]
    weight = torch.stack([p["weight"] for p in params])
    if not any("bias" in p for p in params):
        return weight, None
    return weight, torch.stack([p["bias"] if "bias" in p else torch.zeros_like(p["weight"]) for p in params])


def routed_affine(weight: torch.Tensor, bias: torch.Tensor | None, slots: torch.Tensor,
                  normed: torch.Tensor) -> torch.Tensor:
    """``weight[k_i] * normed_i + bias[k_i]`` for every row ``i`` of ``normed: (n, ..., *C)``."""
    n, feature_dims = normed.shape[0], weight.dim() - 1
    shape = (n, *([1] * (normed.dim() - 1 - feature_dims)), *weight.shape[1:])  # (n, 1.., *C)
    out = weight[slots].view(shape) * normed
    return out if bias is None else out + bias[slots].view(shape)


__all__ = ["is_affine_in_parameters", "normalised", "routed_affine", "stack_affine"]
