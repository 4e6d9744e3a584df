"""LoRA on 3-D expert parameters (``target_parameters``): mixture-of-experts layers of transformers 5.

transformers 5 keeps all experts of a layer in one parameter, ``W: (E, out, in)`` (``(E, in, out)`` where
the experts module sets ``is_transposed``). Each expert ``e`` gets its own low-rank update:

    W_e' = W_e + s * B_e A_e,    A_e: (r, in),  B_e: (out, r),  s = alpha / r

stored as HF peft's ``ParamWrapper`` stores them, so files load in either library: ``lora_A.weight``
``(r * E, in)`` holds ``A_e`` in rows ``e*r .. e*r + r``; ``lora_B.weight`` ``(out, r * E)`` holds ``B_e``
in columns ``j * E + e`` (``j < r``). One wrapper serves every targeted parameter of a module; in the
file the parameters are nested as peft nests its wrappers: the first registered parameter's tensors
sit deepest (``experts.base_layer.lora_A.weight`` for ``gate_up_proj``, ``experts.lora_A.weight`` for
``down_proj``). The forward runs the experts module with ``W'`` in place of ``W``
(``torch.func.functional_call``); merging adds ``s B_e A_e`` to ``W`` in place.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from ...errors import ConfigError
from ...layer import DeltaLayer
from .config import REWRITES_BASE, LoraConfig


def expert_dims(module: nn.Module, param: str) -> tuple[int, int, int]:
    """``(experts, in, out)`` of 3-D parameter ``param`` of ``module``."""
    experts, first, second = getattr(module, param).shape
    return (experts, first, second) if getattr(module, "is_transposed", False) else (experts, second, first)


class LoraExperts(DeltaLayer):
    """Per-expert LoRA on the 3-D parameters ``params`` of one experts module."""

    adapter_attr_names = ("lora_A", "lora_B")
    method_name = "lora"

    def __init__(self, base_layer: nn.Module, params: list[str]) -> None:
        super().__init__(base_layer)
        owned = [n for n, _ in self.get_base_layer().named_parameters(recurse=False)]
        self.params = [n for n in owned if n in params]  # registration order: peft's nesting order
        self.lora_A = nn.ModuleDict()  # adapter -> {param: Linear(in, r * E)}
        self.lora_B = nn.ModuleDict()  # adapter -> {param: Linear(r * E, out)}
        self.scaling: dict[str, float] = {}

    def add(self, name: str, config: LoraConfig, path: str = "") -> None:
        if config.lora_dropout or config.use_dora or config.bias != "none" or config.init_lora_weights in REWRITES_BASE:
            raise ConfigError(
                "target_parameters (LoRA on 3-D expert weights) supports neither lora_dropout, use_dora, bias nor "
                "PiSSA/OLoRA init (as in HF peft); set lora_dropout=0, use_dora=False, bias='none'."
            )
        base = self.get_base_layer()
        a_dict, b_dict = nn.ModuleDict(), nn.ModuleDict()
        for param in self.params:
            experts, d_in, d_out = expert_dims(base, param)
            weight = getattr(base, param)
            a = nn.Linear(d_in, config.r * experts, bias=False, device=weight.device, dtype=torch.float32)
            b = nn.Linear(config.r * experts, d_out, bias=False, device=weight.device, dtype=torch.float32)
            with torch.no_grad():
                nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
                if config.init_lora_weights is False:
                    nn.init.kaiming_uniform_(b.weight, a=math.sqrt(5))
                else:
                    nn.init.zeros_(b.weight)
            a_dict[param], b_dict[param] = a, b
        self.lora_A[name], self.lora_B[name] = a_dict, b_dict
        self.scaling[name] = config.lora_alpha / (math.sqrt(config.r) if config.use_rslora else config.r)
        self.set_active(self.active_adapters)

    def delete(self, name: str) -> None:
        super().delete(name)
        self.scaling.pop(name, None)

    def expert_delta(self, name: str, param: str) -> torch.Tensor:
        """``s * B_e A_e`` for every expert, laid out like the parameter: ``(E, out, in)`` or ``(E, in, out)``."""
        base = self.get_base_layer()
        experts, d_in, d_out = expert_dims(base, param)
        a = self.lora_A[name][param].weight.reshape(experts, -1, d_in)  # (E, r, in)
        b = self.lora_B[name][param].weight.reshape(d_out, -1, experts).permute(2, 0, 1)  # (E, out, r)
        delta = torch.bmm(b, a) * self.scaling[name]  # (E, out, in)
        return delta.transpose(1, 2) if getattr(base, "is_transposed", False) else delta

    # -- file layout: peft's nested ParamWrappers ------------------------------------------------
    def _prefix(self, param: str) -> str:
        return "base_layer." * (len(self.params) - 1 - self.params.index(param))

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        if name not in self.lora_A:
            return {}
        return {f"{self._prefix(p)}{attr}.weight": getattr(self, attr)[name][p].weight
                for p in self.params for attr in ("lora_A", "lora_B")}

    # -- forward and merging ---------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.disabled and self.merged_adapters:
            self.unmerge()
        live = [] if self.disabled else [n for n in self.active_adapters if n not in self.merged_adapters]
        base = self.get_base_layer()
        if not live:
            return self.base_layer(*args, **kwargs)
        swapped = {}
        for param in self.params:
            weight = getattr(base, param)
            delta = sum(self.expert_delta(n, param) for n in live)
            swapped[param] = weight + delta.to(weight.dtype)
        return functional_call(base, swapped, args, kwargs, strict=False)

    def merge_one(self, name: str) -> None:
        base = self.get_base_layer()
        with torch.no_grad():
            for param in self.params:
                weight = getattr(base, param)
                weight.data += self.expert_delta(name, param).to(weight.dtype)

    def unmerge_one(self, name: str) -> None:
        base = self.get_base_layer()
        with torch.no_grad():
            for param in self.params:
                weight = getattr(base, param)
                weight.data -= self.expert_delta(name, param).to(weight.dtype)


def make_lora_experts(module: nn.Module, config: LoraConfig, name: str, path: str, params: list[str]) -> LoraExperts:
    """Wrap the experts module ``module`` (or add adapter ``name`` to its existing wrapper)."""
    if isinstance(module, LoraExperts):
        if sorted(module.params) != sorted(params):
            raise ConfigError(f"{path}: every adapter must target the same expert parameters ({module.params}).")
        module.add(name, config, path)
        return module
    layer = LoraExperts(module, params)
    layer.add(name, config, path)
    return layer


__all__ = ["LoraExperts", "expert_dims", "make_lora_experts"]
