"""Weighted combinations of (IA)^3 adapters (``DeltaModel.add_weighted_adapter``, ``combination_type="linear"``).

An (IA)^3 vector acts multiplicatively and is the identity at ``l = 1``, so the task vector of adapter
``i`` is ``l_i - 1`` and the combination is

    l = 1 + sum_i w_i (l_i - 1)

on every layer any of them wraps (an adapter that does not wrap a layer contributes ``0``). With all
adapters on every layer and weights summing to 1 this is HF peft's ``sum_i w_i l_i``; unlike it, a
negative weight subtracts a task (peft's sum would shrink the activations towards zero) and a layer
only one adapter wraps keeps that adapter's scaling at weight 1.
"""

from __future__ import annotations

import re
from dataclasses import replace

import torch

from ...combination import CombineRequest
from ...errors import ConfigError
from ...inject import iter_wrappers
from .layer import IA3Layer


def combine_ia3(model: object, request: CombineRequest) -> None:
    """``MethodSpec.combine`` of (IA)^3 (see the module docstring)."""
    if request.combination_type != "linear":
        raise ConfigError(f"(IA)^3 adapters combine with combination_type='linear' (l = 1 + sum w_i (l_i - 1)); "
                          f"{request.combination_type!r} applies to low-rank factors only.")
    layers = {p: w for p, w in iter_wrappers(model.get_base_model())
              if isinstance(w, IA3Layer) and any(a in w.ia3_l for a in request.adapters)}
    feedforward = []
    for path, layer in layers.items():
        kinds = {layer.feedforward[a] for a in request.adapters if a in layer.ia3_l}
        if len(kinds) > 1:
            raise ConfigError(f"At {path} some adapters rescale the input (feed-forward) and others the output; "
                              "those vectors do not combine. Combine adapters with the same feedforward_modules.")
        if kinds.pop():
            feedforward.append(path)
    config = replace(model.peft_config[request.adapters[0]], inference_mode=False, init_ia3_weights=True,
                     target_modules="(?:" + "|".join(re.escape(p) for p in layers) + ")",
                     feedforward_modules="(?:" + "|".join(re.escape(p) for p in feedforward) + ")" if feedforward else [],
                     exclude_modules=None, layers_to_transform=None, layers_pattern=None)
    model.add_adapter(request.name, config)
    with torch.no_grad():
        for layer in layers.values():
            new = layer.ia3_l[request.name]
            new.fill_(1.0)
            for adapter, weight in zip(request.adapters, request.weights):
                if adapter in layer.ia3_l:
                    new.add_(weight * (layer.vector(adapter).detach().float() - 1.0))


__all__ = ["combine_ia3"]
