"""LoRA's ``bias`` option: base biases trained, and saved, with the adapter.

* ``"none"``: no bias trains;
* ``"all"``: every bias of the model trains (heads in ``modules_to_save`` excepted: their trained
  copy, bias included, is saved anyway);
* ``"lora_only"``: the biases of the layers LoRA wraps train.
"""

from __future__ import annotations

from torch import nn

from ...modules_to_save import ModulesToSaveWrapper
from .config import LoraConfig
from .layer import LoraLayer


def trained_biases(config: LoraConfig, model: nn.Module) -> dict[str, nn.Parameter]:
    """Base biases trained with the adapter, keyed by their path in the wrapped model."""
    if config.bias == "none":
        return {}
    if config.bias == "all":
        heads = tuple(f"{p}." for p, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper))
        return {n: p for n, p in model.named_parameters()
                if (n == "bias" or n.endswith(".bias")) and not n.startswith(heads)}
    out = {}
    for path, module in model.named_modules():
        bias = getattr(module.get_base_layer(), "bias", None) if isinstance(module, LoraLayer) else None
        if isinstance(bias, nn.Parameter):
            out[f"{path}.{module._delta_base_child}.bias"] = bias
    return out
