"""(IA)^3 layers for linear (incl. transposed ``Conv1D``) and convolution modules.

For a frozen layer ``h = W x + b`` and a learned vector ``l`` the layer computes

    h = l * (W x + b)        (keys, values: the output is rescaled; ``l: (out,)``)
    h = W (l * x) + b        (feed-forward modules: the input is rescaled; ``l: (in,)``)

Merging is multiplicative: ``W <- W * l`` along the output rows (and ``b <- b * l``), or along the
input columns for feed-forward modules. Unmerging divides again, which restores the weights to
within one rounding step; where an entry of ``l`` is (near) zero the division cannot, so the
affected weights are kept aside at merge time and put back exactly.

Vectors are stored as HF peft stores them: ``(out, 1)`` or ``(1, in)`` for linear layers,
``(1, C, 1, ...)`` for convolutions.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ...errors import MergeError
from ...layer import DeltaLayer, scale_activation
from ...model_interface import is_linear_like, linear_dims
from ...routing import Routing, current_routing
from ...targeting import unwrapped
from ...weights import WeightSnapshot, read_weight, restore_weight, snapshot_weight, write_weight
from .config import IA3Config

_TINY = 1e-12  # |l| below this cannot be divided out again: keep the original weights instead
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def is_feedforward(path: str, feedforward_modules: list[str] | str | None) -> bool:
    """HF peft's rule: a string is a regex matching the whole path; a list entry matches a path ending with it."""
    if not feedforward_modules:
        return False
    if isinstance(feedforward_modules, str):
        return re.fullmatch(feedforward_modules, path) is not None
    return any(path.endswith(name) for name in feedforward_modules)


def _per_row(scale: torch.Tensor, dim: int, channel: int) -> torch.Tensor:
    """``(B, C)`` row vectors shaped to broadcast over a ``dim``-D activation with features at ``channel``."""
    shape = [scale.shape[0]] + [1] * (dim - 1)
    shape[channel] = scale.shape[1]
    return scale.view(shape)


class IA3Layer(DeltaLayer):
    """(IA)^3 on a linear-like or (ungrouped) convolution module; several adapters multiply."""

    adapter_attr_names = ("ia3_l",)
    routes_rows = True
    method_name = "ia3"

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        base = self.get_base_layer()
        self.is_conv = isinstance(base, _CONVS)
        self.transposed = not self.is_conv and not isinstance(base, nn.Linear)  # Conv1D: weight (in, out)
        if self.is_conv:
            self.in_features, self.out_features = base.in_channels, base.out_channels
        else:
            self.in_features, self.out_features = linear_dims(base)
        self.ia3_l = nn.ParameterDict()
        self.feedforward: dict[str, bool] = {}
        #: per adapter, output rows held at 1 (the query rows of a fused query/key/value projection)
        self.fixed_rows: dict[str, torch.Tensor] = {}
        self._stash: dict[str, WeightSnapshot] = {}

    def add(self, name: str, config: IA3Config, path: str = "") -> None:
        ff = is_feedforward(path, config.feedforward_modules)
        n = self.in_features if ff else self.out_features
        weight = self.get_base_layer().weight
        if self.is_conv:
            shape: tuple[int, ...] = (1, n) + (1,) * (weight.dim() - 2)  # (1, C, 1, ...)
        else:
            shape = (1, n) if ff else (n, 1)
        init = torch.ones if config.init_ia3_weights else torch.randn
        self.ia3_l[name] = nn.Parameter(init(shape, device=weight.device, dtype=torch.float32))
        self.feedforward[name] = ff
        rows = getattr(config, "fixed_rows", {}).get(path)
        if rows is not None and not ff and not self.is_conv:
            mask = torch.zeros(n, dtype=torch.bool, device=weight.device)
            mask[rows] = True
            self.fixed_rows[name] = mask.view(shape)
        self.set_active(self.active_adapters)

    def vector(self, name: str) -> torch.Tensor:
        """Adapter ``name``'s vector as it acts: ``ia3_l`` with its fixed rows at 1 (no gradient reaches them)."""
        mask = self.fixed_rows.get(name)
        vec = self.ia3_l[name]
        return vec if mask is None else vec.masked_fill(mask, 1.0)

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        """HF peft's ``ia3_l``, with fixed rows written as the 1 they act as."""
        state = super().adapter_state(name)
        if name in self.fixed_rows:
            state["ia3_l"] = self.vector(name).detach()
        return state

    def load_adapter_state(self, name: str, state: dict[str, torch.Tensor]) -> None:
        """A file whose fixed rows are not all 1 (HF peft scales the whole fused output) scales them all."""
        mask = self.fixed_rows.get(name)
        if mask is not None and not bool((state["ia3_l"].to(mask.device)[mask] == 1).all()):
            del self.fixed_rows[name]
        with torch.no_grad():
            self.ia3_l[name].copy_(state["ia3_l"].to(self.ia3_l[name].dtype))

    def delete(self, name: str) -> None:
        super().delete(name)
        self.feedforward.pop(name, None)
        self.fixed_rows.pop(name, None)

    # -- forward ---------------------------------------------------------------------------------
    def _scale(self, names: list[str]) -> torch.Tensor | None:
        """Product of the vectors of ``names``, shaped to broadcast over activations: ``(C,)`` or ``(1, C, 1, ...)``."""
        scale = None
        for name in names:
            vec = self.vector(name) if self.is_conv else self.vector(name).flatten()
            scale = vec if scale is None else scale * vec
        return scale

    def _routed_scales(self, names: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Input and output vectors of ``names`` stacked, plus a last all-ones slot (no adapter):
        ``(K+1, in)`` and ``(K+1, out)``; an adapter of the other kind has ones in the stack it does not use."""
        ones_in = self.ia3_l[names[0]].new_ones(self.in_features)
        ones_out = self.ia3_l[names[0]].new_ones(self.out_features)
        vec = {n: self.vector(n).flatten() for n in names}
        ins = [vec[n] if self.feedforward[n] else ones_in for n in names]
        outs = [ones_out if self.feedforward[n] else vec[n] for n in names]
        return torch.stack([*ins, ones_in]), torch.stack([*outs, ones_out])

    def _routed_forward(self, routing: Routing, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Each row scaled by its own adapter's gathered vector: ``h_b = l^out_b * W (l^in_b * x_b) + ...``."""
        names, uniform = self.routed_names(routing)
        if not names or uniform:
            return self._forward_with(names, x, *args, **kwargs)
        slots = routing.slots(names, x.shape[0], x.device)  # (B,)
        scale_in, scale_out = self.stacked(names, self._routed_scales)
        channel = 1 if self.is_conv else -1  # where the features are
        if any(self.feedforward[n] for n in names):
            x = scale_activation(x, _per_row(scale_in[slots], x.dim(), channel))  # (B, ..., in)
        result = self.base_layer(x, *args, **kwargs)
        if not all(self.feedforward[n] for n in names):
            result = scale_activation(result, _per_row(scale_out[slots], result.dim(), channel))  # (B, ..., out)
        return result

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disabled and self.merged_adapters:
            self.unmerge()
        routing = None if self.disabled else current_routing()
        if routing is not None:
            return self._routed_forward(routing, x, *args, **kwargs)
        live = [] if self.disabled else [n for n in self.active_adapters if n not in self.merged_adapters]
        return self._forward_with(live, x, *args, **kwargs)

    def _forward_with(self, live: list[str], x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        in_scale = self._scale([n for n in live if self.feedforward[n]])
        out_scale = self._scale([n for n in live if not self.feedforward[n]])
        if in_scale is not None:
            x = scale_activation(x, in_scale)  # (..., in)
        result = self.base_layer(x, *args, **kwargs)
        if out_scale is not None:
            result = scale_activation(result, out_scale)  # (..., out)
        return result

    # -- merging ---------------------------------------------------------------------------------
    def _weight_scale(self, name: str) -> torch.Tensor:
        """Adapter ``name``'s vector shaped to broadcast over the base weight."""
        vec = self.vector(name).detach().flatten().float()
        weight = self.get_base_layer().weight
        ff = self.feedforward[name]
        if self.is_conv:  # (out, in, *k)
            shape = [1] * weight.dim()
            shape[1 if ff else 0] = -1
        elif self.transposed:  # (in, out)
            shape = [-1, 1] if ff else [1, -1]
        else:  # (out, in)
            shape = [1, -1] if ff else [-1, 1]
        return vec.view(shape)

    def merge_one(self, name: str) -> None:
        """``W <- W * l`` (and ``b <- b * l`` for output scaling); refuses to write NaN/inf."""
        base = self.get_base_layer()
        bias = getattr(base, "bias", None)
        scale = self._weight_scale(name)
        new_weight = read_weight(base).float() * scale
        scales_bias = bias is not None and not self.feedforward[name]
        new_bias = (bias.float() * scale.flatten()).to(bias.dtype) if scales_bias else None
        if not torch.isfinite(new_weight).all() or (new_bias is not None and not torch.isfinite(new_bias).all()):
            raise MergeError(f"Merging ia3 adapter {name!r} gives NaN/inf weights; base left unchanged.")
        if (scale.abs() < _TINY).any():  # cannot be divided out again: keep the originals
            self._stash[name] = snapshot_weight(base)
        with torch.no_grad():
            write_weight(base, new_weight)
            if new_bias is not None:
                bias.copy_(new_bias)

    def unmerge_one(self, name: str) -> None:
        """``W <- W / l`` (or the weights kept aside at merge time)."""
        base = self.get_base_layer()
        bias = getattr(base, "bias", None)
        with torch.no_grad():
            if name in self._stash:
                restore_weight(base, self._stash.pop(name))
                return
            scale = self._weight_scale(name)
            write_weight(base, read_weight(base).float() / scale)
            if bias is not None and not self.feedforward[name]:
                bias.copy_((bias.float() / scale.flatten()).to(bias.dtype))


def can_wrap(module: nn.Module, config: IA3Config, path: str) -> str | None:
    """``None`` when (IA)^3 can wrap ``module``, else why not."""
    base = unwrapped(module)
    if isinstance(base, _CONVS):
        return None if base.groups == 1 else f"grouped convolution (groups={base.groups}) is not supported"
    if is_linear_like(base):
        return None
    return (f"{type(base).__name__} is not a linear or convolution layer; (IA)^3 rescales the features of "
            "nn.Linear, Conv1D or ungrouped nn.Conv1d/2d/3d")


__all__ = ["IA3Layer", "can_wrap", "is_feedforward"]
