"""Modules trained in full and saved with the adapter (a task head, typically).

The original module stays untouched; each adapter trains its own copy, so adapters for different
tasks can share one base model. Disabling adapters routes calls to the original module.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import torch
from torch import nn

from .routing import Routing, current_routing


def _rows_of(value: Any, rows: torch.Tensor, n: int) -> Any:
    """``value[rows]`` for a batched tensor argument (first dimension ``n``); anything else as it is."""
    if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == n:
        return value.index_select(0, rows)
    return value


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
        routing = None if self.disabled else current_routing()
        if routing is not None:
            return self._routed(routing, args, kwargs)
        if self.disabled or self.active_adapter is None:
            return self.original_module(*args, **kwargs)
        return self.modules_to_save[self.active_adapter](*args, **kwargs)

    def _module_for(self, name: str) -> nn.Module:
        return self.modules_to_save[name] if name in self.modules_to_save else self.original_module  # noqa: SIM401

    def _routed(self, routing: Routing, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Each row through its adapter's copy (the original module for the base and adapters without one).

        Copies are whole modules of any kind (a task head), so rows are grouped by copy: one call per
        distinct copy in the batch, on that copy's rows only.
        """
        if routing.uniform is not None:
            return self._module_for(routing.uniform)(*args, **kwargs)
        x = args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
        n = x.shape[0]
        rows_of = routing.rows(n).tolist()
        names = [routing.names[i] if i >= 0 and routing.names[i] in self.modules_to_save else "" for i in rows_of]
        out: torch.Tensor | None = None
        for name in dict.fromkeys(names):
            rows = torch.tensor([i for i, m in enumerate(names) if m == name], device=x.device)
            part = (self.modules_to_save[name] if name else self.original_module)(
                *[_rows_of(a, rows, n) for a in args], **{k: _rows_of(v, rows, n) for k, v in kwargs.items()})
            if not isinstance(part, torch.Tensor):
                raise TypeError(f"modules_to_save in a mixed batch must return one tensor; got {type(part).__name__}.")
            if out is None:
                out = part.new_empty(n, *part.shape[1:])
            out = out.index_copy(0, rows, part)
        assert out is not None
        return out
