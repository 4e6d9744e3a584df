"""Resumable training checkpoints, written atomically.

A checkpoint is a folder ``<output>/checkpoints/step-000040/`` holding

* ``trainable.safetensors``: every trainable tensor of the model, by parameter name;
* ``optimizer.safetensors`` + ``optimizer.json``: the optimizer's tensors (``state.<index>.<name>``) and
  everything else in its state dict (param groups, scalar state);
* ``rng.safetensors``: torch's CPU (and CUDA) generator states;
* ``step_hooks.safetensors``: the state of methods' step hooks (AdaLoRA's importance averages and kept
  masks; :func:`deltatune.step_hooks.step_hook_state`), absent when no hook keeps any;
* ``state.json``: step, data position, scheduler state, Python/NumPy RNG states, elapsed time, the options.

No pickle anywhere. The folder is first written as ``.tmp-step-000040-<pid>`` (each file fsynced), then
renamed in one ``os.rename``: a ``kill -9`` leaves either a complete checkpoint or a temporary folder that
the next run deletes. Only the newest ``keep`` checkpoints are kept.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import CheckpointError
from ..step_hooks import load_step_hook_state, step_hook_state

FOLDER = "checkpoints"
HOOKS_FILE = "step_hooks.safetensors"
_NAME = re.compile(r"^step-(\d+)$")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, data: Any) -> None:
    with path.open("w", encoding="utf-8") as handle:
        json.dump(data, handle)
        handle.flush()
        os.fsync(handle.fileno())


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))
    with path.open("rb") as handle:
        os.fsync(handle.fileno())


def _split_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _join_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    for index, values in meta["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every random generator the training loop touches: (tensors, JSON-able values)."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    py = random.getstate()
    values = {"python": [py[0], list(py[1]), py[2]], "numpy": [kind, keys.tolist(), pos, has_gauss, gauss]}
    return tensors, values


def set_rng_state(tensors: dict[str, torch.Tensor], values: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, state, gauss = values["python"]
    random.setstate((version, tuple(state), gauss))
    kind, keys, pos, has_gauss, cached = values["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def save_checkpoint(
    root: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
    extra: dict[str, Any], keep: int,
) -> Path:
    """Write the checkpoint of optimizer step ``step`` under ``root/checkpoints`` atomically."""
    folder = root / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step-{step:06d}"
    tmp = folder / f".tmp-step-{step:06d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    _save_tensors(tmp / "trainable.safetensors", trainable)
    opt_tensors, opt_meta = _split_optimizer(optimizer.state_dict())
    _save_tensors(tmp / "optimizer.safetensors", opt_tensors)
    _write_json(tmp / "optimizer.json", opt_meta)
    rng_tensors, rng_values = rng_state()
    _save_tensors(tmp / "rng.safetensors", rng_tensors)
    hook_state = step_hook_state(model)
    if hook_state:
        _save_tensors(tmp / HOOKS_FILE, hook_state)
    sched = scheduler.state_dict()  # LambdaLR keeps None for plain-function lambdas: JSON-able
    _write_json(tmp / "state.json", {"step": step, "scheduler": sched, "rng": rng_values, **extra})
    _fsync_dir(tmp)
    if final.exists():  # the same step saved by an earlier, interrupted attempt
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(folder)
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root/checkpoints``, oldest first."""
    folder = root / FOLDER
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def clean_partial(root: Path) -> None:
    """Delete temporary folders left by a process killed while writing a checkpoint."""
    folder = root / FOLDER
    if folder.is_dir():
        for path in folder.glob(".tmp-step-*"):
            shutil.rmtree(path, ignore_errors=True)


def load_checkpoint(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
) -> dict[str, Any]:
    """Restore model tensors, optimizer, scheduler and RNG states from ``path``; returns ``state.json``."""
    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
        trainable = load_file(str(path / "trainable.safetensors"))
        opt = _join_optimizer(
            load_file(str(path / "optimizer.safetensors")),
            json.loads((path / "optimizer.json").read_text(encoding="utf-8")),
        )
        rng = load_file(str(path / "rng.safetensors"))
        hook_state = load_file(str(path / HOOKS_FILE)) if (path / HOOKS_FILE).exists() else {}
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"Checkpoint {path} cannot be read ({exc}); delete it to resume from an older one.") from exc
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(trainable):
        raise CheckpointError(
            f"Checkpoint {path} holds other trainable tensors than this model "
            f"({len(set(params) ^ set(trainable))} differ); resume with the options of the original run."
        )
    load_step_hook_state(model, hook_state)  # checks the state fits before it changes any hook
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(trainable[name])
    optimizer.load_state_dict(opt)
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(rng, state["rng"])
    return state
