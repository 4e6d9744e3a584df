"""``DeltaModel``: a frozen model plus named adapters, with HF peft's user-facing API.

The wrapper is thin: layer methods live inside the wrapped model (see :mod:`deltatune.inject`),
input methods in ``input_deltas``; this class routes calls, tracks which adapters are active,
and reads/writes adapter folders (:mod:`deltatune.adapter_files`).
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterator
from typing import Any

from torch import nn

from .adapter_files import AdapterFilesMixin, base_name_or_path
from .base_model_view import BaseModelView
from .config import DeltaConfig, TargetedConfig
from .errors import AdapterNotFoundError, ConfigError, MergeError
from .fingerprint import fingerprint_of, tensor_digests
from .inject import (
    head_paths,
    inject_layers,
    iter_wrappers,
    remove_adapter_everywhere,
    wrap_modules_to_save,
)
from .input_delta import InputDelta
from .integrations.adapter_saving import adopt
from .integrations.peft_identity import recognised_class
from .layer import DeltaLayer
from .merge_check import MergeReport
from .merging import MergingMixin
from .mixed_batch import mixed_forward, mixed_generate
from .model_interface import head_names
from .peft_compat import PeftCompatMixin
from .registry import as_delta_config, get_method
from .weights import param_numel


class DeltaModel(PeftCompatMixin, MergingMixin, AdapterFilesMixin, nn.Module):
    """A base model whose weights stay frozen, plus one or more named adapters.

    ``get_base_model()`` is the wrapped model (the adapters live inside it; peft's name for it, the one
    transformers' Trainer and TRL use). ``base_model`` has HF peft's tuner shape
    (:class:`~deltatune.base_model_view.BaseModelView`): its ``.model`` is the wrapped model, calling it
    calls the wrapped model, other attributes are the wrapped model's. Parameter names stay
    ``base_model.<path in the wrapped model>``. Attributes a DeltaModel lacks are read from the wrapped model.

    When HF peft is installed, instances are also ``peft.PeftModel`` instances, so transformers' Trainer,
    TRL and accelerate treat them as PEFT models (see :mod:`deltatune.integrations.peft_identity`).

    Args:
        model: any ``torch.nn.Module`` (a transformers model or a plain one).
        config: the first adapter's config (``dt.LoraConfig(...)`` etc.).
        adapter_name: its name (``"default"``).
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> DeltaModel:  # noqa: PYI034 (an instance of a subclass)
        return nn.Module.__new__(recognised_class(cls))

    def __init__(self, model: nn.Module, config: DeltaConfig, adapter_name: str = "default") -> None:
        if isinstance(model, DeltaModel) or next(iter_wrappers(model), None) is not None:
            raise ConfigError(
                f"This {'is a DeltaModel' if isinstance(model, DeltaModel) else 'model holds adapters'} already; "
                "wrapping it again would nest adapters inside adapters. Add another adapter with "
                "model.add_adapter(name, config) on the DeltaModel, or take the plain model back with "
                "merge_and_unload() or unload() first."
            )
        nn.Module.__init__(self)  # never PeftModel.__init__: this class is its own tuner
        self.base_model = model  # registered as a submodule; reading ``self.base_model`` gives the view
        self.peft_config: dict[str, DeltaConfig] = {}
        self.input_deltas = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.saved_module_paths: dict[str, list[str]] = {}  # per adapter: heads it trains in full
        self.merge_report: MergeReport | None = None  # set by verify_merge / merge_and_unload
        requires_grad = [(p, p.requires_grad) for p in model.parameters()]
        for p, _ in requires_grad:
            p.requires_grad_(False)
        try:
            self.add_adapter(adapter_name, config)
        except BaseException:
            for p, flag in requires_grad:  # hand the caller's model back as it was
                p.requires_grad_(flag)
            raise
        self.set_adapter(adapter_name)
        adopt(model, self)  # a transformers model now saves as this adapter (see integrations.adapter_saving)
        # Taken once, before any training or merge; every saved adapter records a fingerprint made from it.
        self.base_digests = tensor_digests(model)

    def __getattr__(self, name: str) -> Any:
        try:
            return nn.Module.__getattr__(self, name)
        except AttributeError:
            if name in {"base_model", "input_deltas", "_modules"}:
                raise
            return getattr(self.get_base_model(), name)

    def get_base_model(self) -> nn.Module:
        """The wrapped model, adapters inside (HF peft's name; what Trainer and TRL inspect and patch)."""
        return self._modules["base_model"]

    @property
    def base_model(self) -> BaseModelView:  # type: ignore[override]
        """HF peft's tuner shape over the wrapped model (``base_model.model`` is it); see :mod:`.base_model_view`."""
        model = self._modules["base_model"]
        view = self.__dict__.get("_base_model_view")
        if view is None or view.model is not model:
            view = BaseModelView(model)
            self.__dict__["_base_model_view"] = view
        return view

    def get_submodule(self, target: str) -> nn.Module:
        """torch's lookup by module-tree path (``named_modules()`` names: ``base_model.<path in the wrapped
        model>``); torch walks attributes, which would enter the :attr:`base_model` view. ``get_parameter`` and
        ``get_buffer`` use this too."""
        head, _, rest = target.partition(".")
        if head != "base_model":
            return nn.Module.get_submodule(self, target)
        model = self.get_base_model()
        return model.get_submodule(rest) if rest else model

    def set_submodule(self, target: str, module: nn.Module, strict: bool = False) -> None:
        """torch's replacement by module-tree path, entering the wrapped model as :meth:`get_submodule` does."""
        head, _, rest = target.partition(".")
        if head != "base_model" or not rest:
            return nn.Module.set_submodule(self, target, module, strict)
        self.get_base_model().set_submodule(rest, module, strict)

    # -- adapters --------------------------------------------------------------------------------
    def base_fingerprint(self, adapter_name: str) -> dict[str, Any]:
        """Fingerprint of the base model as it was when this DeltaModel was created, leaving out the
        modules adapter ``adapter_name`` trains in full (its task head, new at every load)."""
        return fingerprint_of(self.get_base_model(), self.base_digests, self.saved_module_paths.get(adapter_name, []))

    @property
    def active_adapter(self) -> str:
        """The first active adapter's name (HF peft's attribute)."""
        return self.active_adapters[0] if self.active_adapters else ""

    def add_adapter(self, adapter_name: str, config: DeltaConfig) -> None:
        """Add a new adapter (not active until :meth:`set_adapter`; the first one is).

        All or nothing: if any part fails (a target the method cannot wrap, say), whatever was
        already added for this adapter is removed again and the error is raised.
        """
        if adapter_name in self.peft_config:
            raise ConfigError(f"An adapter named {adapter_name!r} exists already; delete it or pick another name.")
        if not adapter_name or any(c in adapter_name for c in "./\\"):
            raise ConfigError(
                f"Adapter name {adapter_name!r} must be non-empty and contain no '.', '/' or '\\' (it becomes a "
                "parameter name and, when saved, a folder name)."
            )
        config = copy.deepcopy(as_delta_config(config))  # an HF peft config is read as its adapter_config.json
        spec = get_method(config)
        if config.base_model_name_or_path is None:
            config.base_model_name_or_path = base_name_or_path(self.get_base_model())
        saved = head_paths(self.get_base_model(), config, head_names(config.task_type))
        config.modules_to_save = saved or None
        try:
            if spec.kind == "layer":
                assert isinstance(config, TargetedConfig)
                inject_layers(self.get_base_model(), spec, config, adapter_name, protected=saved)
            else:
                self.input_deltas[adapter_name] = spec.make_input(self.get_base_model(), config, adapter_name)
            saved_paths = wrap_modules_to_save(self.get_base_model(), saved, adapter_name) if saved else []
        except BaseException:
            remove_adapter_everywhere(self.get_base_model(), adapter_name)
            if adapter_name in self.input_deltas:
                del self.input_deltas[adapter_name]
            raise
        self.saved_module_paths[adapter_name] = sorted(saved_paths)
        self.peft_config[adapter_name] = config
        self._refresh_trainable()

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        """Make one adapter (or several, for layer methods) active; only active adapters train."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        for name in names:
            self._check_known(name)
        self.active_adapters = names
        unmerged = False
        for _, wrapper in iter_wrappers(self.get_base_model()):
            if isinstance(wrapper, DeltaLayer) and set(wrapper.merged_adapters) - set(names):
                wrapper.unmerge()  # a merged adapter that is no longer active must stop acting
                unmerged = True
            wrapper.set_active(names)
        if unmerged:
            warnings.warn("set_adapter: adapters merged into the base weights were unmerged, since they are no "
                          "longer active; call merge_adapter() again to merge the new ones.", stacklevel=2)
        self._refresh_trainable()

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter. Refused while it is merged, so the base weights come back exactly."""
        self._check_known(adapter_name)
        merged = [p for p, w in iter_wrappers(self.get_base_model()) if adapter_name in getattr(w, "merged_adapters", [])]
        if merged:
            raise MergeError(
                f"Adapter {adapter_name!r} is merged into {len(merged)} layers (e.g. {merged[0]}); "
                "call unmerge_adapter() first."
            )
        remove_adapter_everywhere(self.get_base_model(), adapter_name)
        if adapter_name in self.input_deltas:
            del self.input_deltas[adapter_name]
        del self.peft_config[adapter_name]
        self.saved_module_paths.pop(adapter_name, None)
        remaining = [n for n in self.active_adapters if n != adapter_name]
        if not remaining and self.peft_config:
            remaining = [next(iter(self.peft_config))]
        self.set_adapter(remaining) if remaining else None

    def _check_known(self, name: str) -> None:
        if name not in self.peft_config:
            raise AdapterNotFoundError(f"No adapter named {name!r}; this model has {list(self.peft_config)}.")

    def _refresh_trainable(self) -> None:
        """Only the active adapters' tensors (and their modules_to_save copies) train."""
        for p in self.parameters():
            p.requires_grad_(False)
        for name in self.active_adapters:
            if self.peft_config[name].inference_mode:
                continue
            for p in self.adapter_parameters(name):
                p.requires_grad_(True)

    def adapter_parameters(self, adapter_name: str) -> list[nn.Parameter]:
        """Every trainable tensor of adapter ``adapter_name`` (layers, input delta, modules_to_save)."""
        params: list[nn.Parameter] = []
        for _, wrapper in iter_wrappers(self.get_base_model()):
            params.extend(wrapper.adapter_parameters(adapter_name))
        if adapter_name in self.input_deltas:
            params.extend(self.input_deltas[adapter_name].parameters())
        spec = get_method(self.peft_config[adapter_name])
        if spec.extra_trainable is not None:
            params.extend(spec.extra_trainable(self.peft_config[adapter_name], self.get_base_model()).values())
        return list({id(p): p for p in params}.values())

    # -- counting --------------------------------------------------------------------------------
    def trainable_parameters(self) -> tuple[int, int]:
        """(trainable, total) parameter counts; shared tensors count once, a quantized weight as the values
        it stands for (a packed 4-bit tensor holds two per element)."""
        unique = {id(p): p for p in self.parameters()}.values()
        return sum(p.numel() for p in unique if p.requires_grad), sum(param_numel(p) for p in unique)

    def print_trainable_parameters(self) -> None:
        trainable, total = self.trainable_parameters()
        print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")

    # -- calling the model ----------------------------------------------------------------------
    def _active_input_delta(self) -> InputDelta | None:
        if getattr(self, "_adapters_disabled", False):
            return None
        active = [name for name in self.active_adapters if name in self.input_deltas]
        if len(active) > 1:
            raise ConfigError(
                f"Input-method adapters {active} are all active; a model call can prepend only one. Pass "
                "adapter_names=[...] (one adapter per example) or set_adapter() one of them."
            )
        return self.input_deltas[active[0]] if active else None

    def forward(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        """The wrapped model's forward with the active adapters; with ``adapter_names`` (one name per
        example, ``"__base__"`` for none) every example uses its own adapter (:mod:`.mixed_batch`)."""
        if adapter_names is not None:
            return mixed_forward(self, adapter_names, args, kwargs)
        delta = self._active_input_delta()
        if delta is None:
            return self.get_base_model()(*args, **kwargs)
        return delta.run(self.get_base_model(), args, kwargs)

    def generate(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        """``base_model.generate`` with the active adapters (or, with ``adapter_names``, each example's
        own adapter) in place at every decoding step."""
        if args:
            kwargs["input_ids"] = args[0]
        if adapter_names is not None:
            return mixed_generate(self, adapter_names, kwargs)
        delta = self._active_input_delta()
        if delta is None:
            return self.get_base_model().generate(**kwargs)
        return delta.generate(self.get_base_model(), kwargs)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Inside, the model computes exactly what the base model computes.

        Merged adapters are unmerged on entry and merged again on exit. (Base tensors an adapter
        trains in place, such as biases with ``bias="all"``, cannot be switched off.)
        """
        wrappers = [w for _, w in iter_wrappers(self.get_base_model())]
        merged = [(w, list(w.merged_adapters)) for w in wrappers if isinstance(w, DeltaLayer) and w.merged_adapters]
        for w, _ in merged:
            w.unmerge()
        for w in wrappers:
            w.disabled = True
        self._adapters_disabled = True
        try:
            yield
        finally:
            for w in wrappers:
                w.disabled = False
            self._adapters_disabled = False
            for w, names in merged:
                w.merge(names)

    # -- combining -------------------------------------------------------------------------------
    def add_weighted_adapter(
        self,
        adapters: list[str],
        weights: list[float],
        adapter_name: str,
        combination_type: str = "svd",
        svd_rank: int | None = None,
        density: float | None = None,
        majority_sign_method: str = "total",
        seed: int = 0,
    ) -> None:
        """Add adapter ``adapter_name`` made from ``adapters`` weighted by ``weights`` (HF peft's call).

        For LoRA, ``"svd"`` (the default, with ``svd_rank=None``) and ``"cat"`` give exactly
        ``sum_i w_i dW_i``; ``"svd"`` with a smaller ``svd_rank`` gives its best approximation of that
        rank, computed from the factors (never a full ``out x in`` matrix). ``"linear"``, ``"ties"``,
        ``"dare_linear"``, ``"dare_ties"`` and ``"magnitude_prune"`` combine the ``A`` and the ``B`` factors
        separately, as HF peft does (not the weighted sum of the deltas). (IA)^3 supports ``"linear"``. See
        ``docs/methods.md``, "Adapter arithmetic". The new adapter is not activated.
        """
        from .combination import CombineRequest, combine

        request = CombineRequest(list(adapters), [float(w) for w in weights], adapter_name, combination_type,
                                 svd_rank, density, majority_sign_method, seed)
        combine(self, request)


def get_delta_model(model: nn.Module, config: DeltaConfig, adapter_name: str = "default") -> DeltaModel:
    """Freeze ``model`` and add a trainable adapter described by ``config``; returns a :class:`DeltaModel`."""
    return DeltaModel(model, config, adapter_name)

