"""Adapter state <-> files: which tensors an adapter owns, under which HF peft key, and loading them back.

Every owner of adapter tensors (a layer wrapper, a modules-to-save copy, an input delta, or extra
base tensors a method trains, such as biases) reports them with keys relative to itself; here they
get the full on-disk key ``base_model.model.<module path>.<relative key>`` (input deltas give full
keys themselves). Loading routes each key back to its owner after checking that nothing is missing,
nothing is left over and every shape fits.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..config import read_config_file
from ..errors import CheckpointError
from ..fingerprint import FINGERPRINT_KEY, check_fingerprint, compute_fingerprint, target_shapes
from ..hooks import InputDelta
from ..inject import iter_wrappers
from ..layer import DeltaLayer
from ..registry import get_method
from .io import KEY_PREFIX, adapter_folder, load_tensors, save_tensors

if TYPE_CHECKING:
    from ..config import DeltaConfig
    from ..model import DeltaModel

Owner = Any  # a wrapper, an input delta, or None for a plain tensor


def adapter_entries(model: DeltaModel, name: str) -> dict[str, tuple[Owner, str, torch.Tensor]]:
    """``{file key: (owner, key relative to owner, current tensor)}`` for adapter ``name``."""
    entries: dict[str, tuple[Owner, str, torch.Tensor]] = {}
    for path, wrapper in iter_wrappers(model.base_model):
        for rel, tensor in wrapper.adapter_state(name).items():
            entries[f"{KEY_PREFIX}{path}.{rel}"] = (wrapper, rel, tensor)
    if name in model.input_deltas:
        delta = model.input_deltas[name]
        for key, tensor in delta.adapter_state().items():
            entries[key] = (delta, key, tensor)
    config = model.peft_config[name]
    extra = getattr(type(config), "extra_trainable", None)
    if extra is not None:
        for path, param in extra(config, model.base_model).items():
            entries[f"{KEY_PREFIX}{path}"] = (None, path, param)
    return entries


def get_adapter_state_dict(model: DeltaModel, name: str) -> dict[str, torch.Tensor]:
    """Adapter ``name``'s tensors keyed as in HF peft's ``adapter_model.safetensors``."""
    return {key: tensor for key, (_, _, tensor) in adapter_entries(model, name).items()}


def save_adapter(model: DeltaModel, name: str, root: Path) -> Path:
    """Write adapter ``name`` under ``root``: tensors first, then the config (each file atomically)."""
    folder = adapter_folder(root, name)
    config = model.peft_config[name]
    layer_paths = [p for p, w in iter_wrappers(model.base_model) if isinstance(w, DeltaLayer) and name in w.adapter_names]
    fingerprint = dict(model.base_fingerprint, target_shapes=target_shapes(model.base_model, layer_paths))
    save_tensors(folder, get_adapter_state_dict(model, name))
    saved = config.to_dict()
    saved["inference_mode"] = True  # HF peft's convention: a saved adapter loads for inference by default
    type(config).from_dict(saved)  # the file we write must load back
    config.save(folder, extra={"inference_mode": True, FINGERPRINT_KEY: fingerprint})
    return folder


def read_adapter(folder: Path, allow_pickle: bool = False) -> tuple[DeltaConfig, dict[str, torch.Tensor], dict | None]:
    """(config, tensors, fingerprint or None) of the adapter saved in ``folder``."""
    data = read_config_file(folder)
    fingerprint = data.pop(FINGERPRINT_KEY, None)
    spec = get_method(str(data["peft_type"]))
    config = spec.config_cls.from_dict(data)
    tensors = load_tensors(folder, allow_pickle)
    return config, tensors, fingerprint


def check_base(model: torch.nn.Module, fingerprint: dict | None, folder: str, ignore: bool) -> None:
    """Refuse to load onto a base model other than the one the adapter was trained on."""
    if fingerprint is None or ignore:
        return
    current = compute_fingerprint(model, fingerprint.get("excluded", []))
    current["target_shapes"] = target_shapes(model, list(fingerprint.get("target_shapes") or {}))
    check_fingerprint(fingerprint, current, folder)


def apply_tensors(model: DeltaModel, name: str, tensors: dict[str, torch.Tensor], folder: str) -> None:
    """Copy saved ``tensors`` into adapter ``name``, after checking keys and shapes."""
    entries = adapter_entries(model, name)
    missing = sorted(set(entries) - set(tensors))
    unexpected = sorted(set(tensors) - set(entries))
    mismatched = [
        f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(entries[k][2].shape)}"
        for k in sorted(set(entries) & set(tensors))
        if tensors[k].shape != entries[k][2].shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensors missing from the file (e.g. {missing[:3]})")
    if unexpected:
        problems.append(f"{len(unexpected)} tensors in the file match nothing in the model (e.g. {unexpected[:3]})")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches (e.g. {mismatched[:3]})")
    if problems:
        raise CheckpointError(
            f"The adapter in {folder} does not fit this model: {'; '.join(problems)}. Check that the base model "
            "and adapter_config.json are the ones the adapter was trained with."
        )
    by_owner: dict[int, tuple[Owner, dict[str, torch.Tensor]]] = {}
    for key, (owner, rel, current) in entries.items():
        if owner is None:
            with torch.no_grad():
                current.copy_(tensors[key].to(current.dtype))
            continue
        by_owner.setdefault(id(owner), (owner, {}))[1][rel] = tensors[key]
    for owner, state in by_owner.values():
        if isinstance(owner, InputDelta):
            owner.load_adapter_state(state)
        else:
            owner.load_adapter_state(name, state)


def load_adapter(
    model: DeltaModel, folder: Path, name: str, is_trainable: bool, ignore_base_mismatch: bool, allow_pickle: bool
) -> None:
    """Add the adapter saved in ``folder`` to ``model`` as ``name``."""
    config, tensors, fingerprint = read_adapter(folder, allow_pickle)
    config.inference_mode = not is_trainable
    check_base(model.base_model, fingerprint, str(folder), ignore_base_mismatch)
    model.add_adapter(name, config)
    try:
        apply_tensors(model, name, tensors, str(folder))
    except CheckpointError:
        model.delete_adapter(name)  # leave the model as it was
        raise
