"""While adapters are injected into a transformers model, that model's ``save_pretrained`` writes the adapter.

A :class:`~deltatune.model.DeltaModel` injects its layers into the model it wraps. People then pass either
object to transformers' ``Trainer`` or TRL: the DeltaModel (saved as a PEFT model: the adapter), or the
wrapped model itself, which the Trainer saves with ``model.save_pretrained(dir)``. transformers' own
``save_pretrained`` would write the full state dict of the injected model (``...q_proj.base_layer.weight``
plus adapter tensors); ``AutoModelForCausalLM.from_pretrained`` finds no ``q_proj.weight`` there and
initialises it at random, silently. (HF peft's injected model does the same.)

So, for the adapters' lifetime, the wrapped model's class is swapped for a subclass made here, of the same
name, whose only change is ``save_pretrained``: it calls the owning DeltaModel's ``save_pretrained``, which
writes the adapter folder in peft's format (``adapter_config.json``, ``adapter_model.safetensors``, model
card). ``isinstance`` checks, ``type(model).__name__``, ``_get_name()`` and every other method are those of the
original class. ``merge_and_unload()`` / ``unload()`` restore the original class (the model is plain again
and saves in full).

Only transformers models (``PreTrainedModel`` in the class's ancestry) are adopted; other modules keep their
class. This module imports neither transformers nor deltatune's core (only its errors).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any, SupportsIndex

from torch import nn

from ..errors import ConfigError

OWNER = "_deltatune_owner"  # instance attribute (not a submodule): the DeltaModel whose adapters are injected
#: ``save_pretrained`` keywords the Trainer and TRL pass that an adapter folder honours or ignores harmlessly.
HARMLESS = {"max_shard_size", "save_peft_format", "save_original_format", "token"}


def is_transformers_model(model: nn.Module) -> bool:
    return any(c.__name__ == "PreTrainedModel" and c.__module__.startswith("transformers.") for c in type(model).__mro__)


class SavesItsAdapter:
    """Mixin placed before a transformers model class: ``save_pretrained`` writes the injected adapters."""

    _deltatune_original_class: type[nn.Module]

    def save_pretrained(self, save_directory: str | Path, is_main_process: bool = True,
                        state_dict: dict[str, Any] | None = None, safe_serialization: bool = True,
                        **kwargs: Any) -> None:
        """Write the adapters injected in this model (as the DeltaModel's ``save_pretrained``), not the full model.

        To save the full model with the adapters merged in, call ``merge_and_unload()`` on the DeltaModel first.
        """
        unsupported = sorted(k for k, v in kwargs.items() if k not in HARMLESS and v not in (None, False))
        if unsupported:
            raise ConfigError(
                f"save_pretrained({', '.join(unsupported)}=...) is not supported on a model with deltatune adapters "
                "injected: it saves the adapter folder only. Drop those arguments, or call merge_and_unload() on the "
                "DeltaModel first to save a full model."
            )
        owner = self.__dict__[OWNER]
        owner.save_pretrained(save_directory, state_dict=state_dict, is_main_process=is_main_process,
                              safe_serialization=safe_serialization)

    def __reduce_ex__(self, protocol: SupportsIndex) -> tuple[Any, ...]:
        """Pickle (``torch.save(model)``) and copy by the original class, which pickle can find by name."""
        _, _, *rest = super().__reduce_ex__(protocol)
        return (new_adopted, (self._deltatune_original_class,), *rest)


@cache
def saving_class(cls: type[nn.Module]) -> type[nn.Module]:
    """A subclass of ``cls`` of the same name and module whose ``save_pretrained`` writes the adapters."""
    return type(cls.__name__, (SavesItsAdapter, cls), {"__module__": cls.__module__, "__qualname__": cls.__qualname__,
                                                       "__doc__": cls.__doc__, "_deltatune_original_class": cls})


def new_adopted(cls: type[nn.Module]) -> nn.Module:
    """An empty instance of ``saving_class(cls)`` (what unpickling and copying fill in)."""
    return object.__new__(saving_class(cls))


def adopt(model: nn.Module, owner: nn.Module) -> None:
    """Make ``model`` (a transformers model ``owner`` injected adapters into) save as ``owner``'s adapter."""
    if not is_transformers_model(model):
        return
    if not isinstance(model, SavesItsAdapter):
        model.__class__ = saving_class(type(model))
    object.__setattr__(model, OWNER, owner)  # a plain reference: not registered as a submodule


def release(model: nn.Module) -> None:
    """Undo :func:`adopt`: ``model`` has its own class (and full ``save_pretrained``) back."""
    if isinstance(model, SavesItsAdapter):
        model.__class__ = model._deltatune_original_class
    model.__dict__.pop(OWNER, None)
