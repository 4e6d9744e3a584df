"""The adapters a server holds on its one base model: load and unload at run time, safely.

Adapters named on the command line (``--adapter NAME=PATH``) are trusted: the operator chose them.
Adapters loaded over HTTP (``POST /v1/adapters``) must lie inside ``--adapters-dir``: the path is
relative, has no ``..`` part, and neither the folder nor any file in it resolves (through symlinks)
outside the directory. Every load goes through the fingerprint check of
:meth:`deltatune.model.DeltaModel.load_adapter`, so an adapter trained on another base is refused.

The model changes only under ``lock``, which the engine holds around every forward, so adapters come
and go between decoding steps.
"""

from __future__ import annotations

import re
import threading
from pathlib import Path

from torch import nn

from ..config import read_config_file
from ..errors import DeltaError
from ..inject import iter_wrappers
from ..layer import DeltaLayer
from ..model import DeltaModel
from ..registry import get_method
from .errors import ApiError
from .mixed_forward import BASE

NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_\-:]{0,63}$")
CONFIG_FILE = "adapter_config.json"


def adapter_folder(path: Path) -> Path:
    """The adapter folder of a run folder from ``deltatune train`` (``run/adapter``) or an adapter folder."""
    return path / "adapter" if (path / "adapter" / CONFIG_FILE).is_file() else path


def inside_dir(root: Path, relative: str) -> Path:
    """``root / relative`` when it stays inside ``root`` (no absolute path, no ``..``, no symlink out)."""
    rel = Path(relative)
    if not relative or rel.is_absolute() or relative.startswith(("/", "\\")) or ".." in rel.parts:
        raise ApiError(400, f"Adapter path {relative!r} must be relative to the adapters directory, without '..'.",
                       param="path")
    real_root = root.resolve()
    folder = (root / rel)
    if not folder.exists():
        raise ApiError(404, f"No adapter folder {relative!r} in the adapters directory.", param="path")
    folder = adapter_folder(folder)
    for item in [folder, *folder.rglob("*")]:
        if not item.resolve().is_relative_to(real_root):
            raise ApiError(400, f"Adapter path {relative!r} leads outside the adapters directory (a symlink); "
                           "refused.", param="path")
    return folder


class AdapterRegistry:
    """The served model (the base, wrapped in a :class:`DeltaModel` once an adapter is loaded) and its adapters."""

    def __init__(self, base: nn.Module, base_name: str, adapters_dir: Path | None = None) -> None:
        self.model: nn.Module = base
        self.base_name = base_name
        self.adapters_dir = adapters_dir
        self.lock = threading.RLock()
        self.names: list[str] = []

    def model_names(self) -> list[str]:
        return [self.base_name, *self.names]

    def resolve(self, model: str) -> str:
        """The adapter name a request's ``model`` field picks (``BASE`` for the base model); 404 otherwise."""
        if model == self.base_name:
            return BASE
        if model in self.names:
            return model
        raise ApiError(404, f"The model {model!r} does not exist; loaded: {', '.join(self.model_names())}.",
                       param="model", code="model_not_found")

    def load_from_dir(self, name: str, relative: str) -> None:
        """Load an adapter from inside ``--adapters-dir`` (the HTTP route)."""
        if self.adapters_dir is None:
            raise ApiError(400, "Loading adapters at run time is off; start the server with --adapters-dir DIR.")
        self.load(name, inside_dir(self.adapters_dir, relative))

    def load(self, name: str, path: Path) -> None:
        """Load the adapter in ``path`` as ``name``; the model changes between two decoding steps."""
        if not NAME.match(name) or name in (BASE, self.base_name):
            raise ApiError(400, f"Adapter name {name!r} must be 1-64 letters, digits, '_', '-' or ':' and differ "
                           f"from the base model's name {self.base_name!r}.", param="name")
        folder = adapter_folder(path)
        self._check_kind(folder)
        with self.lock:
            if name in self.names:
                raise ApiError(409, f"An adapter named {name!r} is loaded already; unload it first.", param="name")
            try:
                if isinstance(self.model, DeltaModel):
                    self.model.load_adapter(folder, name)
                else:
                    self.model = DeltaModel.from_pretrained(self.model, folder, adapter_name=name)
            except DeltaError as exc:
                raise ApiError(400, f"Cannot load adapter {name!r}: {exc}", param="path") from exc
            self._check_routable(name)
            self.model.eval()
            self.names.append(name)

    def unload(self, name: str, in_use: int) -> None:
        if name not in self.names:
            raise ApiError(404, f"No adapter named {name!r}; loaded: {', '.join(self.names) or 'none'}.")
        if in_use:
            raise ApiError(409, f"Adapter {name!r} is serving {in_use} request(s); unload it when they are done.")
        with self.lock:
            assert isinstance(self.model, DeltaModel)
            self.model.delete_adapter(name)
            self.names.remove(name)

    def _check_routable(self, name: str) -> None:
        """Refuse (and unload) an adapter whose layers cannot serve rows of a mixed-adapter batch."""
        assert isinstance(self.model, DeltaModel)
        unrouted = sorted({w.method_name for _, w in iter_wrappers(self.model.base_model) if isinstance(w, DeltaLayer)
                           and name in w.adapter_names and not w.serves_mixed_batches})
        if unrouted:
            self.model.delete_adapter(name)
            raise ApiError(400, f"Adapter {name!r} uses {', '.join(unrouted)}, whose layers cannot share a "
                           "mixed-adapter batch yet; serve it with 'deltatune generate'.", param="path")

    @staticmethod
    def _check_kind(folder: Path) -> None:
        """Only causal-LM adapters of layer methods (LoRA, IA3, bottleneck...) mix in one batch."""
        try:
            config = read_config_file(folder)
            spec = get_method(str(config.get("peft_type")))
        except DeltaError as exc:
            raise ApiError(400, f"{folder.name}: not a readable adapter folder: {exc}", param="path") from exc
        if spec.kind != "layer":
            raise ApiError(400, f"{folder.name} is a {spec.name} adapter; the server batches layer-method adapters "
                           "(LoRA, IA3, bottleneck); use 'deltatune generate' for prompt/prefix tuning.", param="path")
        if config.get("task_type") not in (None, "CAUSAL_LM"):
            raise ApiError(400, f"{folder.name} is a {config.get('task_type')} adapter; the server generates text "
                           "and needs a CAUSAL_LM adapter.", param="path")
