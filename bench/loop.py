"""A lean training loop, identical for every method and library: same batches, same order, same steps.

The data order of epoch ``e`` under seed ``s`` comes from ``random.Random(s * 1000 + e)``, never from
the global RNG, so it does not depend on how many random numbers a library draws while it builds its
adapter. Optimiser: AdamW (weight decay 0), linear warm-up over the first 6% of steps, then linear
decay to 0; gradients clipped to norm 1. Step time covers forward, backward, clipping, the optimiser
step and zeroing the gradients.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from deltatune.train.data.encoding import pad_collate

Batch = dict[str, torch.Tensor]


GROUP = 32  # batches per length-sorted group
AUTOCAST_DTYPES: dict[str | None, torch.dtype | None] = {None: None, "fp32": None, "bf16": torch.bfloat16}


def epoch_batches(features: Sequence[dict[str, Any]], *, seed: int, epochs: int, batch_size: int, pad_id: int) -> list[Batch]:
    """Every training batch in order, grouped by length to cut padding (HF's ``group_by_length`` idea).

    Each epoch: a seeded permutation of the examples, cut into groups of ``GROUP * batch_size``
    examples, each group sorted by length and cut into batches, then the batches shuffled (same seed).
    Every example is seen once per epoch; batches hold examples of similar length, so padding (wasted
    compute) is small, and the order is still random and identical for every method.
    """
    batches: list[Batch] = []
    for epoch in range(epochs):
        rng = random.Random(seed * 1000 + epoch)
        order = list(range(len(features)))
        rng.shuffle(order)
        chunks: list[list[int]] = []
        for lo in range(0, len(order), GROUP * batch_size):
            group = sorted(order[lo : lo + GROUP * batch_size], key=lambda i: len(features[i]["input_ids"]))
            chunks.extend(group[k : k + batch_size] for k in range(0, len(group), batch_size))
        rng.shuffle(chunks)
        batches.extend(pad_collate([features[i] for i in chunk], pad_token_id=pad_id) for chunk in chunks)
    return batches


def epochs_for(n_examples: int, batch_size: int, epochs: int, min_steps: int) -> int:
    """``epochs``, raised until the run has at least ``min_steps`` steps (small data sets)."""
    per_epoch = max(1, math.ceil(n_examples / batch_size))
    return max(epochs, math.ceil(min_steps / per_epoch))


@dataclass
class TrainStats:
    step_times: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


def _step_hooks(model: nn.Module, total_steps: int) -> tuple[list[Any], Any]:
    """Per-step work of methods that act around the optimizer step (AdaLoRA's rank budget), in either
    library: deltatune's step hooks, and HF peft's ``update_and_allocate`` (its ``total_step`` set here)."""
    import deltatune

    if isinstance(model, deltatune.DeltaModel):
        from deltatune.step_hooks import step_hooks

        return step_hooks(model, total_steps), None
    allocate = getattr(getattr(model, "base_model", None), "update_and_allocate", None)
    if allocate is not None:
        for config in model.peft_config.values():
            config.total_step = total_steps
    return [], allocate


class Trainer:
    """One optimiser over ``model``'s trainable parameters; :meth:`step` does one timed update."""

    def __init__(self, model: nn.Module, *, lr: float, total_steps: int, warmup_frac: float = 0.06,
                 autocast: str | None = None) -> None:
        self.model = model
        self.autocast = AUTOCAST_DTYPES[autocast]
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=0.0)
        warmup = max(1, int(warmup_frac * total_steps))

        def factor(step: int) -> float:  # linear warm-up, then linear decay to 0
            return (step + 1) / warmup if step < warmup else max(0.0, (total_steps - step) / max(1, total_steps - warmup))

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)
        self.done = 0
        self.hooks, self.allocate = _step_hooks(model, total_steps)

    def step(self, batch: Batch) -> tuple[float, float]:
        """Forward, backward, clip, optimiser step, zero grad; returns (loss, seconds)."""
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=self.autocast) if self.autocast else contextlib.nullcontext():
            loss = self.model(**batch).loss
        loss.backward()
        for hook in self.hooks:
            hook.before_optimizer_step()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.done += 1
        for hook in self.hooks:
            hook.after_optimizer_step(self.done)
        if self.allocate is not None:
            self.allocate(self.done)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach()), time.perf_counter() - t0


def train(model: nn.Module, batches: Sequence[Batch], *, lr: float, warmup_frac: float = 0.06,
          autocast: str | None = None) -> TrainStats:
    """Train ``model``'s parameters that require grad on ``batches``, one optimiser step per batch.

    ``autocast="bf16"`` runs the forward pass under CPU bfloat16 autocast (mixed precision: the
    parameters, their gradients and the optimiser state stay float32).
    """
    trainer = Trainer(model, lr=lr, total_steps=len(batches), warmup_frac=warmup_frac, autocast=autocast)
    stats = TrainStats()
    model.train()
    start = time.perf_counter()
    for batch in batches:
        loss, seconds = trainer.step(batch)
        stats.step_times.append(seconds)
        stats.losses.append(loss)
    stats.seconds = time.perf_counter() - start
    return stats


@torch.inference_mode()
def accuracy(model: nn.Module, features: Sequence[dict[str, Any]], *, pad_id: int, batch_size: int = 64) -> float:
    """Share of ``features`` whose argmax logit equals the label."""
    model.eval()
    correct = 0
    for lo in range(0, len(features), batch_size):
        batch = pad_collate(features[lo : lo + batch_size], pad_token_id=pad_id)
        labels = batch.pop("labels")
        logits = model(**batch).logits  # (B, classes)
        correct += int((logits.argmax(-1) == labels).sum())
    return correct / max(1, len(features))


@torch.inference_mode()
def perplexity(model: nn.Module, features: Sequence[dict[str, Any]], *, pad_id: int, batch_size: int = 8) -> float:
    """``exp`` of the mean token loss over ``features`` (labels -100 are skipped), summed token-wise."""
    model.eval()
    nll, tokens = 0.0, 0
    for lo in range(0, len(features), batch_size):
        batch = pad_collate(features[lo : lo + batch_size], pad_token_id=pad_id)
        labels = batch.pop("labels")
        logits = model(**batch).logits[:, :-1].float()  # (B, T-1, V)
        target = labels[:, 1:]
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1), reduction="sum")
        nll += float(loss)
        tokens += int((target != -100).sum())
    return math.exp(nll / max(1, tokens))
