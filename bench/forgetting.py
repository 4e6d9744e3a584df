"""Forgetting: fine-tune SmolLM2-135M on ChatterBot Q/A pairs and measure general-text perplexity.

One process per method (``full`` or ``lora``). Before training we measure perplexity on held-out
general text (:mod:`bench.corpus`) and on the ChatterBot test split (response tokens only), and keep
the logits of one fixed batch. After training we measure both again; for LoRA we also measure with
the adapter disabled and compare with the base: the perplexities must be equal and the logits
identical (max absolute difference reported).
"""

from __future__ import annotations

from typing import Any

import torch

from bench.corpus import general_corpora
from bench.loop import epoch_batches, perplexity, train
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
    train_feats = encode_instruction(load_builtin("chatterbot", "train"), tokenizer, max_length=max_len)
    corpora = general_corpora(job["n_eval"])
    evals = {name: _general_features(tokenizer, texts, max_len) for name, texts in corpora.items()}
    evals["chatterbot_test"] = encode_instruction(load_builtin("chatterbot", "test"), tokenizer, max_length=max_len)

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    base_params = sum(p.numel() for p in model.parameters())
    probe = pad_collate(next(iter(evals.values()))[:4], pad_token_id=pad_id)
    probe.pop("labels")
    before = _all_ppl(model, evals, pad_id)
    base_logits = _probe_logits(model, probe)

    model = build(model, job["method"], job["lib"], "CAUSAL_LM")
    trainable, _ = trainable_counts(model)
    batches = epoch_batches(train_feats, seed=0, epochs=job["epochs"], batch_size=job["batch_size"], pad_id=pad_id)
    batches = batches[: job["steps"]]
    memory = PeakMemory()
    memory.start(model)
    stats = train(model, batches, lr=job["lr"] or METHODS[job["method"]].lr)
    out: dict[str, Any] = {
        "method": job["method"], "steps": len(batches), "lr": job["lr"], "trainable": trainable,
        "base_params": base_params, "peak_mb": memory.peak_mb(), "mem_method": memory.method,
        "step_s": median_after_warmup(stats.step_times, 3), "train_seconds": stats.seconds,
        "corpora": {k: len(v) for k, v in corpora.items()}, "before": before, "after": _all_ppl(model, evals, pad_id),
        "first_loss": stats.losses[0], "final_loss": sum(stats.losses[-10:]) / len(stats.losses[-10:]),
    }
    if hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            out["disabled"] = _all_ppl(model, evals, pad_id)
            out["disabled_logit_max_abs_diff"] = float((_probe_logits(model, probe) - base_logits).abs().max())
    return out
