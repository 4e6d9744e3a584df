"""Modules trained in full and saved with the adapter (a task head, typically).

The original module stays untouched; each adapter trains its own copy, so adapters for different
tasks can share one base model. Disabling adapters routes calls to the original module.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import torch
from torch import nn


class ModulesToSaveWrapper(nn.Module):
    """Holds ``original_module`` and one trainable copy per adapter in ``modules_to_save``."""

    _delta_base_child: ClassVar[str] = "original_module"

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disabled = False

    @property
    def adapter_names(self) -> list[str]:
        return list(self.modules_to_save.keys())

    def add(self, name: str) -> None:
        copied = copy.deepcopy(self.original_module)
        for p in copied.parameters():
            p.requires_grad_(True)
        self.modules_to_save[name] = copied

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return list(self.modules_to_save[name].parameters()) if name in self.modules_to_save else []

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        """The copy's state, keyed like the original module (HF peft's on-disk naming)."""
        return dict(self.modules_to_save[name].state_dict()) if name in self.modules_to_save else {}

    def load_adapter_state(self, name: str, state: dict[str, torch.Tensor]) -> None:
        self.modules_to_save[name].load_state_dict(state, strict=False)

    def set_active(self, names: list[str]) -> None:
        """The first of ``names`` that has a copy here is used (one head at a time)."""
        self.active_adapter = next((n for n in names if n in self.modules_to_save), None)

    def delete(self, name: str) -> None:
        if name in self.modules_to_save:
            del self.modules_to_save[name]
        if self.active_adapter == name:
            self.active_adapter = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.disabled or self.active_adapter is None:
            return self.original_module(*args, **kwargs)
        return self.modules_to_save[self.active_adapter](*args, **kwargs)
