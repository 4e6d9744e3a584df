"""LoftQ on a base that is quantized already, with the float weights read from its safetensors file.

A model loaded 4-bit (``BitsAndBytesConfig``, ``--quantize nf4``, :func:`deltatune.quantize`) holds ``Q = quant(W)``
but not ``W``. :func:`replace_lora_weights_loftq` reads each wrapped layer's float ``W`` from the model's
``safetensors`` file (never a pickle) and sets the LoRA factors of one LoftQ step (Li et al., arXiv 2310.08659)::

    U S V^T = svd(W - dequant(Q))        A = sqrt(S_r / s) V_r^T   (r, in)      B = U_r sqrt(S_r / s)   (out, r)

so that ``Q + s B A`` is the closest such model to ``W``; ``Q`` itself stays as it is (one step: the base is
the usual quantized load, and the adapter saved later fits it). This is what ``init_lora_weights="loftq"`` with
``loftq_iter=1`` gives on the float model, and HF peft's function of this name (which leaves ``s`` out of the
split: equal for ``lora_alpha == r``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ...errors import ConfigError
from ...inject import iter_wrappers
from ...weights import quantization
from .layer import LoraLinear
from .loftq import svd_factors


def _weight_files(model_path: str | Path) -> dict[str, Path] | Path:
    """One ``.safetensors`` file, or ``{tensor name: shard}`` from a sharded folder's index."""
    path = Path(model_path)
    if path.is_file():
        return path
    if (path / "model.safetensors").is_file():
        return path / "model.safetensors"
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return {name: path / shard for name, shard in weight_map.items()}
    raise ConfigError(f"replace_lora_weights_loftq: no model.safetensors (or sharded index) in {path}; pass the folder "
                      "or file of the float model in safetensors format (pickled .bin files are not read).")


def _read_float_weights(model_path: str | Path, paths: list[str], prefix: str | None) -> dict[str, torch.Tensor]:
    """``{module path: float weight}``, looked up as ``path.weight`` with or without the model's prefix."""
    from safetensors import safe_open

    files = _weight_files(model_path)
    shards = sorted(set(files.values())) if isinstance(files, dict) else [files]
    found: dict[str, torch.Tensor] = {}
    for shard in shards:
        with safe_open(str(shard), framework="pt", device="cpu") as handle:
            names = set(handle.keys())
            for path in paths:
                candidates = [f"{path}.weight"]
                if prefix and path.startswith(prefix + "."):
                    candidates.append(f"{path[len(prefix) + 1:]}.weight")
                elif prefix:
                    candidates.append(f"{prefix}.{path}.weight")
                key = next((k for k in candidates if k in names), None)
                if path not in found and key is not None:
                    found[path] = handle.get_tensor(key)
    missing = [p for p in paths if p not in found]
    if missing:
        raise ConfigError(f"replace_lora_weights_loftq: {len(missing)} wrapped layers have no weight in {model_path} "
                          f"(first: {missing[0]}.weight); pass the float model these layers were quantized from.")
    return found


@torch.no_grad()
def replace_lora_weights_loftq(
    model: nn.Module, model_path: str | Path, adapter_name: str = "default",
    callback: Callable[[nn.Module, str], bool] | None = None,
) -> list[str]:
    """Set adapter ``adapter_name``'s ``A``, ``B`` on every quantized base layer of ``model`` (a ``DeltaModel``)
    to LoftQ's one-step fit of ``W - dequant(Q)``, ``W`` read from ``model_path``; returns the layer paths changed.

    ``callback(model, path)`` (optional) runs after each layer; returning ``False`` puts that layer's old
    factors back (peft's hook for keeping only layers that improve a check of yours). Every float weight is
    read, and its shape checked, before the first layer changes.
    """
    base_model = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = {path: layer for path, layer in iter_wrappers(base_model)
              if isinstance(layer, LoraLinear) and adapter_name in layer.lora_A
              and quantization(layer.get_base_layer()) is not None}
    if not layers:
        raise ConfigError(f"replace_lora_weights_loftq: no LoRA layer of adapter {adapter_name!r} wraps a quantized "
                          "linear layer; load the base quantized (e.g. --quantize nf4) before adding the adapter.")
    weights = _read_float_weights(model_path, list(layers), getattr(base_model, "base_model_prefix", None))
    for path, layer in layers.items():
        shape = (layer.out_features, layer.in_features)
        if tuple(weights[path].shape) != shape:
            raise ConfigError(f"replace_lora_weights_loftq: {path}.weight in {model_path} is "
                              f"{tuple(weights[path].shape)}, the layer is {shape}; is it the same model?")
    kept: list[str] = []
    for path, layer in layers.items():
        a, b = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
        before = (a.detach().clone(), b.detach().clone())
        q = layer.base_weight()  # dequant(Q)   (out, in)
        factor_a, factor_b = svd_factors(weights[path].to(q.device).float() - q, a.shape[0], layer.scaling[adapter_name])
        a.copy_(factor_a)
        b.copy_(factor_b)
        if callback is not None and not callback(model, path):
            a.copy_(before[0])
            b.copy_(before[1])
        else:
            kept.append(path)
    return kept
