"""Input methods: trainable vectors the frozen model reads (virtual tokens, key/value prefixes).

An input method supplies an :class:`InputDelta`. :class:`~deltatune.model.DeltaModel` hands it
the model call (``forward`` and ``generate``) while its adapter is active; the method edits the
inputs (prepends embeddings, extends the attention mask, passes a prefix cache ...) and calls
the frozen model. The core knows nothing more about what the method does.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn


class InputDelta(nn.Module):
    """Base class of the trainable part of an input method (one instance per adapter)."""

    method_name: ClassVar[str] = "this method"

    def run(self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Call ``model(*args, **kwargs)`` with this delta's vectors in place."""
        raise NotImplementedError

    def generate(self, model: nn.Module, kwargs: dict[str, Any]) -> Any:
        """Call ``model.generate(**kwargs)`` with this delta's vectors present at every step."""
        raise NotImplementedError

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """Tensors to save, keyed exactly as in HF peft's files (``"prompt_embeddings"``)."""
        raise NotImplementedError

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        own = self.adapter_state()
        with torch.no_grad():
            for key, tensor in state.items():
                own[key].copy_(tensor.to(own[key].dtype))
