"""Make a :class:`~deltatune.model.DeltaModel` the kind of object transformers, TRL and accelerate treat as a PEFT model.

Those tools ask one question, ``isinstance(model, peft.PeftModel)``, and with a "yes" they:

* keep the dataset columns named in ``model.get_base_model().forward``'s signature (``remove_unused_columns``),
* save with ``model.save_pretrained(dir, state_dict=..., is_main_process=...)``: the adapter only,
* resume with ``model.load_adapter(checkpoint, name, is_trainable=True)`` into the adapter that exists,
* put TRL's fused LM head on ``model.get_base_model()`` (the wrapped transformers model, whose
  ``base_model`` is the backbone TRL calls), and call ``enable_input_require_grads()`` for gradient
  checkpointing,
* use ``model.disable_adapter()`` as the reference model of DPO.

When peft is installed, every DeltaModel is therefore an instance of a subclass ``(DeltaModel, PeftModel)``
made here (importing peft for it costs seconds the first time; inside :func:`without_peft_identity`, which
the ``deltatune`` command uses since its models never meet those tools, DeltaModels keep their own class). DeltaModel's own methods come first in that order, and DeltaModel never runs
``PeftModel.__init__``; the PeftModel names that would otherwise leak through (properties reading peft's
internal tuner) are given DeltaModel's meaning in :data:`DELTA_OWNED`. Without peft the plain class is used
and nothing here is imported.

This module imports nothing from deltatune, so the core can use it without an import circle.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator
from functools import cache
from typing import Any, SupportsIndex

from torch import nn

#: PeftModel class attributes that must not shadow what a DeltaModel keeps in its instance dict
#: (``peft_config``, ``active_adapters`` are plain attributes of a DeltaModel; the others read peft's tuner).
DELTA_OWNED = ("peft_config", "active_adapters", "modules_to_save", "has_active_enabled_adapter",
               "base_model_torch_dtype", "active_peft_config")


_identity_wanted = [True]  # a one-element stack top: False inside without_peft_identity()


def peft_installed() -> bool:
    return importlib.util.find_spec("peft") is not None


@contextlib.contextmanager
def without_peft_identity() -> Iterator[None]:
    """DeltaModels built inside are not ``peft.PeftModel`` instances, and peft is not imported for them.

    For code whose models never reach transformers' Trainer, TRL or accelerate (the ``deltatune`` command):
    it saves the peft import. Everything else a DeltaModel does is the same.
    """
    _identity_wanted.append(False)
    try:
        yield
    finally:
        _identity_wanted.pop()


def recognised_class(cls: type[nn.Module]) -> type[nn.Module]:
    """``cls`` itself without peft (or inside :func:`without_peft_identity`); with peft, a subclass of
    ``(cls, peft.PeftModel)`` of the same name."""
    if not _identity_wanted[-1] or not peft_installed():
        return cls
    return _peft_subclass(cls)


@cache
def _peft_subclass(cls: type[nn.Module]) -> type[nn.Module]:
    from peft import PeftModel

    if issubclass(cls, PeftModel):
        return cls
    owned = {name: None for name in DELTA_OWNED if not any(name in vars(k) for k in cls.__mro__)}
    return type(cls.__name__, (cls, PeftModel), {"__module__": cls.__module__, "__qualname__": cls.__qualname__,
                                                 "__doc__": cls.__doc__, "_deltatune_plain_class": cls,
                                                 "__reduce_ex__": _reduce_by_plain_class, **owned})


def _reduce_by_plain_class(self: nn.Module, protocol: SupportsIndex) -> tuple[Any, ...]:
    """Pickle (``torch.save(model)``) and copy by the plain class, which pickle can find by name; unpickled
    where peft is installed, the instance is recognised again."""
    _, _, *rest = object.__reduce_ex__(self, protocol)
    return (new_recognised, (type(self)._deltatune_plain_class,), *rest)


def new_recognised(cls: type[nn.Module]) -> nn.Module:
    """An empty instance of ``recognised_class(cls)`` (what unpickling and copying fill in)."""
    return nn.Module.__new__(recognised_class(cls))
