"""HF peft's remaining user-facing names on a :class:`~deltatune.model.DeltaModel`, with peft's meaning.

What someone moving from peft types first and :mod:`deltatune.model` does not already provide:

* ``get_nb_trainable_parameters()``: ``(trainable, total)``, also when peft is not installed;
* ``disable_adapter_layers()`` / ``enable_adapter_layers()``: the switch behind ``with model.disable_adapter():``,
  left on until switched back (peft freezes the adapters while they are off and unfreezes the active ones after);
* ``set_requires_grad(adapter_names, requires_grad)``: (un)freeze adapters without changing which are active;
* ``peft_type`` and ``active_peft_config``: the active adapter's method and config;
* ``get_model_status()`` / ``get_layer_status()``: a summary of the adapters (peft's field names);
* module functions ``get_peft_model_state_dict`` / ``set_peft_model_state_dict``: one adapter's tensors under
  the keys of ``adapter_model.safetensors`` and back (for custom checkpointing), and
  ``prepare_model_for_kbit_training`` with peft's default (gradient checkpointing on).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import torch
from torch import nn

from .checkpoint.state import AdapterParts, apply_tensors, get_adapter_state_dict
from .inject import iter_wrappers
from .layer import DeltaLayer
from .weights import quantization


class HoldsAdapters(Protocol):
    """What the state-dict functions need of a :class:`~deltatune.model.DeltaModel`."""

    def adapter_parts(self, adapter_name: str) -> AdapterParts: ...


@dataclass(frozen=True)
class LayerStatus:
    """One wrapped module (peft's ``TunerLayerStatus`` fields that apply here)."""

    name: str  # module path in the wrapped model
    module_type: str
    enabled: bool
    active_adapters: list[str]
    merged_adapters: list[str]
    requires_grad: dict[str, bool | str]  # per adapter: True, False or "irregular" (some tensors only)
    available_adapters: list[str]


@dataclass(frozen=True)
class ModelStatus:
    """The whole model (peft's ``TunerModelStatus`` fields that apply here)."""

    base_model_type: str
    adapter_model_type: str
    peft_types: dict[str, str]
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: bool | str
    active_adapters: list[str]
    merged_adapters: list[str] | str
    requires_grad: dict[str, bool | str]
    available_adapters: list[str]


def _grad_state(params: list[nn.Parameter]) -> bool | str:
    flags = {p.requires_grad for p in params}
    return "irregular" if len(flags) > 1 else bool(flags.pop()) if flags else False


def _uniform(values: list[Any]) -> Any:
    """The one value all layers agree on, else ``"irregular"`` (peft's word)."""
    first = values[0] if values else None
    return first if all(v == first for v in values) else "irregular"


class PeftCompatMixin:
    """peft's switches and summaries for a model holding ``get_base_model()``, ``peft_config``, ``active_adapters``."""

    get_base_model: Callable[[], nn.Module]
    peft_config: dict[str, Any]
    active_adapters: list[str]

    def _check_known(self, name: str) -> None:  # provided by DeltaModel
        raise NotImplementedError

    def _refresh_trainable(self) -> None:  # provided by DeltaModel
        raise NotImplementedError

    def adapter_parameters(self, adapter_name: str) -> list[nn.Parameter]:  # provided by DeltaModel
        raise NotImplementedError

    def trainable_parameters(self) -> tuple[int, int]:  # provided by DeltaModel
        raise NotImplementedError

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, total)`` parameter counts, what ``print_trainable_parameters()`` prints (also without peft
        installed, when a DeltaModel does not inherit peft's method)."""
        return self.trainable_parameters()

    # -- switches --------------------------------------------------------------------------------
    def disable_adapter_layers(self) -> None:
        """Turn every adapter off until :meth:`enable_adapter_layers`: the model computes what the base model
        computes. Merged adapters are unmerged (at the next forward), and the adapters are frozen, as in peft."""
        for _, wrapper in iter_wrappers(self.get_base_model()):
            wrapper.disabled = True
        self._adapters_disabled = True
        for name in self.peft_config:
            for p in self.adapter_parameters(name):
                p.requires_grad_(False)

    def enable_adapter_layers(self) -> None:
        """Turn the adapters back on after :meth:`disable_adapter_layers`; the active ones train again."""
        for _, wrapper in iter_wrappers(self.get_base_model()):
            wrapper.disabled = False
        self._adapters_disabled = False
        self._refresh_trainable()

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        """Make the tensors of ``adapter_names`` trainable (or frozen) without changing which adapters are active."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for name in names:
            self._check_known(name)
        for name in names:
            for p in self.adapter_parameters(name):
                p.requires_grad_(requires_grad)

    # -- what is there ---------------------------------------------------------------------------
    @property
    def active_peft_config(self) -> Any:
        """The config of the (first) active adapter."""
        return self.peft_config[self.active_adapters[0]]

    @property
    def peft_type(self) -> str:
        """``peft_type`` of the (first) active adapter (``"LORA"``, ``"IA3"``, ...)."""
        return str(self.active_peft_config.peft_type)

    def get_layer_status(self) -> list[LayerStatus]:
        """One entry per wrapped module (layer methods and ``modules_to_save`` copies)."""
        out = []
        for path, wrapper in iter_wrappers(self.get_base_model()):
            names = list(wrapper.adapter_names)
            if isinstance(wrapper, DeltaLayer):
                active, merged = list(wrapper.active_adapters), list(wrapper.merged_adapters)
            else:
                active, merged = ([wrapper.active_adapter] if wrapper.active_adapter else []), []
            grads = {n: _grad_state(wrapper.adapter_parameters(n)) for n in names}
            out.append(LayerStatus(path, type(wrapper).__name__, not wrapper.disabled, active, merged, grads,
                                   sorted(names)))
        return out

    def get_model_status(self) -> ModelStatus:
        """Adapters, their methods, parameter counts and whether they are on, merged and trainable."""
        layers = [s for s in self.get_layer_status() if s.module_type != "ModulesToSaveWrapper"]
        unique = {id(p): p for p in self.parameters()}.values()  # type: ignore[attr-defined]
        merged = _uniform([sorted(s.merged_adapters) for s in layers]) if layers else []
        return ModelStatus(
            base_model_type=type(self.get_base_model()).__name__,
            adapter_model_type=type(self).__name__,
            peft_types={n: str(c.peft_type) for n, c in self.peft_config.items()},
            trainable_params=sum(p.numel() for p in unique if p.requires_grad),
            total_params=sum(p.numel() for p in unique),
            num_adapter_layers=len(layers),
            enabled=_uniform([s.enabled for s in layers]) if layers else not getattr(self, "_adapters_disabled", False),
            active_adapters=list(self.active_adapters),
            merged_adapters=merged,
            requires_grad={n: _grad_state(self.adapter_parameters(n)) for n in self.peft_config},
            available_adapters=sorted(self.peft_config),
        )


class LoadResult(NamedTuple):
    """What :func:`set_peft_model_state_dict` returns (peft's shape); both lists are empty, since a state dict
    that misses keys, has extra ones or mismatched shapes is refused with a :class:`CheckpointError`."""

    missing_keys: list[str]
    unexpected_keys: list[str]


def get_peft_model_state_dict(model: HoldsAdapters, state_dict: dict[str, torch.Tensor] | None = None,
                              adapter_name: str = "default", **_: Any) -> dict[str, torch.Tensor]:
    """Adapter ``adapter_name``'s tensors keyed as in HF peft's ``adapter_model.safetensors``.

    ``state_dict`` (peft's optional full state dict to pick from) is not supported: the model's own tensors are used.
    """
    if state_dict is not None:
        from .errors import ConfigError

        raise ConfigError("get_peft_model_state_dict(state_dict=...) is not supported; call it without state_dict "
                          "to get the adapter's current tensors.")
    return {k: v.detach() for k, v in get_adapter_state_dict(model.adapter_parts(adapter_name), adapter_name).items()}


def set_peft_model_state_dict(model: HoldsAdapters, peft_model_state_dict: dict[str, torch.Tensor],
                              adapter_name: str = "default", **_: Any) -> LoadResult:
    """Copy tensors keyed as in ``adapter_model.safetensors`` (from deltatune or HF peft) into adapter
    ``adapter_name``, after checking that every key and shape fits (refused otherwise, nothing changed)."""
    apply_tensors(model.adapter_parts(adapter_name), adapter_name, dict(peft_model_state_dict), "the state dict")
    return LoadResult([], [])


def prepare_model_for_kbit_training(model: nn.Module, use_gradient_checkpointing: bool = True,
                                    gradient_checkpointing_kwargs: dict | None = None) -> nn.Module:
    """HF peft's function of this name: :func:`deltatune.prepare_for_kbit_training`, with checkpointing on by
    default as in peft, and, as in peft, only for a model that holds quantized layers."""
    from .quant.convert import prepare_for_kbit_training

    quantized = any(quantization(m) is not None for m in model.modules())
    return prepare_for_kbit_training(model, use_gradient_checkpointing and quantized, gradient_checkpointing_kwargs)

