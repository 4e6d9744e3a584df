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
"""

from __future__ import annotations

from typing import Any, Protocol

from torch import nn

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


def step_hooks(model: nn.Module, total_steps: int | None = None) -> list[StepHook]:
    """The hooks of ``model``'s active trainable adapters (empty for methods without one).

    ``total_steps``, when given, is the number of optimizer steps the caller will run; hooks whose
    schedule needs it and was not told otherwise take it from here.
    """
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
            cache[key] = spec.make_step_hook(config, delta.base_model, name)
        if total_steps is not None and hasattr(cache[key], "set_total_steps"):
            cache[key].set_total_steps(total_steps)
        hooks.append(cache[key])
    return hooks


__all__ = ["StepHook", "step_hooks"]
