"""Per-step hooks of methods that act during training beyond their gradients (AdaLoRA's rank budget).

A method whose :class:`~deltatune.registry.MethodSpec` has ``make_step_hook`` gets, for each active
trainable adapter, one hook object with two calls, which every training loop makes around its
optimizer step:

    for hook in step_hooks(model): hook.before_optimizer_step()      # gradients complete, not clipped
    optimizer.step()
    for hook in step_hooks(model): hook.after_optimizer_step(step)   # step: optimizer steps done (1-based)
    optimizer.zero_grad()

deltatune's own loop does this; ``transformers.Trainer`` users add
:class:`deltatune.integrations.trainer_callback.DeltaStepCallback`. Hooks are made once per adapter and cached on
the model, so their state (importance averages) lives as long as the model.

A hook whose state must survive a restart also has ``state_dict() -> {key: tensor}`` and
``load_state_dict(tensors)``; :func:`step_hook_state` / :func:`load_step_hook_state` collect and restore
them for every adapter (keys ``<adapter>/<key>``), which resumable training checkpoints save beside the
optimizer state (:mod:`deltatune.train.resume`).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn

from .errors import CheckpointError
from .registry import get_method


class StepHook(Protocol):
    def before_optimizer_step(self) -> None: ...

    def after_optimizer_step(self, step: int) -> None: ...


def _delta_model(model: nn.Module) -> Any:
    """The :class:`~deltatune.model.DeltaModel` inside DDP / ``torch.compile`` wrappers (or ``None``)."""
    for attr in ("module", "_orig_mod"):
        while hasattr(model, attr) and not hasattr(model, "peft_config"):
            model = getattr(model, attr)
    return model if hasattr(model, "peft_config") else None


def _named_hooks(model: nn.Module, total_steps: int | None = None) -> list[tuple[str, StepHook]]:
    """``(adapter name, hook)`` of ``model``'s active trainable adapters whose method has a step hook."""
    delta = _delta_model(model)
    if delta is None:
        return []
    cache: dict[tuple[str, int], StepHook] = delta.__dict__.setdefault("_step_hooks", {})
    hooks = []
    for name in delta.active_adapters:
        config = delta.peft_config[name]
        spec = get_method(config)
        if spec.make_step_hook is None or config.inference_mode:
            continue
        key = (name, id(config))  # an adapter deleted and added again under its name gets a new hook
        if key not in cache:
            cache[key] = spec.make_step_hook(config, delta.get_base_model(), name)
        if total_steps is not None and hasattr(cache[key], "set_total_steps"):
            cache[key].set_total_steps(total_steps)
        hooks.append((name, cache[key]))
    return hooks


def step_hooks(model: nn.Module, total_steps: int | None = None) -> list[StepHook]:
    """The hooks of ``model``'s active trainable adapters (empty for methods without one).

    ``total_steps``, when given, is the number of optimizer steps the caller will run; hooks whose
    schedule needs it and was not told otherwise take it from here.
    """
    return [hook for _, hook in _named_hooks(model, total_steps)]


def step_hook_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state of every stateful hook of ``model``, as ``{"<adapter>/<key>": tensor}`` (CPU copies)."""
    out: dict[str, torch.Tensor] = {}
    for name, hook in _named_hooks(model):
        if hasattr(hook, "state_dict"):
            for key, tensor in hook.state_dict().items():
                out[f"{name}/{key}"] = tensor.detach().cpu().clone()
    return out


def load_step_hook_state(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Restore what :func:`step_hook_state` returned into ``model``'s hooks (made now if need be).

    Every stateful hook is given its part (empty when the saved state had none: the hook starts afresh,
    as it did before the step); keys for adapters without a stateful hook are an error, raised before any
    hook changes.
    """
    hooks = {name: hook for name, hook in _named_hooks(model) if hasattr(hook, "load_state_dict")}
    parts: dict[str, dict[str, torch.Tensor]] = {name: {} for name in hooks}
    for full_key, tensor in tensors.items():
        name, _, key = full_key.partition("/")
        if name not in parts:
            raise CheckpointError(f"The saved step-hook state names adapter {name!r}, which has no stateful step hook "
                                  f"in this model (adapters with one: {sorted(parts)}); resume with the original options.")
        parts[name][key] = tensor
    for name, hook in hooks.items():
        hook.load_state_dict(parts[name])


__all__ = ["StepHook", "load_step_hook_state", "step_hook_state", "step_hooks"]
