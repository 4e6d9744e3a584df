"""Optimizer (AdamW with parameter groups, LoRA+) and the learning-rate schedule.

Parameter groups: tensors with ``dim >= 2`` get weight decay, biases/norms/vectors do not. With LoRA+
(Hayou, Ghosh, Yu, arXiv 2402.12354) LoRA's ``B`` matrices (``lora_B``, ``lora_embedding_B``) use the
learning rate ``lr * ratio``: for a LoRA update ``B A`` the paper shows that a larger step for ``B``
than for ``A`` makes feature learning efficient at large width.

Schedule, with ``w`` warm-up steps out of ``T``, as a multiplier of the peak learning rate at step ``t``:

* warm-up ``t < w``: ``t / w``
* linear: ``max(0, (T - t) / (T - w))``
* cosine: ``0.5 * (1 + cos(pi * (t - w) / (T - w)))``
* constant: ``1``
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from ..errors import ConfigError
from ..registry import all_methods


def loraplus_markers() -> tuple[str, ...]:
    """Name fragments of the tensors LoRA+ speeds up, as the registered methods declare them."""
    return tuple(m for spec in all_methods() for m in spec.loraplus_markers)


def param_groups(
    model: nn.Module, lr: float, weight_decay: float, loraplus_ratio: float | None
) -> list[dict]:
    """AdamW groups over the trainable parameters; names are kept in ``"names"`` for inspection."""
    groups: dict[tuple[bool, bool], dict] = {}
    markers = loraplus_markers()
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_b = loraplus_ratio is not None and any(m in f".{name}" for m in markers)
        decay = param.dim() >= 2
        group = groups.setdefault((is_b, decay), {
            "params": [], "names": [], "weight_decay": weight_decay if decay else 0.0,
            "lr": lr * (loraplus_ratio if is_b else 1.0),
        })
        group["params"].append(param)
        group["names"].append(name)
    if not groups:
        raise ConfigError("The model has no trainable parameters; check the method options (target_modules).")
    if loraplus_ratio is not None and not any(is_b for is_b, _ in groups):
        raise ConfigError(
            "loraplus_lr_ratio applies to LoRA's B matrices, but this adapter has none (lora_B / lora_embedding_B); "
            "drop the option or use method lora."
        )
    return [groups[key] for key in sorted(groups)]


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, loraplus_ratio: float | None) -> torch.optim.AdamW:
    groups = param_groups(model, lr, weight_decay, loraplus_ratio)
    return torch.optim.AdamW(
        [{k: v for k, v in g.items() if k != "names"} for g in groups], lr=lr, foreach=False
    )


def lr_multiplier(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    """The schedule as a function of the optimizer step (see the module docstring)."""

    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return max(0.0, 1.0 - progress)

    return factor


def make_scheduler(
    optimizer: torch.optim.Optimizer, schedule: str, warmup: int, total: int
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(schedule, warmup, total))
