"""``deltatune combine``: a new adapter folder made from weighted adapter folders.

Every adapter loads onto one base model (the first adapter's, or ``--model``); an adapter trained on
another base is refused by the same fingerprint check as any load. The combination is
``DeltaModel.add_weighted_adapter`` (see ``docs/methods.md``, "Adapter arithmetic"); the result is
written as an ordinary adapter folder, under a temporary name first.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from ..errors import ConfigError
from ..model import DeltaModel
from ..train.runs import adapter_dir
from .inference import load_for_inference


def run_combine(
    adapters: list[str], weights: list[float], output: str, combination_type: str = "svd", rank: int | None = None,
    density: float | None = None, seed: int = 0, majority_sign_method: str = "total", model: str | None = None,
) -> Path:
    """Combine ``adapters`` with ``weights`` and write the new adapter to ``output``; returns the folder."""
    if len(adapters) != len(weights):
        raise ConfigError(f"--weights needs one weight per adapter: {len(adapters)} adapters, {len(weights)} weights.")
    out = Path(output)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} exists and is not empty; choose a new folder for the combined adapter.")
    loaded = load_for_inference(adapters[0], model)
    delta = loaded.model
    if not isinstance(delta, DeltaModel):
        raise ConfigError("combine needs adapters.")
    names = ["default"] + [f"adapter{i}" for i in range(1, len(adapters))]
    for name, folder in zip(names[1:], adapters[1:]):
        delta.load_adapter(adapter_dir(folder), name)
    try:
        delta.add_weighted_adapter(names, weights, "combined", combination_type=combination_type, svd_rank=rank,
                                   density=density, majority_sign_method=majority_sign_method, seed=seed)
    except ConfigError as exc:  # say which folders, not the names they were loaded under here
        message = str(exc)
        for name, folder in zip(names, adapters):
            message = message.replace(repr(name), repr(folder))
        raise ConfigError(message) from exc
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        delta.save_pretrained(tmp, selected_adapters=["combined"])
        if out.exists():
            out.rmdir()
        (tmp / "combined").rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


__all__ = ["run_combine"]
