"""Adapter state <-> files: which tensors an adapter owns, under which HF peft key, and loading them back.

Every owner of adapter tensors (a layer wrapper, a modules-to-save copy, an input delta, or extra
base tensors a method trains, such as biases) reports them with keys relative to itself; here they
get the full on-disk key ``base_model.model.<module path>.<relative key>`` (input deltas give full
keys themselves). Loading routes each key back to its owner after checking that nothing is missing,
nothing is left over and every shape fits.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import CONFIG_NAME, DeltaConfig, read_config_file
from ..errors import CheckpointError, ConfigError
from ..fingerprint import (
    FINGERPRINT_KEY,
    Digest,
    check_fingerprint,
    fingerprint_of,
    target_shapes,
    tensor_digests,
)
from ..inject import iter_wrappers
from ..input_delta import InputDelta
from ..layer import DeltaLayer
from ..registry import get_method
from .atomic import atomic_write_many
from .io import KEY_PREFIX, WEIGHTS_NAME, adapter_folder, load_metadata, load_tensors, tensor_writer

Owner = Any  # a wrapper, an input delta, or None for a plain tensor


@dataclass(frozen=True)
class AdapterParts:
    """What the file layer needs of one adapter: the wrapped model, the adapter's config and its input
    delta (input methods only). :class:`~deltatune.model.DeltaModel` hands these over; this module never
    sees the DeltaModel itself."""

    model: nn.Module
    config: DeltaConfig
    input_delta: InputDelta | None = None


def adapter_entries(parts: AdapterParts, name: str) -> dict[str, tuple[Owner, str, torch.Tensor]]:
    """``{file key: (owner, key relative to owner, current tensor)}`` for adapter ``name``."""
    entries: dict[str, tuple[Owner, str, torch.Tensor]] = {}
    # HF peft keeps an input method's model (and so its modules_to_save) under "base_model." directly.
    delta = parts.input_delta
    prefix = delta.file_key_prefix if delta is not None else KEY_PREFIX
    for path, wrapper in iter_wrappers(parts.model):
        for rel, tensor in wrapper.adapter_state(name).items():
            entries[f"{prefix}{path}.{rel}"] = (wrapper, rel, tensor)
    if delta is not None:
        for key, tensor in delta.adapter_state().items():
            entries[key] = (delta, key, tensor)
    spec = get_method(parts.config)
    if spec.extra_trainable is not None:
        for path, param in spec.extra_trainable(parts.config, parts.model).items():
            entries[f"{KEY_PREFIX}{path}"] = (None, path, param)
    if spec.shared_state is not None:
        for key, tensor in spec.shared_state(parts.config, parts.model, name).items():
            entries[key] = (None, key, tensor)
    return entries


def get_adapter_state_dict(parts: AdapterParts, name: str) -> dict[str, torch.Tensor]:
    """Adapter ``name``'s tensors keyed as in HF peft's ``adapter_model.safetensors``."""
    return {key: tensor for key, (_, _, tensor) in adapter_entries(parts, name).items()}


def save_adapter(
    parts: AdapterParts, name: str, root: Path, fingerprint: dict[str, Any],
    tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write adapter ``name`` under ``root``: both files go to temporary names first, then are renamed.

    ``fingerprint`` describes the base model (:func:`~deltatune.fingerprint.fingerprint_of`); the shapes
    of the wrapped weights are added here. It is stored as JSON in the safetensors header metadata (key
    ``deltatune_base_model_fingerprint``), where HF peft does not look, so peft loads the folder without
    warnings; ``adapter_config.json`` holds only fields peft knows. An error anywhere (or a crash before the renames) leaves an
    adapter saved earlier in that folder intact. ``tensors`` (keyed as :func:`get_adapter_state_dict`)
    replaces the model's own tensors, e.g. whole tensors gathered from a sharded (FSDP) model.
    """
    folder = adapter_folder(root, name)
    config = parts.config.checkpoint_config()
    layer_paths = [p for p, w in iter_wrappers(parts.model) if isinstance(w, DeltaLayer) and name in w.adapter_names]
    fingerprint = dict(fingerprint, target_shapes=target_shapes(parts.model, layer_paths))
    saved = config.to_dict() | {"inference_mode": True}  # HF peft's convention: saved adapters load for inference
    type(config).from_dict(saved)  # the file we write must load back
    text = config.to_json(extra={"inference_mode": True})
    metadata = {FINGERPRINT_KEY: json.dumps(fingerprint, sort_keys=True)}
    writes = {
        folder / WEIGHTS_NAME: tensor_writer(get_adapter_state_dict(parts, name) if tensors is None else tensors,
                                             metadata),
        folder / CONFIG_NAME: lambda tmp: Path(tmp).write_text(text, encoding="utf-8"),
    }
    atomic_write_many(writes)
    return folder


def read_fingerprint(folder: Path, config_data: dict[str, Any]) -> dict | None:
    """The base-model fingerprint saved with the adapter in ``folder``, or ``None``.

    Read from the safetensors header; folders written before it moved there carry it in
    ``adapter_config.json`` (``config_data``, as read from that file), which is still honoured.
    """
    if FINGERPRINT_KEY in config_data:
        return config_data[FINGERPRINT_KEY]
    text = load_metadata(folder).get(FINGERPRINT_KEY)
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{Path(folder) / WEIGHTS_NAME}: the base-model fingerprint is not valid JSON "
                              f"({exc}); re-save the adapter.") from exc


def same_adapter_config(first: DeltaConfig, second: DeltaConfig) -> bool:
    """Whether two configs describe the same adapter layout (what is recorded about the base aside)."""
    ignored = ("inference_mode", "base_model_name_or_path", "revision")
    a, b = (c.checkpoint_config().to_dict() for c in (first, second))
    return {k: v for k, v in a.items() if k not in ignored} == {k: v for k, v in b.items() if k not in ignored}


def read_adapter(folder: Path, allow_pickle: bool = False) -> tuple[DeltaConfig, dict[str, torch.Tensor], dict | None]:
    """(config, tensors, fingerprint or None) of the adapter saved in ``folder``."""
    data = read_config_file(folder)
    fingerprint = read_fingerprint(folder, data)
    data.pop(FINGERPRINT_KEY, None)
    try:
        spec = get_method(str(data["peft_type"]))
        config = spec.config_cls.from_dict(data).checkpoint_config()
    except (ConfigError, TypeError) as exc:
        raise ConfigError(f"{Path(folder) / CONFIG_NAME}: {exc}") from exc
    tensors = load_tensors(folder, allow_pickle)
    return config, tensors, fingerprint


def check_base(
    model: torch.nn.Module, fingerprint: dict | None, folder: str, ignore: bool, digests: list[Digest] | None = None
) -> None:
    """Refuse to load onto a base model other than the one the adapter was trained on.

    ``digests`` are those a :class:`DeltaModel` took of its base when it was created (before any
    merge or training); without them the model's weights are read as they are now.
    """
    if fingerprint is None or ignore:
        return
    excluded = list(fingerprint.get("excluded", []))
    current = fingerprint_of(model, digests if digests is not None else tensor_digests(model), excluded)
    current["target_shapes"] = target_shapes(model, list(fingerprint.get("target_shapes") or {}))
    check_fingerprint(fingerprint, current, folder)


def _base_layer_entries(model: nn.Module) -> dict[str, torch.Tensor]:
    """Base weights of wrapped modules by file key. HF peft saves these next to the adapter when it
    trains or resizes an embedding layer (``save_embedding_layers``); loading puts them back."""
    out: dict[str, torch.Tensor] = {}
    for path, wrapper in iter_wrappers(model):
        if isinstance(wrapper, DeltaLayer):
            for key, param in wrapper.get_base_layer().named_parameters():
                out[f"{KEY_PREFIX}{path}.{wrapper._delta_base_child}.{key}"] = param
    return out


def _head_internal_prefixes(model: nn.Module) -> tuple[str, ...]:
    """Key prefixes inside modules-to-save wrappers. HF peft's ``bias="all"`` writes the head's bias
    again under ``<head>.original_module.bias`` and ``<head>.modules_to_save.bias``; the trained copy
    is loaded from the head's own keys, so these duplicates are skipped."""
    return tuple(
        f"{KEY_PREFIX}{path}.{part}."
        for path, wrapper in iter_wrappers(model)
        if not isinstance(wrapper, DeltaLayer)
        for part in ("original_module", "modules_to_save")
    )


def apply_tensors(parts: AdapterParts, name: str, tensors: dict[str, torch.Tensor], folder: str) -> None:
    """Copy saved ``tensors`` into adapter ``name``, after checking keys and shapes."""
    entries = adapter_entries(parts, name)
    base_entries = _base_layer_entries(parts.model)
    heads = _head_internal_prefixes(parts.model)
    for key in set(tensors) - set(entries):
        if key in base_entries:
            entries[key] = (None, key, base_entries[key])
        elif key.startswith(heads):
            tensors = {k: v for k, v in tensors.items() if k != key}  # a duplicate of the head's own keys
    missing = sorted(k for k in set(entries) - set(tensors) if k not in base_entries)
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
        if key not in tensors:
            continue
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

