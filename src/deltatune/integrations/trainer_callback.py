"""``transformers.Trainer`` glue: run deltatune's per-step method hooks (AdaLoRA's rank budget) in a Trainer.

    from deltatune.integrations.trainer_callback import DeltaStepCallback
    trainer = Trainer(model=delta_model, args=args, train_dataset=ds, callbacks=[DeltaStepCallback()])

Before each optimizer step (gradients clipped by then) the hooks add their gradient terms; after it
(gradients still present) they update their state with ``state.global_step + 1``, the optimizer
steps done. ``args.max_steps`` (the Trainer's computed total) fills an unset ``total_step``.
deltatune's core never imports this module.
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from ..step_hooks import step_hooks


class DeltaStepCallback(TrainerCallback):
    """Calls :func:`deltatune.step_hooks.step_hooks`' ``before_/after_optimizer_step`` from the Trainer's events."""

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if model is not None and state.max_steps and state.max_steps > 0:
            step_hooks(model, state.max_steps)

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        for hook in step_hooks(model) if model is not None else []:
            hook.before_optimizer_step()

    def on_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        for hook in step_hooks(model) if model is not None else []:
            hook.after_optimizer_step(state.global_step + 1)


__all__ = ["DeltaStepCallback"]
