"""What ``DeltaModel.base_model`` is: HF peft's tuner shape over the wrapped model.

In HF peft, ``peft_model.base_model`` is a tuner (``LoraModel`` ...) whose ``.model`` is the wrapped
transformers model; calling the tuner calls that model, and the tuner forwards attribute reads to it.
transformers and TRL rely on that shape. The Trainer, for one, decides whether label smoothing shifts the
labels by the class name of ``unwrapped_model.base_model.model`` for a PEFT model: only a ``*ForCausalLM``
name gets shifted labels. If ``base_model`` were the wrapped model itself, ``.model`` would be its backbone
(``LlamaModel``) and the smoothed loss would compare each position with its own token instead of the next.

A DeltaModel registers the wrapped model under the name ``base_model`` (so its parameter names stay
``base_model.<path in the model>``) and hands out this view when ``.base_model`` is read:

* ``view.model`` is the wrapped model (as peft's ``base_model.model``; its backbone is then
  ``view.model.model`` for a Llama, as in peft);
* ``view(...)`` calls the wrapped model;
* every other attribute is the wrapped model's, so ``view.named_modules()``, ``view.config``,
  ``view.generate`` ... are the wrapped model's (paths relative to it), and setting one sets it there.

The view is not an ``nn.Module``: code that needs the module itself uses ``DeltaModel.get_base_model()``.
"""

from __future__ import annotations

from typing import Any

from torch import nn


class BaseModelView:
    """peft's ``PeftModel.base_model`` shape over ``model``: ``.model`` is it, calls and attributes go to it."""

    __slots__ = ("model",)

    def __init__(self, model: nn.Module) -> None:
        object.__setattr__(self, "model", model)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:  # only for names the view itself lacks ("model" is a slot)
        return getattr(self.model, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.model, name, value)

    def __delattr__(self, name: str) -> None:
        delattr(self.model, name)

    def __reduce__(self) -> tuple[type[BaseModelView], tuple[nn.Module]]:  # copy/deepcopy/pickle: a view of the copy
        return BaseModelView, (self.model,)

    def __repr__(self) -> str:
        return f"BaseModelView({type(self.model).__name__})"
