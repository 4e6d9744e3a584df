"""Input methods: trainable vectors the frozen model reads (virtual tokens, key/value prefixes).

An input method supplies an :class:`InputDelta`. :class:`~deltatune.model.DeltaModel` hands it
the model call (``forward`` and ``generate``) while its adapter is active; the method edits the
inputs (prepends embeddings, extends the attention mask, passes a prefix cache ...) and calls
the frozen model. The core knows nothing more about what the method does.
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar

import torch
from torch import nn

from .errors import ConfigError
from .routing import Routing


class InputDelta(nn.Module):
    """Base class of the trainable part of an input method (one instance per adapter).

    Attributes:
        method_name: the method's registry name, for error messages.
        file_key_prefix: prefix of the ``modules_to_save`` keys (a task head) in the adapter file.
            HF peft keeps the model of an input method directly under ``base_model.``
            (``base_model.classifier.weight``), not under ``base_model.model.`` as for layer methods.
    """

    method_name: ClassVar[str] = "this method"
    file_key_prefix: ClassVar[str] = "base_model."

    def run(self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Call ``model(*args, **kwargs)`` with this delta's vectors in place."""
        raise NotImplementedError

    def generate(self, model: nn.Module, kwargs: dict[str, Any]) -> Any:
        """Call ``model.generate(**kwargs)`` with this delta's vectors present at every step."""
        raise NotImplementedError

    @classmethod
    def run_routed(cls, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], routing: Routing,
                   deltas: dict[str, InputDelta]) -> Any:
        """Call ``model`` on a mixed batch: rows of an adapter in ``deltas`` get its vectors, others none
        (their layer deltas, if any, are applied by the layers through ``routing``)."""
        raise ConfigError(f"{cls.method_name} adapters cannot be used in a mixed-adapter batch (adapter_names).")

    @classmethod
    def generate_routed(cls, model: nn.Module, kwargs: dict[str, Any], routing: Routing,
                        deltas: dict[str, InputDelta]) -> Any:
        """``model.generate`` on a mixed batch (see :meth:`run_routed`)."""
        raise ConfigError(f"{cls.method_name} adapters cannot be used in a mixed-adapter batch (adapter_names).")

    def leading_positions(self) -> int:
        """Positions this adapter puts in front of a decoder-only model's input in a mixed batch
        (virtual tokens, a key/value prefix): ``P_b`` of its rows in :func:`deltatune.mixed_batch.leading_mask`."""
        return 0

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """Tensors to save, keyed exactly as in HF peft's files (``"prompt_embeddings"``)."""
        raise NotImplementedError

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        own = self.adapter_state()
        with torch.no_grad():
            for key, tensor in state.items():
                own[key].copy_(tensor.to(own[key].dtype))


def bind_call(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """``model(*args, **kwargs)`` as keyword arguments only, named after ``model.forward``'s parameters.

    Input methods rewrite inputs by name (``input_ids``, ``attention_mask`` ...), so positional
    arguments are first given the names they bind to.
    """
    call = dict(kwargs)
    if not args:
        return call
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    names = [n for n, p in inspect.signature(model.forward).parameters.items() if p.kind in kinds]
    if len(args) > len(names):
        raise ConfigError(
            f"{type(model).__name__}.forward takes {len(names)} positional arguments but got {len(args)}; "
            "pass the inputs by keyword (input_ids=..., attention_mask=...)."
        )
    for name, value in zip(names, args):
        if name in call:
            raise ConfigError(f"{name!r} was given both positionally and by keyword; pass it once.")
        call[name] = value
    return call
