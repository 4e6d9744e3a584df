"""Forgetting: fine-tune SmolLM2-135M on one domain and measure general-text perplexity.

``job["domain"]`` picks the training data: ``"chatterbot"`` (default, round one: ChatterBot Q/A pairs,
loss on the answer only) or ``"kjv"`` (causal-LM text: KJV verses of the historical books,
:func:`bench.corpus.kjv_train`; the target-domain perplexity is then the held-out ``kjv`` corpus,
other books, and the general text is fortunes plus the ChatterBot test split).
``job["method_options"]`` overrides fields of the method's config (``{"r": 64, "lora_alpha": 128}``),
``job["autocast"]`` (``"bf16"``) trains under CPU autocast; evaluation always runs in float32.

One process per configuration. Before training we measure perplexity on held-out
general text (:mod:`bench.corpus`) and on the ChatterBot test split (response tokens only), and keep
the logits of one fixed batch. After training we measure both again; for LoRA we also measure with
the adapter disabled and compare with the base: the perplexities must be equal and the logits
identical (max absolute difference reported).
"""

from __future__ import annotations

from typing import Any

import torch

from bench.corpus import general_corpora, kjv_train
from bench.loop import Trainer, TrainStats, epoch_batches, perplexity, train
from bench.measure import PeakMemory, median_after_warmup
from bench.methods import METHODS, build, trainable_counts


def _general_features(tokenizer: Any, texts: list[str], max_length: int) -> list[dict[str, Any]]:
    from deltatune.train.data.encoding import encode_causal_lm

    return encode_causal_lm([{"text": t} for t in texts], tokenizer, max_length=max_length)


def _all_ppl(model: torch.nn.Module, evals: dict[str, list], pad_id: int) -> dict[str, float]:
    return {name: perplexity(model, feats, pad_id=pad_id) for name, feats in evals.items()}


@torch.inference_mode()
def _probe_logits(model: torch.nn.Module, probe: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    return model(**probe).logits.float().clone()


def _train_with_curve(model: torch.nn.Module, batches: list, lr: float, job: dict[str, Any], evals: dict[str, list],
                      pad_id: int, before: dict[str, float]) -> tuple[TrainStats, list[dict[str, Any]]]:
    """:func:`bench.loop.train`, pausing every ``job["eval_every"]`` steps to measure every perplexity.

    Returns the stats (evaluation time excluded) and ``[{"step": 0, "ppl": before}, {"step": k, "ppl": ...}, ...]``.
    """
    trainer = Trainer(model, lr=lr, total_steps=len(batches), autocast=job.get("autocast"))
    stats, curve = TrainStats(), [{"step": 0, "ppl": before}]
    for index, batch in enumerate(batches, 1):
        model.train()
        loss, seconds = trainer.step(batch)
        stats.step_times.append(seconds)
        stats.losses.append(loss)
        if index % job["eval_every"] == 0 or index == len(batches):
            curve.append({"step": index, "ppl": _all_ppl(model, evals, pad_id),
                          "loss": sum(stats.losses[-job["eval_every"]:]) / len(stats.losses[-job["eval_every"]:])})
    stats.seconds = sum(stats.step_times)
    return stats, curve


def run(job: dict[str, Any]) -> dict[str, Any]:
    """Train ``job["method"]`` (``full`` / ``lora``) for ``job["steps"]`` steps; perplexities before/after."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deltatune.bundled import bundled_model_path
    from deltatune.train.data.builtin import load_builtin
    from deltatune.train.data.encoding import encode_instruction, pad_collate

    path = bundled_model_path("smollm2")
    tokenizer = AutoTokenizer.from_pretrained(path)
    pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    max_len = job["max_length"]
    corpora = general_corpora(job["n_eval"])
    if job.get("domain", "chatterbot") == "kjv":
        texts = kjv_train(job["steps"] * job["batch_size"])
        if not texts or "kjv" not in corpora:
            raise RuntimeError("the kjv domain needs the `bible` command (Debian package bible-kjv) for its text")
        train_feats = _general_features(tokenizer, texts, max_len)
    else:
        train_feats = encode_instruction(load_builtin("chatterbot", "train"), tokenizer, max_length=max_len)
    evals = {name: _general_features(tokenizer, texts, max_len) for name, texts in corpora.items()}
    chatter = encode_instruction(load_builtin("chatterbot", "test"), tokenizer, max_length=max_len)
    evals["chatterbot_test"] = chatter[: job["n_eval"]] if job.get("domain") == "kjv" else chatter

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    base_params = sum(p.numel() for p in model.parameters())
    probe = pad_collate(next(iter(evals.values()))[:4], pad_token_id=pad_id)
    probe.pop("labels")
    before = _all_ppl(model, evals, pad_id)
    base_logits = _probe_logits(model, probe)

    model = build(model, job["method"], job["lib"], "CAUSAL_LM", job.get("method_options"))
    trainable, _ = trainable_counts(model)
    batches = epoch_batches(train_feats, seed=0, epochs=job["epochs"], batch_size=job["batch_size"], pad_id=pad_id)
    batches = batches[: job["steps"]]
    memory = PeakMemory()
    memory.start(model)
    lr = job["lr"] or METHODS[job["method"]].lr
    curve: list[dict[str, Any]] = []
    if job.get("eval_every"):  # perplexities every ``eval_every`` steps, in one run (one optimiser, one schedule)
        stats, curve = _train_with_curve(model, batches, lr, job, evals, pad_id, before)
    else:
        stats = train(model, batches, lr=lr, autocast=job.get("autocast"))
    out: dict[str, Any] = {
        "method": job["method"], "steps": len(batches), "lr": job["lr"], "trainable": trainable,
        "base_params": base_params, "peak_mb": memory.peak_mb(), "mem_method": memory.method,
        "step_s": median_after_warmup(stats.step_times, 3), "train_seconds": stats.seconds,
        "corpora": {k: len(v) for k, v in corpora.items()}, "before": before,
        "after": curve[-1]["ppl"] if curve else _all_ppl(model, evals, pad_id),
        "domain": job.get("domain", "chatterbot"), "train_examples": len(train_feats),
        "curve": curve, "first_loss": stats.losses[0], "final_loss": sum(stats.losses[-10:]) / len(stats.losses[-10:]),
    }
    if hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            out["disabled"] = _all_ppl(model, evals, pad_id)
            out["disabled_logit_max_abs_diff"] = float((_probe_logits(model, probe) - base_logits).abs().max())
    return out
