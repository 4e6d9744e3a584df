"""Initialisation of LoRA's ``A`` and ``B``.

* ``True``: ``A`` Kaiming-uniform (``a = sqrt(5)``, as ``nn.Linear``), ``B = 0`` — the model starts
  equal to the base. Embeddings swap the roles (``A = 0``, ``B`` normal), as in HF peft.
* ``"gaussian"``: ``A ~ N(0, 1/r)``, ``B = 0``.
* ``"pissa"``: with ``W = U S V^T``, ``A = sqrt(S_r / s) V_r^T``, ``B = U_r sqrt(S_r / s)`` and ``W``
  replaced by the residual ``W - s B A`` (Meng et al., arXiv 2404.02948): the model starts equal to
  the base, while the adapter holds the principal components. The saved adapter then only fits
  the residual base, which the fingerprint check enforces.
* ``False``: ``A`` and ``B`` both random (non-zero start; for tests of merging and saving).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from ...errors import ConfigError

if TYPE_CHECKING:
    from .layer import LoraLayer


def init_lora(layer: LoraLayer, name: str, mode: bool | str) -> None:
    with torch.no_grad():
        if hasattr(layer, "lora_embedding_A"):
            _init_embedding(layer, name, mode)
            return
        a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
        if mode == "pissa":
            _init_pissa(layer, name)
            return
        if mode == "gaussian":
            nn.init.normal_(a, std=1 / layer.r[name])
        else:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        if mode is False:
            nn.init.kaiming_uniform_(b, a=math.sqrt(5))
        else:
            nn.init.zeros_(b)


def _init_embedding(layer: LoraLayer, name: str, mode: bool | str) -> None:
    a, b = layer.lora_embedding_A[name], layer.lora_embedding_B[name]
    if mode == "pissa":
        raise ConfigError("init_lora_weights='pissa' supports linear layers only, not embeddings.")
    nn.init.normal_(b)
    if mode is False:
        nn.init.normal_(a)
    else:
        nn.init.zeros_(a)


def _init_pissa(layer: LoraLayer, name: str) -> None:
    if not hasattr(layer, "base_weight"):
        raise ConfigError("init_lora_weights='pissa' supports linear layers only.")
    r, s = layer.r[name], layer.scaling[name]
    weight = layer.base_weight().float()  # (out, in)
    u, sv, vh = torch.linalg.svd(weight, full_matrices=False)
    root = (sv[:r] / s).sqrt()
    layer.lora_A[name].weight.copy_(root[:, None] * vh[:r])  # (r, in)
    layer.lora_B[name].weight.copy_(u[:, :r] * root[None, :])  # (out, r)
    residual = weight - s * layer.lora_B[name].weight @ layer.lora_A[name].weight
    base = layer.get_base_layer().weight
    base.data.copy_((residual.T if layer.fan_in_fan_out else residual).to(base.dtype))
