"""Classification runs on bundled MiniLM: the shared setup, and the accuracy job.

An accuracy job is one configuration (method x library x task); its seeds run one after another in
the same process, each from a freshly loaded model. The cost jobs (:mod:`bench.cost`) reuse
:func:`prepare` and :func:`load_model` so that every measurement sees the same batches and weights.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from bench.loop import Batch, accuracy, epoch_batches, epochs_for, train
from bench.measure import median_after_warmup
from bench.methods import METHODS, build, trainable_counts


@dataclass
class Prepared:
    """Everything a classification job needs before it loads a model."""

    path: Any
    labels: list[str]
    train: list[dict[str, Any]]
    test: list[dict[str, Any]]
    pad_id: int
    evals: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # every split in ``eval_splits``


def prepare(job: dict[str, Any]) -> Prepared:
    """Tokenizer, encoded ``train`` (first ``n_train`` rows of the fixed split) and evaluation features.

    ``job["eval_splits"]`` (e.g. ``["validation", "test"]``) evaluates each trained model on several
    splits; ``test`` is then the first of them. Otherwise ``job["eval_split"]`` (default ``"test"``).
    """
    from transformers import AutoTokenizer

    from deltatune.bundled import bundled_model_path
    from deltatune.train.data.builtin import label_names, load_builtin
    from deltatune.train.data.encoding import encode_classification

    path = bundled_model_path(job.get("model", "minilm"))
    tokenizer = AutoTokenizer.from_pretrained(path)
    labels = label_names(job["task"])

    def enc(rows: list[dict[str, str]]) -> list[dict[str, Any]]:
        return encode_classification(rows, tokenizer, labels, max_length=job["max_length"])

    train_rows = load_builtin(job["task"], "train", max_examples=job["n_train"])
    splits = job.get("eval_splits") or [job.get("eval_split", "test")]
    evals = {split: enc(load_builtin(job["task"], split)) for split in splits}
    return Prepared(path, labels, enc(train_rows), evals[splits[0]], int(tokenizer.pad_token_id), evals)


def load_model(prep: Prepared, method: str, lib: str, seed: int,
               options: dict[str, Any] | None = None) -> tuple[nn.Module, dict[str, int]]:
    """MiniLM with a fresh classifier head (seeded: identical for every method) and the method applied
    (``options`` override fields of its config)."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(prep.path, num_labels=len(prep.labels))
    base_params = sum(p.numel() for p in model.parameters())
    model = build(model, method, lib, "SEQ_CLS", options)
    trainable, total = trainable_counts(model)
    return model, {"trainable": trainable, "total": total, "base_params": base_params}


def batches_for(prep: Prepared, job: dict[str, Any], seed: int) -> list[Batch]:
    """The run's batches: ``epochs`` (raised to reach ``min_steps``) seeded orders, cut at ``max_steps``."""
    epochs = epochs_for(len(prep.train), job["batch_size"], job["epochs"], job.get("min_steps", 0))
    batches = epoch_batches(prep.train, seed=seed, epochs=epochs, batch_size=job["batch_size"], pad_id=prep.pad_id)
    return batches[: job["max_steps"]] if job.get("max_steps") else batches


def run(job: dict[str, Any]) -> dict[str, Any]:
    """Train and evaluate ``job["method"]`` of ``job["lib"]`` on ``job["task"]`` for each seed."""
    prep = prepare(job)
    runs = []
    for seed in job["seeds"]:
        model, counts = load_model(prep, job["method"], job["lib"], seed, job.get("method_options"))
        batches = batches_for(prep, job, seed)
        stats = train(model, batches, lr=job.get("lr") or METHODS[job["method"]].lr, autocast=job.get("autocast"),
                      **({"warmup_frac": job["warmup_frac"]} if "warmup_frac" in job else {}))
        runs.append({
            "seed": seed, "steps": len(batches), "train_seconds": stats.seconds, **counts,
            "epochs": epochs_for(len(prep.train), job["batch_size"], job["epochs"], job.get("min_steps", 0)),
            "final_loss": sum(stats.losses[-10:]) / max(1, len(stats.losses[-10:])),
            "step_s": median_after_warmup(stats.step_times, 5),  # informational: these runs may share the CPU
            "accuracy": accuracy(model, prep.test, pad_id=prep.pad_id),
        })
        if len(prep.evals) > 1:
            runs[-1]["accuracies"] = {split: accuracy(model, f, pad_id=prep.pad_id) for split, f in prep.evals.items()}
        del model, batches
        gc.collect()
    return {"n_train": len(prep.train), "n_test": len(prep.test), "runs": runs}
