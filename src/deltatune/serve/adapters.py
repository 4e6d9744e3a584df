"""The adapters a server holds on its one base model: load and unload at run time, safely.

Adapters named on the command line (``--adapter NAME=PATH``) are trusted: the operator chose them.
Adapters loaded over HTTP (``POST /v1/adapters``) must lie inside ``--adapters-dir``: the path is
relative, has no ``..`` part, and neither the folder nor any file in it resolves (through symlinks)
outside the directory. Every load goes through the fingerprint check of
:meth:`deltatune.model.DeltaModel.load_adapter`, so an adapter trained on another base is refused.

Whatever kind of adapter it is (a layer method such as LoRA, IA3 or OFT, or an input method such as
prompt, P- or prefix tuning), a new adapter is served only if the mixed-adapter batch path can run it:
right after loading, a one-token first forward and one decoding step run with it through the very
calls the engine makes (:mod:`.mixed_forward`); whatever that path refuses is refused here with its
reason, and the adapter is unloaded again. So the server follows the core without naming any method.

Unloading an adapter that is serving requests drains it: it leaves the model list at once (new
requests for it get a 404 that says it is being unloaded), the requests in flight finish, then it
is unloaded between two decoding steps.

The model changes only under ``lock``, which the engine holds around every forward, so adapters come
and go between decoding steps.
"""

from __future__ import annotations

import re
import threading
from pathlib import Path

from torch import nn

from ..config import read_config_file
from ..errors import BaseModelMismatchError, DeltaError
from ..mixed_batch import leading_mask
from ..model import DeltaModel
from .base_choice import base_hint
from .batch_cache import BatchCache
from .errors import ApiError
from .mixed_forward import BASE, prefill_rows, step_rows

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

    def __init__(self, base: nn.Module, base_name: str, adapters_dir: Path | None = None,
                 base_from: str | None = None) -> None:
        self.model: nn.Module = base
        self.base_name = base_name
        self.adapters_dir = adapters_dir
        self.base_from = base_from  # the adapter whose LoftQ base the base holds (see .base_choice), if any
        self.lock = threading.RLock()
        self.names: list[str] = []  # served: requests may name them
        self.draining: list[str] = []  # unload asked while busy: no new requests, unloaded once idle

    def model_names(self) -> list[str]:
        return [self.base_name, *self.names]

    def resolve(self, model: str) -> str:
        """The adapter name a request's ``model`` field picks (``BASE`` for the base model); 404 otherwise."""
        if model == self.base_name:
            return BASE
        self.check_served(model)
        return model

    def check_served(self, adapter: str) -> None:
        """404 unless ``adapter`` (a name, or ``BASE``) may take new requests."""
        if adapter == BASE or adapter in self.names:
            return
        why = " is being unloaded (its requests in flight finish first)" if adapter in self.draining else \
            " does not exist"
        raise ApiError(404, f"The model {adapter!r}{why}; loaded: {', '.join(self.model_names())}.",
                       param="model", code="model_not_found")

    def leading_positions(self, adapter: str) -> int:
        """Positions the adapter puts in front of a prompt (virtual tokens, a prefix): they count against the
        model's context but not in the usage."""
        if adapter == BASE or not isinstance(self.model, DeltaModel):
            return 0
        try:  # no lock (the event loop must not wait for a forward): an adapter unloaded meanwhile gets a 404 later
            return int(leading_mask(self.model, [adapter]).shape[1])
        except KeyError:
            return 0

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
            if name in self.draining:
                raise ApiError(409, f"The adapter named {name!r} is being unloaded (its requests in flight finish "
                               "first); load it again once it is gone from /health's draining_adapters.", param="name")
            try:
                if isinstance(self.model, DeltaModel):
                    self.model.load_adapter(folder, name)
                else:
                    self.model = DeltaModel.from_pretrained(self.model, folder, adapter_name=name)
            except DeltaError as exc:
                hint = base_hint(folder, self.base_from) if isinstance(exc, BaseModelMismatchError) else ""
                raise ApiError(400, f"Cannot load adapter {name!r}: {exc}{hint}", param="path") from exc
            self.model.eval()
            self._check_servable(name)
            self.names.append(name)

    def start_unload(self, name: str) -> None:
        """Take ``name`` off the served adapters (no new requests); :meth:`finish_unload` removes it.
        The caller holds the engine's job lock, so no request for it slips in between."""
        if name in self.draining:
            return
        if name not in self.names:
            raise ApiError(404, f"No adapter named {name!r}; loaded: {', '.join(self.names) or 'none'}.")
        self.names.remove(name)
        self.draining.append(name)

    def finish_unload(self, name: str) -> None:
        """Unload a drained adapter (no request uses it any more); a no-op when it is gone already."""
        with self.lock:
            if name not in self.draining:
                return
            assert isinstance(self.model, DeltaModel)
            self.model.delete_adapter(name)
            self.draining.remove(name)

    def _check_servable(self, name: str) -> None:
        """Run the new adapter as the engine will (a first forward, then a decoding step, in a mixed-adapter
        batch next to the base); refuse and unload it when that path cannot serve it, with its reason."""
        assert isinstance(self.model, DeltaModel)
        names = [name, BASE]
        try:
            inputs = BatchCache.prefill_inputs([[0], [0, 0]])
            _, tensors, mask = prefill_rows(self.model, names, inputs)
            batch = BatchCache()
            batch.join(tensors, mask)
            step_rows(self.model, names, batch.step_inputs([0, 0]), batch.tensors)
        except Exception as exc:  # whatever the mixed path refuses, the server refuses
            self.model.delete_adapter(name)
            raise ApiError(400, f"Adapter {name!r} cannot be served: a mixed-adapter batch cannot hold it: "
                           f"{exc} (use 'deltatune generate' for it).", param="path") from exc

    @staticmethod
    def _check_kind(folder: Path) -> None:
        """The server generates text: causal-LM adapters only."""
        try:
            config = read_config_file(folder)
        except DeltaError as exc:
            raise ApiError(400, f"{folder.name}: not a readable adapter folder: {exc}", param="path") from exc
        if config.get("task_type") not in (None, "CAUSAL_LM"):
            raise ApiError(400, f"{folder.name} is a {config.get('task_type')} adapter; the server generates text "
                           "and needs a CAUSAL_LM adapter.", param="path")
