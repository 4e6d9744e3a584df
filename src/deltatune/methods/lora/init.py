"""Initialisation of LoRA's ``A`` and ``B``.

* ``True``: ``A`` Kaiming-uniform (``a = sqrt(5)``, as ``nn.Linear``), ``B = 0`` — the model starts
  equal to the base. Embeddings swap the roles (``A = 0``, ``B`` normal), as in HF peft.
* ``"gaussian"``: ``A ~ N(0, 1/r)``, ``B = 0``.
* ``"pissa"``: with ``W = U S V^T``, ``A = sqrt(S_r / s) V_r^T``, ``B = U_r sqrt(S_r / s)`` and ``W``
  replaced by the residual ``W - s B A`` (Meng et al., arXiv 2404.02948): the model starts equal to
  the base, while the adapter holds the principal components. The saved adapter then only fits
  the residual base, which the fingerprint check enforces.
* ``"olora"``: with the thin QR ``W = Q R``, ``A = R_r`` (first ``r`` rows), ``B = Q_r`` (first ``r``
  columns) and ``W`` replaced by ``W - s B A`` (Buyukakyuz, arXiv 2406.01775): orthonormal ``B``, the
  model starts equal to the base; like PiSSA the saved adapter fits the residual base.
* ``"loftq"``: ``A``, ``B`` and the base's quantization ``Q`` fitted together (Li et al., arXiv 2310.08659);
  see :mod:`.loftq`.
* ``False``: ``A`` and ``B`` both random (non-zero start; for tests of merging and saving).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ...errors import ConfigError


def init_lora(a: torch.Tensor, b: torch.Tensor, mode: bool | str, r: int) -> None:
    """Initialise a linear or convolution LoRA pair in place: ``a`` is ``A`` ``(r, in, ...)``, ``b`` is ``B``."""
    if mode in ("pissa", "olora", "loftq"):
        raise ConfigError(f"init_lora_weights={mode!r} supports linear layers only; use init_{mode} for those.")
    with torch.no_grad():
        if mode == "gaussian":
            nn.init.normal_(a, std=1 / r)
        else:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        if mode is False:
            nn.init.kaiming_uniform_(b, a=math.sqrt(5))
        else:
            nn.init.zeros_(b)


def init_lora_embedding(a: torch.Tensor, b: torch.Tensor, mode: bool | str) -> None:
    """Initialise an embedding LoRA pair in place: ``a`` is ``(r, vocab)``, ``b`` is ``(dim, r)``."""
    if mode in ("pissa", "olora", "loftq"):
        raise ConfigError(f"init_lora_weights={mode!r} supports linear layers only, not embeddings.")
    with torch.no_grad():
        nn.init.normal_(b)
        if mode is False:
            nn.init.normal_(a)
        else:
            nn.init.zeros_(a)


def init_pissa(a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor, scaling: float) -> torch.Tensor:
    """PiSSA: fill ``a`` ``(r, in)`` and ``b`` ``(out, r)`` from the top-r singular triplets of ``weight``
    ``(out, in)`` and return the residual ``weight - s B A`` ``(out, in)``, which replaces the base weight."""
    r = a.shape[0]
    with torch.no_grad():
        weight = weight.float()
        u, sv, vh = torch.linalg.svd(weight, full_matrices=False)
        root = (sv[:r] / scaling).sqrt()
        a.copy_(root[:, None] * vh[:r])  # (r, in)
        b.copy_(u[:, :r] * root[None, :])  # (out, r)
        return weight - scaling * b @ a


def init_olora(a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor, scaling: float) -> torch.Tensor:
    """OLoRA: fill ``a`` ``(r, in)`` with the first ``r`` rows of ``R`` and ``b`` ``(out, r)`` with the first ``r``
    columns of ``Q`` (thin QR ``weight = Q R``, ``weight``: ``(out, in)``); return the residual ``weight - s B A``."""
    r = a.shape[0]
    with torch.no_grad():
        weight = weight.float()
        q, upper = torch.linalg.qr(weight)  # (out, k), (k, in), k = min(out, in)
        a.copy_(upper[:r])
        b.copy_(q[:, :r])
        return weight - scaling * b @ a
