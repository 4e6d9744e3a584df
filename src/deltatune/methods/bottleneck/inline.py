"""Parallel adapters beside a feed-forward block computed inline in its layer's forward.

BART-style layers run ``fc2(act(fc1(x)))`` in their own forward: no module takes ``x`` and returns
``FFN(x)``. The parallel adapter ``FFN(x) + a(x)`` then wraps the down projection (its output is
``FFN(x)``) and reads ``x`` where the block reads it: a forward pre-hook on the up projection hands its
input to the wrapper, which uses it once. Which up projection feeds which down projection comes from
the model's structure (:func:`deltatune.model_interface.model_roles`) and is saved in the config
(``parallel_inputs``), so a loaded adapter is wired the same way.
"""

from __future__ import annotations

import weakref
from typing import Any

from torch import nn

from ...model_interface import model_roles
from ...structure import original_modules
from .config import BottleneckConfig
from .layer import BottleneckLayer


def inline_sites(model: nn.Module) -> dict[str, str]:
    """``{down projection: up projection}`` of the feed-forward blocks computed inline."""
    return {s.down: (*s.gate, *s.up)[0] for s in model_roles(model).feed_forward if s.block is None and s.down}


class _HandInput:
    """Forward pre-hook on an up projection: give its input to the wrapper of the matching down projection."""

    def __init__(self, layer: BottleneckLayer) -> None:
        self.layer = weakref.ref(layer)

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        layer = self.layer()
        if layer is not None and args:
            layer.block_input = args[0]


def connect_inputs(model: nn.Module, config: BottleneckConfig, name: str) -> None:
    """Hook every up projection named in ``config.parallel_inputs`` to its down projection's wrapper (once)."""
    if config.variant != "parallel" or not config.parallel_inputs:
        return
    wrapped = dict(model.named_modules())
    originals = original_modules(model)
    for down, up in config.parallel_inputs.items():
        layer = wrapped.get(down)
        while (layer is not None and not isinstance(layer, BottleneckLayer)
               and getattr(layer, "_delta_base_child", None)):
            layer = getattr(layer, layer._delta_base_child)
        if not isinstance(layer, BottleneckLayer) or getattr(layer, "_input_hook", None) is not None:
            continue
        layer._input_hook = originals[up].register_forward_pre_hook(_HandInput(layer))


__all__ = ["connect_inputs", "inline_sites"]
