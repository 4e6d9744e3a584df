"""What ``deltatune eval | predict | generate | merge | inspect`` do, as plain functions.

Each takes an adapter folder (a run folder from ``deltatune train`` or any adapter folder, including HF
peft's) and/or a base model, and returns data; :mod:`deltatune.cli` does the printing.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint.io import KEY_PREFIX, WEIGHTS_NAME
from ..checkpoint.state import read_fingerprint
from ..config import read_config_file
from ..errors import BaseModelMismatchError, ConfigError
from ..fingerprint import FINGERPRINT_KEY
from ..merge_check import MergeReport, default_probe
from ..model import DeltaModel
from ..quant import dequantize
from ..quant.convert import restore_source_layers
from ..quant.embedding import quantized_embedding_paths
from ..quant.load import check_quantize_options, recorded_quantization
from ..train.data.builtin import DataError
from ..train.data.files import load_file
from ..train.data.sources import DataSpec, infer_task, limit, load_splits
from ..train.evaluate import evaluate, generate_texts, predict_proba
from ..train.extras import installed
from ..train.loftq_base import apply_loftq_base
from ..train.loop import seed_everything
from ..train.progress import batch_bar
from ..train.runs import RunInfo, adapter_dir, describe_adapter, folder_bytes, head_labels, resolve_base
from ..train.tasks import Encoder, load_base_model, load_tokenizer, uses_chat

MERGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class Loaded:
    """A model ready for inference: the (delta) model, its encoder and the run info."""

    model: nn.Module
    encoder: Encoder
    info: RunInfo
    base_path: str
    adapter: Path | None


def load_for_inference(
    adapter: str | None, model: str | None = None, task: str | None = None, labels: list[str] | None = None,
    max_length: int | None = None, prompt_format: str | None = None, seed: int = 42, quantize: str | None = None,
    quantize_embeddings: bool = False,
) -> Loaded:
    """Load the base model (and the adapter, when given) for ``task``.

    Without an adapter the model is the base alone; a classification head is then freshly initialised
    with ``seed`` (the same head a training run with that seed starts from). The base is quantized as
    ``quantize`` (and ``quantize_embeddings``) say, else as the adapter's base was at training time (both
    recorded in its fingerprint).
    """
    check_quantize_options(quantize, quantize_embeddings)
    folder = adapter_dir(adapter) if adapter else None
    if not quantize and folder:
        quantize, quantize_embeddings = recorded_quantization(folder)
    info = describe_adapter(folder) if folder else RunInfo(task=task or "")
    task = task or info.task
    if not task:
        raise ConfigError("Cannot tell the task; pass --task (seq_cls, instruct, causal_lm or seq2seq).")
    base_path = resolve_base(model, info, folder)
    if task == "seq_cls":
        labels = info.labels or labels or (head_labels(folder) if folder else None)
        if not labels:
            raise ConfigError("A classification model needs its label set: pass --data (the labels come from it).")
    tokenizer = load_tokenizer(base_path)
    chat = task == "instruct" and uses_chat(tokenizer, prompt_format or info.prompt_format)
    encoder = Encoder(task, tokenizer, max_length or info.max_length, labels, chat)
    seed_everything(seed)
    base = load_base_model(task, base_path, labels, quantize, quantize_embeddings=quantize_embeddings)
    apply_loftq_base(base, folder)  # a LoftQ run with loftq_iter > 1 saved its base layers with the adapter
    module: nn.Module = DeltaModel.from_pretrained(base, folder) if folder else base
    module.eval()
    info.task, info.labels = task, labels
    return Loaded(module, encoder, info, base_path, folder)


def data_spec(data: str | None, info: RunInfo | None, **columns: Any) -> DataSpec:
    """The data to evaluate on: ``--data`` (with column options), else the data the run trained on."""
    recorded = dict(info.data or {}) if info else {}
    if data is None and not recorded:
        raise ConfigError("Which data? Pass --data (a built-in name or a local file).")
    values = {**recorded, **({"data": data} if data else {})}
    if data and data != recorded.get("data"):
        values = {"data": data, "split_seed": recorded.get("split_seed", 0)}
    values.update({k: v for k, v in columns.items() if v is not None})
    return DataSpec(**values)


def run_evaluation(
    adapter: str | None, model: str | None, data: str | None, split: str, task: str | None,
    batch_size: int, max_examples: int | None, quantize: str | None = None, progress: bool = False,
    quantize_embeddings: bool = False, **columns: Any,
) -> dict[str, Any]:
    """Metrics of an adapter (or the base alone) on one split of a data set (``progress``: a bar on stderr)."""
    check_quantize_options(quantize, quantize_embeddings)
    info = describe_adapter(adapter_dir(adapter)) if adapter else None
    spec = data_spec(data, info, **columns)
    task = task or (info.task if info and info.task else None) or infer_task(spec)
    splits = load_splits(spec, task, labels=info.labels if info else None)
    loaded = load_for_inference(adapter, model, task, splits.labels, quantize=quantize,
                                quantize_embeddings=quantize_embeddings)
    rows = limit(splits.get(split), max_examples)
    if not rows:
        raise DataError(f"Split {split!r} of {spec.data!r} is empty.")
    features = loaded.encoder.encode_rows(rows)
    labels = loaded.info.labels
    bar = batch_bar(f"eval {split}") if progress and installed("tqdm") else None
    metrics = evaluate(loaded.model, task, features, batch_size, loaded.encoder.tokenizer.pad_token_id,
                       len(labels) if labels else None, on_batch=bar)
    return {"adapter": str(loaded.adapter) if loaded.adapter else None, "model": loaded.base_path,
            "data": spec.data, "split": split, "examples": len(rows), "task": task, **metrics}


def read_inputs(texts: list[str] | None, file: str | None, column: str = "text") -> list[str]:
    """Inputs from ``--text``/``--prompt`` values or a file (.txt: one per line; .jsonl/.csv: ``column``)."""
    out = list(texts or [])
    if file:
        out += [row["text"] for row in load_file(file, "text", text_column=column)]
    if not out:
        raise ConfigError("No inputs: pass one or more --text/--prompt values or --file.")
    return out


def run_predict(loaded: Loaded, texts: list[str], batch_size: int) -> list[dict[str, Any]]:
    """Label and class probabilities per text."""
    if loaded.info.task != "seq_cls":
        raise ConfigError(f"predict is for classification adapters; this one is {loaded.info.task!r} (use generate).")
    labels = loaded.info.labels or []
    results = []
    for text, probs in zip(texts, predict_proba(loaded.model, loaded.encoder, texts, batch_size)):
        best = max(range(len(probs)), key=probs.__getitem__)
        results.append({"text": text, "label": labels[best], "probability": probs[best],
                        "probabilities": dict(zip(labels, probs))})
    return results


def run_generate(loaded: Loaded, prompts: list[str], **kwargs: Any) -> list[dict[str, str]]:
    if loaded.info.task not in ("instruct", "causal_lm"):
        raise ConfigError(f"generate needs a causal language model; this adapter is for {loaded.info.task!r}.")
    outputs = generate_texts(loaded.model, loaded.encoder, prompts, **kwargs)
    return [{"prompt": p, "response": r} for p, r in zip(prompts, outputs)]


def run_merge(adapter: str, output: str, model: str | None = None, dtype: str | None = None,
              quantize: str | None = None, quantize_embeddings: bool = False,
              ) -> tuple[Path, MergeReport | None, list[str]]:
    """Fold the adapter into the base weights and save a plain transformers model folder (+ tokenizer).

    ``dtype`` (``float32`` / ``bfloat16``): a quantized base is dequantized first, so the adapter is merged
    in full precision and the model is written in ``dtype`` (the usual export of a QLoRA result). Without
    it, a quantized base is merged by re-quantizing. Returns the folder, the merge-error report (logits
    merged vs unmerged on a probe batch; ``None`` for models without a vocabulary to probe with) and the
    paths of quantized token embeddings, which the folder holds dequantized (float: transformers has no
    format for them; :mod:`deltatune.quant.embedding`).
    The folder is written under a temporary name and renamed at the end: a failure leaves nothing behind.
    """
    check_quantize_options(quantize, quantize_embeddings)
    if dtype is not None and dtype not in MERGE_DTYPES:
        raise ConfigError(f"--dtype {dtype!r}: choose one of {', '.join(MERGE_DTYPES)}.")
    out = Path(output)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} exists and is not empty; choose a new folder for the merged model.")
    loaded = load_for_inference(adapter, model, quantize=quantize, quantize_embeddings=quantize_embeddings)
    if not isinstance(loaded.model, DeltaModel):
        raise ConfigError("merge needs an adapter.")
    if dtype is not None:
        dequantize(loaded.model.get_base_model(), torch.float32)  # merge in float32, then write in ``dtype``
    probe = default_probe(loaded.model.get_base_model())
    merged = loaded.model.merge_and_unload(probe=probe) if probe is not None else loaded.model.merge_and_unload()
    restore_source_layers(merged)  # GPT-2: dequantized Conv1D layers merged as nn.Linear become Conv1D again
    if dtype is not None:
        merged = merged.to(MERGE_DTYPES[dtype])
    float_embeddings = quantized_embedding_paths(merged)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        merged.save_pretrained(tmp)
        loaded.encoder.tokenizer.save_pretrained(tmp)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out, loaded.model.merge_report, float_embeddings


def inspect_adapter(adapter: str, base: str | None = None) -> dict[str, Any]:
    """What an adapter folder holds, and (with ``base``) whether it was trained on that base model."""
    from safetensors import safe_open

    folder = adapter_dir(adapter)
    config = read_config_file(folder)
    fingerprint = read_fingerprint(folder, config)
    config.pop(FINGERPRINT_KEY, None)
    tensors: dict[str, int] = {}
    weights = folder / WEIGHTS_NAME
    if weights.is_file():
        with safe_open(str(weights), "pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open is not iterable)
                n = 1
                for d in handle.get_slice(key).get_shape():
                    n *= d
                tensors[key] = n
    info = describe_adapter(folder)
    report: dict[str, Any] = {
        "folder": str(folder), "peft_type": config.get("peft_type"), "task": info.task or config.get("task_type"),
        "target_modules": config.get("target_modules"), "modules_to_save": config.get("modules_to_save"),
        "wrapped_modules": sorted((fingerprint or {}).get("target_shapes") or {}),
        "tensors": len(tensors), "trainable_params": sum(tensors.values()),
        "weights_bytes": weights.stat().st_size if weights.is_file() else 0, "folder_bytes": folder_bytes(folder),
        "labels": info.labels, "base_model": info.base_model or config.get("base_model_name_or_path"),
        "fingerprint": fingerprint, "config": config,
    }
    report["saved_modules"] = sorted({k[len(KEY_PREFIX):].rsplit(".", 1)[0] for k in tensors if k.startswith(KEY_PREFIX)})
    if base is not None:
        report["base_checked"] = base
        report["base_matches"], report["base_mismatch"] = _check_base(folder, base, fingerprint)
    return report


def _check_base(folder: Path, base: str, fingerprint: dict | None) -> tuple[bool | None, str | None]:
    from ..checkpoint.state import check_base

    if fingerprint is None:
        return None, "the adapter records no base-model fingerprint"
    info = describe_adapter(folder)
    path = resolve_base(base, None)
    if info.task:
        labels = info.labels or head_labels(folder)
        kind, embeddings = recorded_quantization(folder)
        model = load_base_model(info.task, path, labels if info.task == "seq_cls" else None, kind,
                                quantize_embeddings=embeddings)
    else:  # no task recorded: the adapter was made for the bare model class
        from transformers import AutoModel

        model = AutoModel.from_pretrained(path)
    try:
        check_base(model, fingerprint, str(folder), False)
    except BaseModelMismatchError as exc:
        return False, str(exc)
    return True, None


def dumps(data: Any) -> str:
    return json.dumps(data, indent=2, default=str)
