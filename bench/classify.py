"""One classification configuration (method x library x task), run inside its own process.

All seeds of a configuration run one after another in the same process. Peak memory is measured on
the first seed only, the first training run of a fresh process (see :mod:`bench.measure`); step
time is the median over that run's steps after warm-up. Every seed reports accuracy.
"""

from __future__ import annotations

import gc
import tempfile
from typing import Any

import torch

from bench.loop import accuracy, epoch_batches, epochs_for, train
from bench.measure import PeakMemory, folder_bytes, median_after_warmup
from bench.methods import METHODS, build, head_modules, trainable_counts


def _save_bytes(model: torch.nn.Module, name: str) -> int:
    """Bytes on disk of what this method must store: the adapter folder, the head, or the whole model."""
    with tempfile.TemporaryDirectory() as tmp:
        if METHODS[name].kind == "head":
            from safetensors.torch import save_file

            state = {f"{i}.{k}": v.contiguous() for i, h in enumerate(head_modules(model)) for k, v in h.state_dict().items()}
            save_file(state, f"{tmp}/head.safetensors")
        else:
            model.save_pretrained(tmp)
        return folder_bytes(tmp)


def load_task(task: str, n_train: int, max_length: int, tokenizer: Any, eval_split: str = "test") -> tuple[list, list, list[str]]:
    """Encoded ``train`` (first ``n_train`` rows of the fixed split) and ``eval_split`` features, and the labels."""
    from deltatune.train.data import label_names, load_builtin
    from deltatune.train.encoding import encode_classification

    labels = label_names(task)
    train_rows = load_builtin(task, "train", max_examples=n_train)
    test_rows = load_builtin(task, eval_split)
    enc = lambda rows: encode_classification(rows, tokenizer, labels, max_length=max_length)
    return enc(train_rows), enc(test_rows), labels


def run(job: dict[str, Any]) -> dict[str, Any]:
    """Train and evaluate ``job["method"]`` of ``job["lib"]`` on ``job["task"]`` for each seed."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from deltatune.bundled import bundled_model_path

    path = bundled_model_path(job["model"])
    tokenizer = AutoTokenizer.from_pretrained(path)
    train_feats, test_feats, labels = load_task(
        job["task"], job["n_train"], job["max_length"], tokenizer, job.get("eval_split", "test")
    )
    pad_id = int(tokenizer.pad_token_id)
    epochs = epochs_for(len(train_feats), job["batch_size"], job["epochs"], job.get("min_steps", 0))
    runs = []
    for i, seed in enumerate(job["seeds"]):
        torch.manual_seed(seed)  # the new classifier head is initialised identically for every method
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(labels))
        base_params = sum(p.numel() for p in model.parameters())
        model = build(model, job["method"], job["lib"], "SEQ_CLS")
        trainable, total = trainable_counts(model)
        batches = epoch_batches(train_feats, seed=seed, epochs=epochs, batch_size=job["batch_size"], pad_id=pad_id)
        batches = batches[: job["max_steps"]] if job.get("max_steps") else batches
        memory = PeakMemory()
        if i == 0:
            memory.start()
        stats = train(model, batches, lr=job.get("lr") or METHODS[job["method"]].lr)
        record: dict[str, Any] = {
            "seed": seed, "steps": len(batches), "epochs": epochs, "train_seconds": stats.seconds,
            "final_loss": sum(stats.losses[-10:]) / max(1, len(stats.losses[-10:])),
            "trainable": trainable, "total": total, "base_params": base_params,
        }
        if i == 0:
            record |= {
                "peak_mb": memory.peak_mb(), "baseline_mb": memory.baseline_mb(), "mem_method": memory.method,
                "step_s": median_after_warmup(stats.step_times, job.get("warmup_steps", 5)),
            }
            if job.get("save", True):
                record["file_bytes"] = _save_bytes(model, job["method"])
        if job.get("evaluate", True):
            record["accuracy"] = accuracy(model, test_feats, pad_id=pad_id)
        runs.append(record)
        del model, batches
        gc.collect()
    return {"n_train": len(train_feats), "n_test": len(test_feats), "runs": runs}
