"""The run folder: what ``deltatune train`` writes, and loading a trained adapter back for inference.

::

    <output_dir>/
      adapter/                 the adapter in HF peft's format (adapter_config.json, adapter_model.safetensors)
        deltatune_run.json     task, label names, base model, prompt format, max length, data (for eval/predict)
      train_options.json       every option of the run
      metrics.jsonl            one line per optimizer step ("train") and per evaluation ("eval")
      summary.json             final metrics, parameter counts, adapter size, wall time, peak memory
      loss.png, metric.png     plots of the curves in metrics.jsonl
      checkpoints/step-N/      resumable checkpoints (see deltatune.train.resume)
"""

from __future__ import annotations

import json
import resource
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..bundled import resolve_model_path
from ..config import CONFIG_NAME, read_config_file
from ..errors import CheckpointError, ConfigError

RUN_INFO = "deltatune_run.json"
ADAPTER_DIR = "adapter"
TASK_FROM_TYPE = {"SEQ_CLS": "seq_cls", "CAUSAL_LM": "instruct", "SEQ_2_SEQ_LM": "seq2seq"}
OWN_OUTPUTS = ("adapter", "checkpoints", "metrics.jsonl", "summary.json", "train_options.json", "loss.png",
               "metric.png", "report.md")


def adapter_dir(path: str | Path) -> Path:
    """The adapter folder for a run folder or an adapter folder."""
    path = Path(path)
    if (path / ADAPTER_DIR / CONFIG_NAME).is_file():
        return path / ADAPTER_DIR
    if (path / CONFIG_NAME).is_file():
        return path
    raise CheckpointError(
        f"{path} holds no adapter: expected {path / ADAPTER_DIR / CONFIG_NAME} (a run folder from deltatune "
        f"train) or {path / CONFIG_NAME} (an adapter folder)."
    )


@dataclass
class RunInfo:
    """What inference needs beyond the adapter itself."""

    task: str
    base_model: str | None = None
    labels: list[str] | None = None
    prompt_format: str = "auto"
    max_length: int = 128
    data: dict[str, Any] | None = None

    def save(self, folder: Path) -> None:
        (folder / RUN_INFO).write_text(json.dumps(self.__dict__, indent=2) + "\n", encoding="utf-8")


def read_run_info(folder: Path) -> RunInfo | None:
    path = folder / RUN_INFO
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    return RunInfo(**{k: v for k, v in data.items() if k in RunInfo.__dataclass_fields__})


def describe_adapter(folder: Path) -> RunInfo:
    """Run info of an adapter; for adapters not written by ``deltatune train``, guessed from its config."""
    info = read_run_info(folder)
    if info is not None:
        return info
    config = read_config_file(folder)
    task = TASK_FROM_TYPE.get(str(config.get("task_type")), "")
    return RunInfo(task=task, base_model=config.get("base_model_name_or_path"))


def head_labels(folder: Path) -> list[str] | None:
    """Label names ``LABEL_0..`` from the size of a saved classification head, if the adapter has one."""
    from safetensors import safe_open

    from ..checkpoint.io import WEIGHTS_NAME

    path = folder / WEIGHTS_NAME
    if not path.is_file():
        return None
    with safe_open(str(path), "pt") as handle:
        for key in handle.keys():  # noqa: SIM118 (safe_open is not iterable)
            if key.endswith(("classifier.weight", "score.weight", "classifier.out_proj.weight")):
                rows = handle.get_slice(key).get_shape()[0]
                return [f"LABEL_{i}" for i in range(rows)]
    return None


def resolve_base(model: str | None, info: RunInfo | None, folder: Path | None = None) -> str:
    """The base model folder: ``--model`` if given, else the one recorded at training time (for the adapter
    in ``folder``, named in the error when that base is not here)."""
    name = model or (info.base_model if info else None)
    if not name:
        raise ConfigError("Which base model? Pass --model (a bundled name such as minilm, or a local folder).")
    if model is None and folder is not None:
        try:
            return resolve_model_path(name)
        except FileNotFoundError as exc:
            raise ConfigError(f"The adapter in {folder} was trained on {name!r}, which is not a bundled model or local "
                              "folder here (deltatune never downloads); pass --model with the base model's folder.") from exc
    return resolve_model_path(name)


def peak_rss_bytes() -> int:
    """Peak resident memory of this process (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) with shared tensors counted once."""
    unique = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in unique if p.requires_grad), sum(p.numel() for p in unique)


def prepare_output(out: Path, resume: bool, overwrite: bool) -> None:
    """Make sure ``out`` can take this run: refuse to mix a new run into an old one's files, and say what
    each way forward would do (a finished run is never retrained over unless ``overwrite`` says so)."""
    import shutil

    from .resume import list_checkpoints

    existing = [name for name in OWN_OUTPUTS if (out / name).exists()]
    checkpoints = list_checkpoints(out) if existing else []
    finished = (out / "summary.json").exists()
    if existing and not overwrite:
        if finished and not checkpoints:
            raise ConfigError(
                f"{out} holds a finished run (summary.json, {ADAPTER_DIR}/) and no checkpoint to resume from. "
                "Pass --overwrite to train again from scratch into it (its files are replaced), or choose another "
                "--output-dir."
            )
        if not resume:
            where = f"its newest checkpoint is {checkpoints[-1].name}" if checkpoints else "it has no checkpoint"
            raise ConfigError(
                f"{out} already holds a {'finished' if finished else 'partial'} run ({', '.join(existing)}; {where}). "
                + ("Pass --resume to continue it from that checkpoint, " if checkpoints else "")
                + "pass --overwrite to replace it with a new run, or choose another --output-dir."
            )
    if existing and overwrite and not resume:
        for name in existing:
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    out.mkdir(parents=True, exist_ok=True)
