"""LayerNorm-tuning layer: each adapter owns a trained copy of the wrapped normalisation layer.

    h = LN_a(x)      LN_a: adapter a's copy of the frozen LN (scale gamma_a, shift beta_a)

The copy starts equal to the original, so the model starts equal to the base. One adapter acts at a
time (two copies of one norm do not compose). Merging copies the adapter's scale and shift into the
base layer (the originals are kept aside); unmerging puts the originals back bit-exactly. Tensors
are saved as HF peft saves them: ``<module>.ln_tuning_layers.weight`` (and ``.bias``). In a mixed-adapter
batch the input is normalised once and each row gets its own adapter's scale and shift (:mod:`.batched`).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ...errors import ConfigError, MergeError
from ...layer import DeltaLayer
from ...model_interface import is_norm_layer
from ...routing import Routing, current_routing
from ...targeting import unwrapped
from .batched import is_affine_in_parameters, normalised, routed_affine, stack_affine
from .config import LNTuningConfig


class LNTuningLayer(DeltaLayer):
    """A normalisation layer plus one trainable copy of it per adapter (``ln_tuning_layers[name]``)."""

    adapter_attr_names = ("ln_tuning_layers",)
    method_name = "ln_tuning"
    routes_rows = True  # mixed-adapter batches: normalise once, each row's own scale and shift (see .batched)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.ln_tuning_layers = nn.ModuleDict()
        self._originals: dict[str, dict[str, torch.Tensor]] = {}

    def add(self, name: str, config: LNTuningConfig, path: str = "") -> None:
        tuned = copy.deepcopy(self.get_base_layer())
        for p in tuned.parameters():
            p.requires_grad_(False)  # DeltaModel decides what trains
        self.ln_tuning_layers[name] = tuned

    def _affine_stack(self, names: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        return stack_affine([*(self.ln_tuning_layers[n] for n in names), self.get_base_layer()])

    def _gathers(self) -> bool:
        """Whether mixed batches can gather scale and shift (an affine norm not wrapped by another method)."""
        found = self.__dict__.get("_affine")
        if found is None:
            base = self.get_base_layer()
            found = self.__dict__["_affine"] = self.base_layer is base and is_affine_in_parameters(base)
        return found

    def _routed_forward(self, routing: Routing, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Every row through its own adapter's copy of the norm (the base layer for rows of no adapter)."""
        names, uniform = self.routed_names(routing)
        if not names:
            return self.base_layer(x, *args, **kwargs)
        if uniform:
            return self.ln_tuning_layers[names[0]](x, *args, **kwargs)
        slots = routing.slots(names, x.shape[0], x.device)  # (B,); len(names): the base layer
        if self._gathers() and not args and not kwargs:
            weight, bias = self.stacked(names, self._affine_stack)  # (K+1, C) each
            return routed_affine(weight, bias, slots, normalised(self.get_base_layer(), x))
        out = self.base_layer(x, *args, **kwargs)  # another form of norm: each copy on its own rows
        for i, name in enumerate(names):
            rows = (slots == i).nonzero().flatten()  # (n_i,)
            if rows.numel():
                out = out.index_copy(0, rows, self.ln_tuning_layers[name](x.index_select(0, rows), *args, **kwargs))
        return out

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disabled and self.merged_adapters:
            self.unmerge()
        routing = None if self.disabled else current_routing()
        if routing is not None:
            return self._routed_forward(routing, x, *args, **kwargs)
        live = [] if self.disabled else [n for n in self.active_adapters if n not in self.merged_adapters]
        if not live:
            return self.base_layer(x, *args, **kwargs)
        if len(live) > 1 or self.merged_adapters:
            raise ConfigError(
                f"LayerNorm tuning runs one adapter at a time; {live + self.merged_adapters} are active on this layer. "
                "Activate one of them with set_adapter(name)."
            )
        return self.ln_tuning_layers[live[0]](x, *args, **kwargs)

    def merge_one(self, name: str) -> None:
        """Copy adapter ``name``'s parameters into the base layer, keeping the originals aside."""
        if self.merged_adapters:
            raise MergeError(
                f"LayerNorm tuning merges one adapter at a time; {self.merged_adapters} is merged already. "
                "Call unmerge_adapter() first."
            )
        base = self.get_base_layer()
        self._originals[name] = {k: p.detach().clone() for k, p in base.named_parameters()}
        tuned = dict(self.ln_tuning_layers[name].named_parameters())
        with torch.no_grad():
            for key, param in base.named_parameters():
                param.copy_(tuned[key].to(param.dtype))

    def unmerge_one(self, name: str) -> None:
        originals = self._originals.pop(name)
        with torch.no_grad():
            for key, param in self.get_base_layer().named_parameters():
                param.copy_(originals[key])


def can_wrap(module: nn.Module, config: LNTuningConfig, path: str) -> str | None:
    """``None`` when LayerNorm tuning can wrap ``module``, else why not."""
    base = unwrapped(module)
    if is_norm_layer(base):
        return None
    return (f"{type(base).__name__} is not a normalisation layer (LayerNorm, RMSNorm, ...); LayerNorm tuning "
            "trains the scale and shift of those")


__all__ = ["LNTuningLayer", "can_wrap"]
