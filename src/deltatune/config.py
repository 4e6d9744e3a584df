"""Configuration base classes and their JSON round trip (HF peft's ``adapter_config.json``).

Every method defines one dataclass deriving from :class:`DeltaConfig` (input methods) or
:class:`TargetedConfig` (layer methods that wrap modules picked by name). Field names follow
HF peft wherever peft has the method, so files written by either library load in the other.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from .errors import ConfigError

CONFIG_NAME = "adapter_config.json"


class TaskType(str, enum.Enum):
    """What the wrapped model does (HF peft's ``TaskType`` values); ``task_type=`` also takes the plain string."""

    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"


TASK_TYPES = tuple(t.value for t in TaskType)


@dataclass
class DeltaConfig:
    """Fields every method shares.

    Attributes:
        task_type: what the wrapped model does (``"SEQ_CLS"``, ``"CAUSAL_LM"``, ``"SEQ_2_SEQ_LM"``,
            ...). ``"SEQ_CLS"`` makes the classification head trainable and saved with the adapter.
        modules_to_save: names of modules (e.g. a classifier head) trained in full and saved with
            the adapter, matched like target names (exact name or suffix of the module path).
        inference_mode: ``True`` when loaded for inference only (all parameters frozen).
        base_model_name_or_path: where the base model came from, recorded for the reader.
        revision: the base model's revision, recorded for the reader.
    """

    PEFT_TYPE: ClassVar[str] = ""
    #: Fields other tools write that carry no option (version stamps, bookkeeping): dropped silently.
    METADATA_FIELDS: ClassVar[frozenset[str]] = frozenset({"peft_version", "auto_mapping"})

    task_type: str | None = None
    modules_to_save: list[str] | None = None
    inference_mode: bool = False
    base_model_name_or_path: str | None = None
    revision: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.task_type, enum.Enum):  # dt.TaskType or peft.TaskType: stored as the plain string
            self.task_type = str(self.task_type.value)
        if self.task_type is not None and self.task_type not in TASK_TYPES:
            raise ConfigError(f"task_type={self.task_type!r} is unknown; use one of {TASK_TYPES} or None.")
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]

    @property
    def peft_type(self) -> str:
        return self.PEFT_TYPE

    # -- JSON round trip -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The config as plain JSON types, with ``peft_type`` first (HF peft's layout)."""
        out: dict[str, Any] = {"peft_type": self.PEFT_TYPE}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (set, tuple)):
                value = sorted(value) if isinstance(value, set) else list(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DeltaConfig:
        """Build a config, ignoring fields this version does not know.

        Unknown fields come from newer HF peft versions or other tools; they must not stop a load.
        Those left at an "off" value (``None``, ``False``, empty) or listed in ``METADATA_FIELDS``
        change nothing and are dropped silently; any other one is named in a warning, since the
        adapter may have been trained with an option deltatune does not implement.
        """
        data = dict(data)
        data.pop("peft_type", None)
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(k for k in data if k not in known)
        meaningful = [k for k in unknown if k not in cls.METADATA_FIELDS and data[k] not in (None, False, "", [], {})]
        if meaningful:
            shown = {k: data[k] for k in meaningful}
            warnings.warn(
                f"{cls.__name__}: ignoring fields this deltatune version does not know: "
                f"{shown}. They are usually options of a newer HF peft release; "
                "check the adapter behaves as expected.",
                stacklevel=2,
            )
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def from_pretrained(cls, folder: str | Path, subfolder: str | None = None) -> DeltaConfig:
        """The config saved in ``folder/adapter_config.json`` (HF peft's ``LoraConfig.from_pretrained``).

        On ``DeltaConfig`` itself the class follows the file's ``peft_type``; on a method's class the file must
        hold that method's config.
        """
        folder = Path(folder) / subfolder if subfolder else Path(folder)
        data = read_config_file(folder)
        found = _config_class_for(str(data["peft_type"]))
        if found is None or not issubclass(found, cls):
            raise ConfigError(
                f"{folder / CONFIG_NAME} holds a {data['peft_type']} adapter, not a {cls.__name__}; read it with "
                "DeltaConfig.from_pretrained(folder), which picks the class from the file."
            )
        return found.from_dict(data)

    def save_pretrained(self, save_directory: str | Path) -> None:
        """Write this config as ``save_directory/adapter_config.json`` (the folder is created)."""
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / CONFIG_NAME).write_text(self.to_json(), encoding="utf-8")

    def checkpoint_config(self) -> DeltaConfig:
        """This config as written to (and read back from) an adapter folder.

        A saved adapter's tensors already hold the result of initialisation, so options that only
        shape initialisation, and that would redo costly work or change the base weights again when
        the file is loaded, are switched off here. Methods with such options override this.
        """
        return self

    def to_json(self, extra: dict[str, Any] | None = None) -> str:
        """``adapter_config.json``'s text: :meth:`to_dict` plus ``extra`` keys."""
        return json.dumps(self.to_dict() | (extra or {}), indent=2, sort_keys=False) + "\n"


@dataclass
class TargetedConfig(DeltaConfig):
    """Fields of layer methods, which wrap modules chosen by name.

    Attributes:
        target_modules: which modules to wrap. A list of names matches a module whose path equals a
            name or ends with ``"." + name``; a string is a regular expression that must match the
            whole module path; ``"all-linear"`` picks every linear layer except the output head.
            ``None`` asks the method for its default for this architecture.
        exclude_modules: modules never wrapped, same matching rules as ``target_modules``.
        layers_to_transform: only wrap modules inside these block indices (int or list of ints).
        layers_pattern: name of the block list (e.g. ``"layers"``) whose index ``layers_to_transform``
            refers to; by default the first ``.<number>.`` in the path.
    """

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, (set, tuple)):
                value = sorted(value)
                setattr(self, name, value)
            if not (value is None or isinstance(value, str) or (isinstance(value, list) and all(
                    isinstance(v, str) for v in value))):
                raise ConfigError(
                    f"{name}={value!r} must be a list of module names, one regular expression string, or None."
                )
        if isinstance(self.layers_to_transform, int):
            self.layers_to_transform = [self.layers_to_transform]
        if self.layers_pattern is not None and self.layers_to_transform is None:
            raise ConfigError("layers_pattern only makes sense with layers_to_transform; set both or neither.")


def _config_class_for(peft_type: str) -> type[DeltaConfig] | None:
    """The config class whose ``PEFT_TYPE`` is ``peft_type`` among those defined (methods define theirs on import)."""
    pending, seen = [DeltaConfig], set()
    while pending:
        cls = pending.pop()
        if cls in seen:
            continue
        seen.add(cls)
        if cls.PEFT_TYPE == peft_type:
            return cls
        pending.extend(cls.__subclasses__())
    return None


def read_config_file(folder: str | Path) -> dict[str, Any]:
    """Read ``adapter_config.json`` from ``folder`` as a dict, with clear errors for missing/corrupt files."""
    from .errors import CheckpointError

    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"No {CONFIG_NAME} in {folder}. {_what_to_pass_instead(Path(folder))}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); the file is corrupt, re-save the adapter.") from exc
    if not isinstance(data, dict) or "peft_type" not in data:
        raise CheckpointError(f"{path} has no 'peft_type' field; it is not an adapter config.")
    return data


def _what_to_pass_instead(folder: Path) -> str:
    """For a folder without an adapter: what it holds instead, and which path to pass."""
    if not folder.exists():
        return "The folder does not exist; pass the folder that save_pretrained() or trainer.save_model() wrote."
    checkpoints = sorted((p for p in folder.glob("checkpoint-*") if (p / CONFIG_NAME).is_file()),
                         key=lambda p: int(p.name.split("-")[-1]) if p.name.split("-")[-1].isdigit() else -1)
    if checkpoints:
        return (f"It holds Trainer checkpoints ({', '.join(p.name for p in checkpoints)}); pass one of them, "
                f"e.g. {checkpoints[-1]}.")
    if (folder / "adapter" / CONFIG_NAME).is_file():
        return f"It is a 'deltatune train' run folder; pass {folder / 'adapter'}."
    full = [n for n in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin") if (folder / n).exists()]
    if full:
        return (f"It holds a full model ({full[0]}), not an adapter: load it with transformers' "
                "AutoModel...from_pretrained(folder). If it came from a Trainer that trained a DeltaModel with an "
                "older deltatune, its adapter tensors are inside: load that file with DeltaModel.load_state_dict.")
    adapters = sorted(p.name for p in folder.iterdir() if (p / CONFIG_NAME).is_file()) if folder.is_dir() else []
    if adapters:
        return f"Adapters other than 'default' live in subfolders: pass one of {adapters}, e.g. {folder / adapters[0]}."
    return "Point to the folder that save_pretrained() or trainer.save_model() wrote."


def replace(config: DeltaConfig, **changes: Any) -> DeltaConfig:
    """A copy of ``config`` with some fields changed (validation runs again)."""
    return dataclasses.replace(config, **changes)


__all__ = ["CONFIG_NAME", "DeltaConfig", "TargetedConfig", "TaskType", "field", "read_config_file", "replace"]
