"""Small facts about single modules: linear or not, their sizes, what sits under deltatune's wrappers.

Everything that reads a model's structure (targeting, role inference, the methods) asks these,
so a transposed ``Conv1D`` or a module already wrapped by an adapter is seen the same way everywhere.
"""

from __future__ import annotations

import functools
import inspect

import torch
from torch import nn

from .vocabulary import RESIDUAL_ARGS


def unwrapped(module: nn.Module) -> nn.Module:
    """The original module under any deltatune wrappers (``_delta_base_child`` names the wrapped child)."""
    while getattr(module, "_delta_base_child", None):
        module = getattr(module, module._delta_base_child)
    return module


def original_modules(model: nn.Module) -> dict[str, nn.Module]:
    """``{path: module}`` of the model as it was before any wrapper: a wrapper's path maps to the module it wraps,
    the adapter tensors inside wrappers are left out."""
    found: dict[str, nn.Module] = {}

    def visit(module: nn.Module, path: str) -> None:
        module = unwrapped(module)
        found[path] = module
        for name, child in module.named_children():
            visit(child, f"{path}.{name}" if path else name)

    visit(model, "")
    return found


def is_linear_like(module: nn.Module) -> bool:
    """``nn.Linear`` or a transposed linear layer (transformers' GPT-2 style ``Conv1D``)."""
    if isinstance(module, nn.Linear):
        return True
    weight = getattr(module, "weight", None)
    return type(module).__name__ == "Conv1D" and isinstance(weight, nn.Parameter) and weight.dim() == 2


def is_transposed_linear(module: nn.Module) -> bool:
    """A linear layer that stores its weight ``(in, out)`` and computes ``x W + b`` (transformers' ``Conv1D``)."""
    return is_linear_like(module) and not isinstance(module, nn.Linear)


def row_major_weight(module: nn.Module) -> torch.Tensor:
    """A float linear-like module's weight as ``(out, in)``: ``nn.Linear``'s own, ``Conv1D``'s transposed (a view)."""
    return module.weight.T if is_transposed_linear(module) else module.weight


def linear_dims(module: nn.Module) -> tuple[int, int] | None:
    """``(in_features, out_features)`` of a linear-like module (``Conv1D`` stores its weight ``(in, out)``)."""
    if not is_linear_like(module):
        return None
    if isinstance(module, nn.Linear):  # read the sizes, not the weight: a quantized weight is packed
        return module.in_features, module.out_features
    rows, cols = module.weight.shape
    return (cols, rows) if isinstance(module, nn.Linear) else (rows, cols)


def is_norm_layer(module: nn.Module) -> bool:
    """A normalisation layer with a learned scale (``nn.LayerNorm``, ``LlamaRMSNorm``, ``T5LayerNorm``, ...).

    Recognised by structure, not by a list of classes: a subclass of ``nn.LayerNorm`` / ``nn.RMSNorm``
    (Nemotron's ``LayerNorm1P``) or a class name ending in ``Norm`` (any case), owning a ``weight``
    parameter. Batch/group norms are left out (their features live on dimension 1).
    """
    name = type(module).__name__.lower()
    named = name.endswith("norm") and not name.startswith(("batchnorm", "groupnorm", "instancenorm"))
    if not named and not isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        return False
    return isinstance(getattr(module, "weight", None), nn.Parameter)


@functools.lru_cache(maxsize=256)
def _residual_arg_of(cls: type) -> int | None:
    try:
        params = [p for p in inspect.signature(cls.forward).parameters.values() if p.name != "self"]
    except (TypeError, ValueError):
        return None
    if len(params) >= 2 and params[1].name in RESIDUAL_ARGS and params[1].default is inspect.Parameter.empty:
        return 1
    return None


def residual_input_arg(module: nn.Module) -> int | None:
    """Positional index of the residual input of a block ``f(h, residual) = Norm(dense(h) + residual)``.

    BERT-style output blocks (``BertOutput(hidden_states, input_tensor)``) receive the block's input
    as a second argument; something added *beside* the feed-forward block is added to that argument,
    which equals adding it to the block's output before the norm. ``None`` for any other module.
    """
    return _residual_arg_of(type(unwrapped(module)))
