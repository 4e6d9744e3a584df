"""``deltatune demo``: fine-tune the bundled MiniLM on TREC question classification in a few minutes.

Recipe: ``deltatune train``'s default LoRA recipe (:meth:`deltatune.LoraConfig.recommended`: every
linear layer, r=32, alpha=64, dropout 0.1, at its recommended learning rate; picked on validation data
with ``python -m bench.recipe``) plus the classification head, 2,000 training questions, the recipe's epochs,
batch 16 (rows of similar length batched together: TREC questions vary from 5 to 40 tokens, so this
removes ~40% of the work), AdamW with 6% warm-up and linear decay.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from ..train.cpu import free_cores
from ..train.data.builtin import label_names
from ..train.data.sources import DataSpec, limit, load_splits
from ..train.evaluate import evaluate
from ..train.loop import train
from ..train.metrics import macro_f1, majority_baseline
from ..train.options import TrainOptions
from .inference import load_for_inference

DEMO = {
    "model": "minilm", "data": "trec", "task": "seq_cls", "method": "lora",  # options and lr: LoRA's recipe
    "max_train_examples": 2000, "group_by_length": True, "batch_size": 16, "eval_every": 50,  # epochs: the recipe's
    "output_dir": "runs/demo", "overwrite": True,
}


def demo_options(**overrides: Any) -> TrainOptions:
    """The demo's training options, with ``overrides`` (``None`` values ignored) applied."""
    options = {**DEMO, "threads": free_cores(), **{k: v for k, v in overrides.items() if v is not None}}
    return TrainOptions(**options)


def _untrained(options: TrainOptions, labels: list[str]) -> dict[str, float]:
    """Test metrics before training: the base encoder with the freshly initialised head (LoRA's B = 0)."""
    splits = load_splits(DataSpec.from_options(options), "seq_cls")
    loaded = load_for_inference(None, options.model, "seq_cls", labels, options.max_length, seed=options.seed)
    features = loaded.encoder.encode_rows(limit(splits.test, options.max_eval_examples))
    return evaluate(loaded.model, "seq_cls", features, 64, loaded.encoder.tokenizer.pad_token_id, len(labels))


def run_demo(**overrides: Any) -> dict[str, Any]:
    """Train, compare against the baselines, print the table and write ``report.md``; returns the numbers."""
    options = demo_options(**overrides)
    labels = label_names(options.data)
    splits = load_splits(DataSpec.from_options(options), "seq_cls")
    test = limit(splits.test, options.max_eval_examples)
    train_rows = limit(splits.train, options.max_train_examples)
    majority, majority_acc = majority_baseline([r["label"] for r in train_rows], [r["label"] for r in test])
    gold = [labels.index(r["label"]) for r in test]
    majority_f1 = macro_f1([labels.index(majority)] * len(test), gold, len(labels))
    if not options.quiet:
        print(f"deltatune demo: LoRA ({_recipe_text(options)}) + classifier head, bundled MiniLM-L6, TREC "
              f"({len(train_rows):,} training / {len(test):,} test questions, {len(labels)} classes)", file=sys.stderr)
    untrained = _untrained(options, labels)
    summary = train(options)
    tuned = summary["final"]["test"]
    result = {
        "majority": {"label": majority, "accuracy": majority_acc, "macro_f1": majority_f1},
        "untrained": untrained, "fine_tuned": tuned, "summary": summary, "output_dir": options.output_dir,
    }
    table = format_table(result, len(test))
    print(table)
    write_report(Path(options.output_dir), table, options)
    return result


def format_table(result: dict[str, Any], n_test: int) -> str:
    s = result["summary"]
    rows = [
        (f"majority class ({result['majority']['label']})", result["majority"]),
        ("untrained model (fresh head)", result["untrained"]),
        (f"fine-tuned, {s['steps']} steps", result["fine_tuned"]),
    ]
    lines = [f"TREC test set ({n_test} questions)      accuracy   macro-F1"]
    lines += [f"  {name:<34} {m['accuracy']:8.3f}   {m['macro_f1']:8.3f}" for name, m in rows]
    lines += [
        (f"trainable parameters: {s['trainable_params']:,} of {s['total_params']:,} "
         f"({100 * s['trainable_share']:.2f}%)"),
        f"adapter size: {s['adapter_bytes'] / 1024:.0f} KiB  ({result['output_dir']}/adapter)",
        f"training wall time: {s['wall_time_s']:.0f} s; peak memory {s['peak_rss_bytes'] / 2**20:.0f} MiB",
        (f"plots: {result['output_dir']}/loss.png, {result['output_dir']}/metric.png; "
         if (Path(result["output_dir"]) / "loss.png").exists() else "plots: skipped; ")
        + f"report: {result['output_dir']}/report.md",
    ]
    return "\n".join(lines)


def _recipe_text(options: TrainOptions) -> str:
    o = options.method_options
    where = "every linear layer" if o.get("target_modules") == "all-linear" else f"{o.get('target_modules')}"
    return f"r={o.get('r')}, alpha={o.get('lora_alpha')}, dropout {o.get('lora_dropout')} on {where}"


def write_report(out: Path, table: str, options: TrainOptions) -> None:
    text = (
        "# deltatune demo: MiniLM + LoRA on TREC\n\n"
        f"```\n{table}\n```\n\n"
        f"Recipe: LoRA {_recipe_text(options)}, classifier head trained in full, "
        f"{options.max_train_examples} training questions, {options.epochs} epochs, batch {options.batch_size}, "
        f"lr {options.lr} (linear decay, {options.warmup_ratio:.0%} warm-up), seed {options.seed}.\n\n"
        "![loss](loss.png)\n\n![metric](metric.png)\n"
    )
    (out / "report.md").write_text(text, encoding="utf-8")
