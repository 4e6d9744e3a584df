"""Evaluation, prediction and generation with a (delta) model.

Evaluation batches examples of similar length together (sorted by length) so little time goes into
padding; the metrics do not depend on the order. Classification reports loss, accuracy and macro-F1;
the language-model tasks report the token-averaged loss and perplexity ``exp(loss)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from .metrics import accuracy, macro_f1, perplexity
from .tasks import Encoder, Features, collate, forward, loss_sum


def _batches(features: Sequence[Features], batch_size: int) -> Iterator[list[int]]:
    order = sorted(range(len(features)), key=lambda i: len(features[i]["input_ids"]))  # type: ignore[arg-type]
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


@torch.no_grad()
def evaluate(
    model: nn.Module, task: str, features: Sequence[Features], batch_size: int, pad_id: int,
    num_labels: int | None = None, on_batch: Callable[[int, int], None] | None = None,
) -> dict[str, float]:
    """Metrics of ``model`` on encoded ``features`` (the model's train/eval mode is restored after);
    ``on_batch(done, total)`` is called after every batch (a progress bar)."""
    if not features:
        return {}
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    pred: list[int] = []
    gold: list[int] = []
    try:
        batches = list(_batches(features, batch_size))
        for done, indices in enumerate(batches, 1):
            batch = collate([features[i] for i in indices], pad_id)
            logits = forward(model, task, batch)
            loss, n = loss_sum(task, logits, batch)
            total, count = total + float(loss), count + n
            if task == "seq_cls":
                pred.extend(logits.argmax(-1).tolist())
                gold.extend(batch["labels"].tolist())
            if on_batch is not None:
                on_batch(done, len(batches))
    finally:
        model.train(was_training)
    mean = total / max(count, 1)
    if task == "seq_cls":
        return {"loss": mean, "accuracy": accuracy(pred, gold), "macro_f1": macro_f1(pred, gold, num_labels or 0)}
    return {"loss": mean, "perplexity": perplexity(mean), "tokens": float(count)}


@torch.no_grad()
def predict_proba(model: nn.Module, encoder: Encoder, texts: Sequence[str], batch_size: int) -> list[list[float]]:
    """Class probabilities ``softmax(logits)`` per text, in input order."""
    model.eval()
    features = encoder.encode_texts(texts)
    out: list[list[float]] = [[] for _ in texts]
    for indices in _batches(features, batch_size):
        batch = collate([features[i] for i in indices], encoder.tokenizer.pad_token_id)
        probs = forward(model, "seq_cls", batch).float().softmax(-1)  # (B, C)
        for i, row in zip(indices, probs.tolist()):
            out[i] = row
    return out


@torch.no_grad()
def generate_texts(
    model: nn.Module, encoder: Encoder, prompts: Sequence[str], max_new_tokens: int,
    temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
) -> list[str]:
    """Continue each prompt (formatted like training prompts); greedy when ``temperature`` is 0."""
    model.eval()
    tok = encoder.tokenizer
    torch.manual_seed(seed)
    texts: list[str] = []
    for prompt in prompts:
        input_ids = torch.tensor([encoder.prompt_ids(prompt)[-encoder.max_length:]])  # (1, T)
        kwargs: dict[str, Any] = {
            "input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
            "max_new_tokens": max_new_tokens, "pad_token_id": tok.pad_token_id,
            "do_sample": temperature > 0,
        }
        if temperature > 0:
            kwargs.update(temperature=temperature, top_p=top_p)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        out = model.generate(**kwargs)  # (1, T + new)
        texts.append(tok.decode(out[0, input_ids.shape[1]:], skip_special_tokens=True).strip())
    return texts
