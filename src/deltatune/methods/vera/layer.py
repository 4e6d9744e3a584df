"""VeRA layer on linear layers (``nn.Linear``, transformers' ``Conv1D``).

    h = W x + b * (B[:out] (d * (A[:, :in] x))),   A: (r, in_max), B: (out_max, r), d: (r,), b: (out,)

``A`` and ``B`` are frozen, random and shared by all layers of one adapter (non-persistent buffers
referring to the same tensors); ``d`` and ``b`` train. Merging adds ``diag(b) B diag(d) A`` to ``W``.
Tensor names are HF peft's: ``vera_lambda_b``, ``vera_lambda_d``. Mixed-adapter batches: the shared
projections run once and each row gathers its own vectors (see :mod:`.batched`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...layer import DeltaLayer, row_dropout, to_delta_dtype
from ...model_interface import is_linear_like, linear_dims
from ...targeting import unwrapped
from ..lora.batched import LoraStack, routed_lora
from .batched import SharedVera, routed_shared_vera, stack_vera
from .config import VeraConfig


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """``U(-bound, bound)`` with ``bound = sqrt(3) * sqrt(2) / sqrt(shape[1])`` (Kaiming, fan-in, ReLU gain)."""
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def make_projections(seed: int, r: int, out_max: int, in_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared frozen ``A: (r, in_max)`` and ``B: (out_max, r)``, drawn in that order from ``seed`` on the CPU."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    a = kaiming_uniform((r, in_max), generator)
    b = kaiming_uniform((out_max, r), generator)
    return a, b


class Projections(nn.Module):
    """One adapter's shared ``A`` and ``B`` as seen by one layer (non-persistent buffers: not in ``state_dict``)."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("A", a, persistent=False)
        self.register_buffer("B", b, persistent=False)


class VeraLinear(DeltaLayer):
    adapter_attr_names = ("vera_lambda_b", "vera_lambda_d")
    method_name = "vera"

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        base = self.get_base_layer()
        self.transposed = not isinstance(base, nn.Linear)
        self.in_features, self.out_features = linear_dims(base)
        self.vera_lambda_b = nn.ParameterDict()
        self.vera_lambda_d = nn.ParameterDict()
        self.vera_projections = nn.ModuleDict()
        self.dropout_p: dict[str, float] = {}

    def add(self, name: str, config: VeraConfig, path: str = "") -> None:
        a, b = shared_projections(config)
        if a.shape[1] < self.in_features or b.shape[0] < self.out_features:
            raise ValueError(f"VeRA projections {tuple(a.shape)}/{tuple(b.shape)} are too small for this layer")
        self.vera_projections[name] = Projections(a, b)
        device = self.get_base_layer().weight.device
        if config.init_weights:
            lam_b, lam_d = torch.zeros(self.out_features), torch.full((config.r,), float(config.d_initial))
        else:
            lam_b, lam_d = torch.ones(self.out_features), torch.randn(config.r)
        self.vera_lambda_b[name] = nn.Parameter(lam_b.to(device))  # (out,)
        self.vera_lambda_d[name] = nn.Parameter(lam_d.to(device))  # (r,)
        self.dropout_p[name] = config.vera_dropout

    def _sliced(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        proj = self.vera_projections[name]
        return proj.A[:, : self.in_features], proj.B[: self.out_features, :]  # (r, in), (out, r)

    def add_delta(self, name: str, x: torch.Tensor, result: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        a, b = self._sliced(name)
        lam_b, lam_d = self.vera_lambda_b[name], self.vera_lambda_d[name]
        x = to_delta_dtype(x, lam_d.dtype)
        if self.training and self.dropout_p[name] > 0:
            x = F.dropout(x, self.dropout_p[name], training=True)
        hidden = lam_d * F.linear(x, a.to(lam_d.dtype))  # (..., r)
        return result + (lam_b * F.linear(hidden, b.to(lam_d.dtype))).to(result.dtype)  # (..., out)

    def add_routed_delta(self, names: list[str], slots: torch.Tensor, x: torch.Tensor, result: torch.Tensor,
                         *args: Any, **kwargs: Any) -> torch.Tensor:
        """Every row with its own adapter's vectors: shared projections once, or the LoRA form (:mod:`.batched`)."""
        stack = self.stacked(names, self._vera_stack)
        x = row_dropout(to_delta_dtype(x, self.vera_lambda_d[names[0]].dtype), [self.dropout_p[n] for n in names],
                        slots, self.training)
        if isinstance(stack, SharedVera):
            return result + routed_shared_vera(stack, slots, x).to(result.dtype)
        return routed_lora(stack, slots, x, result, None)

    def _vera_stack(self, names: Sequence[str]) -> SharedVera | LoraStack:
        dtype = self.vera_lambda_d[names[0]].dtype
        sliced = [self._sliced(n) for n in names]
        return stack_vera([a.to(dtype) for a, _ in sliced], [b.to(dtype) for _, b in sliced],
                          [self.vera_lambda_d[n] for n in names], [self.vera_lambda_b[n] for n in names])

    def delta_weight(self, name: str) -> torch.Tensor:
        """``diag(b) B diag(d) A`` in the base weight's layout."""
        a, b = self._sliced(name)
        delta = (self.vera_lambda_b[name][:, None] * b.float()) @ (self.vera_lambda_d[name][:, None] * a.float())
        return delta.T if self.transposed else delta  # (out, in) or (in, out)

    def delete(self, name: str) -> None:
        super().delete(name)
        if name in self.vera_projections:
            del self.vera_projections[name]
        self.dropout_p.pop(name, None)


def shared_projections(config: VeraConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The projections :func:`deltatune.methods.vera.prepare_config` attached to this adapter's config."""
    projections = getattr(config, "_vera_projections", None)
    if projections is None:
        raise RuntimeError("VeRA layers are made through DeltaModel.add_adapter, which draws the shared projections")
    return projections


def can_wrap(module: nn.Module, config: VeraConfig, path: str) -> str | None:
    """``None`` when VeRA can wrap ``module``, else why not."""
    base = unwrapped(module)
    return None if is_linear_like(base) else f"{type(base).__name__} is not supported (VeRA wraps nn.Linear and Conv1D)"


__all__ = ["VeraLinear", "can_wrap", "make_projections"]
