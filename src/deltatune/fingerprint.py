"""A fingerprint of the base model, saved with an adapter so loading onto another model fails loudly.

The fingerprint records the architecture (class name, ``model_type``), the number of base
parameters, the shapes of the modules the adapter touches, and a SHA-256 over a fixed sample of
every base weight (up to ``SAMPLE`` values per tensor, rounded to bfloat16 so the same weights
loaded in fp32, fp16 or bf16 hash alike). Sampling keeps it fast on large models; any re-trained,
re-initialised or different model changes the hash with overwhelming probability.

Parameters inside deltatune wrappers are read from the original module (``base_layer``), and the
trainable copies of ``modules_to_save`` (task heads, randomly initialised on every load) are left out.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import nn

from .errors import BaseModelMismatchError
from .model_interface import model_type
from .structure import original_modules
from .weights import model_quantization, param_numel, param_tensors, quantization

SAMPLE = 256
FINGERPRINT_KEY = "deltatune_base_model_fingerprint"


def base_named_parameters(model: nn.Module, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    """(path, tensor) of the base model's own parameters, as if no wrapper were present."""
    base_child = getattr(model, "_delta_base_child", None)
    if base_child:
        return base_named_parameters(getattr(model, base_child), prefix)
    out = [(prefix + name, p) for name, p in model.named_parameters(recurse=False)]
    for name, child in model.named_children():
        out.extend(base_named_parameters(child, f"{prefix}{name}."))
    return out


def _sample_digest(param: torch.Tensor) -> bytes:
    """Sampled values of ``param``; a quantized weight is sampled from its stored (packed) tensors, so the
    same model quantized the same way hashes alike, and any other quantization differently."""
    out = b""
    for tensor in param_tensors(param):
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // SAMPLE)
        sample = flat[::step][:SAMPLE].float().to(torch.bfloat16).view(torch.int16)
        out += sample.cpu().numpy().tobytes()
    return out


#: What is hashed for one base tensor: (path, number of values, bytes hashed, identity shared by tied tensors).
Digest = tuple[str, int, bytes, int]


def tensor_digests(model: nn.Module) -> list[Digest]:
    """Per-tensor digests of ``model``'s base weights, in model order.

    A :class:`~deltatune.model.DeltaModel` keeps these from the moment it is created, so the
    fingerprint it saves (for any set of excluded heads) describes the base before any training or merge.
    """
    identity: dict[int, int] = {}
    out: list[Digest] = []
    for name, param in base_named_parameters(model):
        ident = identity.setdefault(id(param), len(identity))
        data = name.encode() + str(tuple(param.shape)).encode() + _sample_digest(param)
        out.append((name, param_numel(param), data, ident))
    return out


def fingerprint_of(model: nn.Module, digests: list[Digest], skip: list[str]) -> dict[str, Any]:
    """The fingerprint of ``model`` from its ``digests``; ``skip`` lists module paths left out (task heads)."""
    digest = hashlib.sha256()
    count = 0
    seen: set[int] = set()
    for name, numel, data, ident in digests:
        if any(name == s or name.startswith(s + ".") for s in skip) or ident in seen:
            continue
        seen.add(ident)  # tied weights count once
        count += numel
        digest.update(data)
    return {
        "architecture": type(model).__name__,
        "model_type": model_type(model),
        "num_parameters": count,
        "quantization": model_quantization(model),
        "excluded": sorted(skip),
        "sha256": digest.hexdigest(),
    }


def target_shapes(model: nn.Module, paths: list[str]) -> dict[str, list[int] | None]:
    """Shapes of the original weights at ``paths`` (original module paths, as if no wrapper were present;
    ``None`` where the path or weight is missing)."""
    modules = original_modules(model)
    shapes: dict[str, list[int] | None] = {}
    for path in paths:
        module = modules.get(path)
        weight = getattr(module, "weight", None)
        if module is not None and quantization(module):  # the logical (out, in), not the packed storage
            shapes[path] = [module.out_features, module.in_features]
        else:
            shapes[path] = list(weight.shape) if isinstance(weight, torch.Tensor) else None
    return shapes


def check_fingerprint(saved: dict[str, Any], current: dict[str, Any], folder: str) -> None:
    """Raise :class:`BaseModelMismatchError` when ``current`` is not the model ``saved`` was made on."""
    problems = []
    if "quantization" in saved and saved["quantization"] != current.get("quantization"):
        problems.append(f"quantization: adapter was trained on a {saved['quantization'] or 'float (unquantized)'} base, "
                        f"this model is {current.get('quantization') or 'float (unquantized)'}")
    for key in ("architecture", "model_type", "num_parameters"):
        if saved.get(key) != current.get(key):
            problems.append(f"{key}: adapter was trained on {saved.get(key)!r}, this model has {current.get(key)!r}")
    for path, shape in (saved.get("target_shapes") or {}).items():
        now = current.get("target_shapes", {}).get(path)
        if list(now or []) != list(shape or []):  # None: a wrapped block without its own weight
            problems.append(f"{path}: weight shape {shape} at training, {now or 'no such module'} now")
    if not problems and saved.get("sha256") != current.get("sha256"):
        problems.append("same architecture and shapes but different weights (sha256 of sampled weights differs)")
    if problems:
        shown = "; ".join(problems[:5]) + (f"; ... ({len(problems)} differences)" if len(problems) > 5 else "")
        raise BaseModelMismatchError(
            f"The adapter in {folder} was trained on a different base model: {shown}. Load the base model it "
            "was trained on, or pass ignore_base_mismatch=True to load it anyway (outputs will differ)."
        )
