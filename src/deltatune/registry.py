"""The method registry: the one place a method is looked up by name or ``peft_type``.

A method package calls :func:`register` at import time. The core never names a method; it asks
the registry for the :class:`MethodSpec` that belongs to a config and follows what it says.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from .config import DeltaConfig
from .errors import ConfigError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .layer import DeltaLayer


@dataclass(frozen=True)
class MethodSpec:
    """How the core drives one method.

    Attributes:
        name: registry and CLI key (``"lora"``).
        peft_type: value of ``peft_type`` in ``adapter_config.json`` (``"LORA"``).
        config_cls: the method's config dataclass.
        kind: ``"layer"`` methods wrap modules; ``"input"`` methods add vectors the model reads.
        make_layer: ``kind == "layer"``: ``make_layer(module, config, adapter_name, module_path)``
            returns a new :class:`~deltatune.layer.DeltaLayer` wrapping ``module`` or ``None`` when
            the method cannot wrap that module type. Needed only when the wrapper class depends on the
            module (LoRA's linear, embedding and convolution layers); otherwise give ``layer_cls``.
        layer_cls: ``kind == "layer"``: the one :class:`~deltatune.layer.DeltaLayer` class that wraps every
            module ``can_wrap`` accepts; :meth:`wrap` builds it with ``layer_cls.wrapping``.
        make_input: ``kind == "input"``: ``make_input(model, config, adapter_name)`` returns an
            :class:`~deltatune.input_delta.InputDelta` for ``model``.
        default_targets: ``default_targets(model, config)`` returns target names for an
            architecture when the user gave none (``None`` when the architecture is unknown).
        mergeable: whether the delta can be folded into the base weights.
        can_wrap: ``can_wrap(module, config, module_path)`` returns ``None`` when ``make_layer`` can wrap
            ``module`` with ``config``, else the reason it cannot. The core asks it for every target
            *before* wrapping anything, so a config that fails on one target leaves the model untouched.
        prepare_config: ``prepare_config(model, config)`` fills in, before injection, config fields whose
            defaults depend on the architecture (so ``adapter_config.json`` records them resolved).
        extra_trainable: ``extra_trainable(config, model)`` returns ``{path in model: parameter}`` for base
            tensors the adapter trains beyond its own (LoRA's ``bias="all"``); they are saved with it.
        shared_state: ``shared_state(config, model, adapter_name)`` returns ``{file key: tensor}`` for frozen
            tensors one adapter shares across all its layers and saves once, under a full key of the file
            (VeRA's random projections, ``base_model.vera_A``); loading copies the file's values into them.
        make_step_hook: ``make_step_hook(config, model, adapter_name)`` returns an object with
            ``before_optimizer_step()`` and ``after_optimizer_step(step)`` that training loops call around
            each optimizer step (see :mod:`deltatune.step_hooks`; AdaLoRA's rank budget).
        combine: ``combine(model, request)`` adds adapter ``request.name`` made from weighted existing adapters
            of this method (:mod:`deltatune.combination`); ``None``: the method's adapters cannot be combined.
        make_parameter_layer: ``make_parameter_layer(module, config, adapter_name, module_path, param_names)``
            wraps a module whose 3-D parameters the config's ``target_parameters`` names (mixture-of-experts
            weights; see :func:`~deltatune.targeting.find_parameter_targets`), or adds the adapter to its wrapper.
        finish_injection: ``finish_injection(model, config, adapter_name)`` runs after the targets are wrapped
            (LoRA wraps an output head tied to a wrapped input embedding). A wrapper whose weight another
            wrapper's merge writes sets ``merges_through`` to that wrapper; the tie check then lets it merge.
        loraplus_markers: name fragments (``".lora_B."``) of the tensors that LoRA+ (arXiv 2402.12354)
            trains with ``lr * loraplus_lr_ratio``; empty when the method has no such tensors.
    """

    name: str
    peft_type: str
    config_cls: type[DeltaConfig]
    kind: Literal["layer", "input"]
    make_layer: Callable[[nn.Module, DeltaConfig, str, str], DeltaLayer | None] | None = None
    layer_cls: type[DeltaLayer] | None = None
    make_input: Callable[..., nn.Module] | None = None
    default_targets: Callable[[nn.Module, DeltaConfig], list[str] | None] | None = None
    mergeable: bool = False
    can_wrap: Callable[[nn.Module, DeltaConfig, str], str | None] | None = None
    prepare_config: Callable[[nn.Module, DeltaConfig], None] | None = None
    extra_trainable: Callable[[DeltaConfig, nn.Module], dict[str, nn.Parameter]] | None = None
    loraplus_markers: tuple[str, ...] = ()
    shared_state: Callable[[DeltaConfig, nn.Module, str], dict[str, torch.Tensor]] | None = None
    make_step_hook: Callable[[DeltaConfig, nn.Module, str], Any] | None = None
    combine: Callable[[Any, Any], None] | None = None
    make_parameter_layer: Callable[[nn.Module, DeltaConfig, str, str, list[str]], DeltaLayer] | None = None
    finish_injection: Callable[[nn.Module, DeltaConfig, str], None] | None = None

    def wrap(self, module: nn.Module, config: DeltaConfig, adapter_name: str, module_path: str) -> DeltaLayer | None:
        """A new layer of this method wrapping ``module`` with adapter ``adapter_name``, or ``None`` when the
        method cannot wrap that module type (the core asks ``can_wrap`` first; see :attr:`make_layer`)."""
        if self.make_layer is not None:
            return self.make_layer(module, config, adapter_name, module_path)
        if self.can_wrap is not None and self.can_wrap(module, config, module_path) is not None:
            return None
        return self.layer_cls.wrapping(module, adapter_name, config, module_path)


_BY_NAME: dict[str, MethodSpec] = {}
_BY_PEFT_TYPE: dict[str, MethodSpec] = {}
_BY_CONFIG: dict[type, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    """Add ``spec`` to the registry (idempotent for the same spec)."""
    if spec.kind == "layer" and (spec.make_layer is None) == (spec.layer_cls is None):
        raise ValueError(f"layer method {spec.name!r} needs exactly one of make_layer and layer_cls")
    if spec.kind == "input" and spec.make_input is None:
        raise ValueError(f"input method {spec.name!r} needs make_input")
    _BY_NAME[spec.name] = spec
    _BY_PEFT_TYPE[spec.peft_type] = spec
    _BY_CONFIG[spec.config_cls] = spec
    return spec


def _ensure_builtin_methods() -> None:
    from . import methods  # noqa: F401  (importing registers the built-in methods)


def get_method(key: str | DeltaConfig | type) -> MethodSpec:
    """Look a method up by registry name, ``peft_type``, config instance or config class."""
    _ensure_builtin_methods()
    if isinstance(key, str):
        spec = _BY_NAME.get(key.lower()) or _BY_PEFT_TYPE.get(key.upper())
        if spec is None:
            raise ConfigError(
                f"Unknown method or peft_type {key!r}. Known methods: {sorted(_BY_NAME)} "
                f"(peft_type values {sorted(_BY_PEFT_TYPE)})."
            )
        return spec
    cls = key if isinstance(key, type) else type(key)
    for klass in cls.__mro__:
        if klass in _BY_CONFIG:
            return _BY_CONFIG[klass]
    raise ConfigError(f"{cls.__name__} is not the config of a registered method; known: {sorted(_BY_NAME)}.")


def as_delta_config(config: Any) -> DeltaConfig:
    """``config`` itself, or a deltatune config read from another library's config object.

    An HF peft config (``peft.LoraConfig(...)``, anything with ``peft_type`` and ``to_dict()``) becomes this
    library's config of that ``peft_type`` exactly as its ``adapter_config.json`` would be read: same fields,
    options deltatune does not implement named in a warning.
    """
    if isinstance(config, DeltaConfig):
        return config
    peft_type, to_dict = getattr(config, "peft_type", None), getattr(config, "to_dict", None)
    if peft_type is None or not callable(to_dict):
        raise ConfigError(f"{type(config).__name__} is not an adapter config; pass dt.LoraConfig(...) or another "
                          f"method's config (known methods: {sorted(_BY_NAME)}).")
    spec = get_method(str(getattr(peft_type, "value", peft_type)))
    return spec.config_cls.from_dict(dict(to_dict()))


def all_methods() -> list[MethodSpec]:
    """Every registered method, sorted by name."""
    _ensure_builtin_methods()
    return [_BY_NAME[k] for k in sorted(_BY_NAME)]
