"""Reading and writing adapter folders in HF peft's layout.

``<folder>/adapter_config.json`` + ``<folder>/adapter_model.safetensors``; adapters other than
``"default"`` go into ``<folder>/<adapter name>/``. Tensor keys are HF peft's, adapter name removed:
``base_model.model.<module path>.lora_A.weight``. Only safetensors are read unless the caller opts
in to a pickled ``adapter_model.bin``, which is then read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import safetensors.torch as st
import torch
from safetensors import SafetensorError

from ..errors import CheckpointError

WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
KEY_PREFIX = "base_model.model."


def adapter_folder(root: str | Path, adapter_name: str) -> Path:
    """Where adapter ``adapter_name`` lives under ``root`` (``root`` itself for ``"default"``)."""
    return Path(root) if adapter_name == "default" else Path(root) / adapter_name


def tensor_writer(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Callable[[str], None]:
    """A function writing ``tensors`` as a safetensors file to the path it is given."""
    # safetensors refuses tensors sharing memory; each saved tensor gets its own copy on the CPU.
    own = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    return lambda path: st.save_file(own, path, metadata={"format": "pt", **(metadata or {})})


def _unreadable(path: Path, exc: Exception) -> CheckpointError:
    return CheckpointError(
        f"{path} cannot be read ({exc}). The file is truncated or corrupt: re-save the adapter, "
        "or copy it again from where it came from."
    )


def load_metadata(folder: str | Path) -> dict[str, str]:
    """The string metadata in the header of ``folder``'s safetensors file (``{}`` when there is none)."""
    path = Path(folder) / WEIGHTS_NAME
    if not path.is_file():
        return {}
    try:
        with st.safe_open(str(path), "pt") as handle:
            return dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise _unreadable(path, exc) from exc


def load_tensors(folder: str | Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Read the adapter tensors in ``folder`` with clear errors for missing, truncated or corrupt files."""
    folder = Path(folder)
    path = folder / WEIGHTS_NAME
    if path.is_file():
        try:
            return st.load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise _unreadable(path, exc) from exc
    pickled = folder / PICKLE_WEIGHTS_NAME
    if pickled.is_file():
        if not allow_pickle:
            raise CheckpointError(
                f"{folder} holds only a pickled {PICKLE_WEIGHTS_NAME}. Pickle files can run arbitrary code, so "
                "deltatune loads safetensors only. If you trust the file, pass allow_pickle=True (it is then "
                "read with torch.load(weights_only=True)), and re-save it as safetensors."
            )
        try:
            return torch.load(pickled, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"{pickled} cannot be read safely ({exc}).") from exc
    raise CheckpointError(
        f"No {WEIGHTS_NAME} in {folder}. Point to the folder save_pretrained() wrote "
        "(non-default adapters live in a subfolder named after the adapter)."
    )
