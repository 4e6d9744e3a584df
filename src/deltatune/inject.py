"""Put layer-method wrappers into a model and take them out again.

``inject_layers`` is the whole story for layer methods: for each target module,
``setattr(parent, child_name, spec.wrap(module, config, name, path))``. A module already
wrapped by the same method gains another adapter instead of a second wrapper.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from .config import DeltaConfig, TargetedConfig
from .errors import ConfigError, TargetError
from .layer import DeltaLayer
from .model_interface import structure_summary
from .modules_to_save import ModulesToSaveWrapper
from .registry import MethodSpec
from .targeting import ALL_LINEAR, find_parameter_targets, find_targets, name_matches, unwrapped


def iter_wrappers(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """(original module path, wrapper) for every deltatune wrapper, outermost first.

    Paths are those of the unwrapped model (``encoder.layer.0.attention.self.query``), also for
    wrappers nested inside another wrapper's ``base_layer``.
    """
    for name, child in model.named_children():
        path = f"{prefix}{name}"
        if getattr(child, "_delta_base_child", None):
            yield path, child
            yield from iter_wrappers_below(child, path)
        else:
            yield from iter_wrappers(child, path + ".")


def iter_wrappers_below(wrapper: nn.Module, path: str) -> Iterator[tuple[str, nn.Module]]:
    inner = getattr(wrapper, wrapper._delta_base_child)
    if getattr(inner, "_delta_base_child", None):
        yield path, inner
        yield from iter_wrappers_below(inner, path)
    else:
        yield from iter_wrappers(inner, path + ".")


def resolve_targets(model: nn.Module, spec: MethodSpec, config: TargetedConfig) -> list[str] | str:
    """The config's ``target_modules``, or the method's default for this architecture."""
    if config.target_modules is not None:
        return config.target_modules
    default = spec.default_targets(model, config) if spec.default_targets else None
    if default is None:
        mtype = getattr(getattr(model, "config", None), "model_type", None)
        raise ConfigError(
            f"{spec.name}: no default target modules for {type(model).__name__} (model_type={mtype!r}): "
            f"{structure_summary(model)}. Pass target_modules=[...] (module names or suffixes), a regex, or "
            "'all-linear', or describe the architecture once with deltatune.register_architecture(...)."
        )
    return default


def _refusals(spec: MethodSpec, config: TargetedConfig, targets: list) -> dict[str, str]:
    """``{path: reason}`` for targets ``spec`` cannot wrap with ``config`` (asked before anything changes)."""
    if spec.can_wrap is None:
        return {}
    reasons = {t.path: spec.can_wrap(t.module, config, t.path) for t in targets}
    return {path: reason for path, reason in reasons.items() if reason}


def inject_layers(model: nn.Module, spec: MethodSpec, config: TargetedConfig, name: str, protected: list[str]) -> list[str]:
    """Wrap every target of ``config`` with ``spec``'s layer; returns the wrapped module paths.

    Every target is checked (``spec.can_wrap``) before the first one is wrapped. If wrapping still
    fails half-way, the caller (:meth:`DeltaModel.add_adapter`) removes what was added.
    """
    if spec.prepare_config is not None:  # architecture-dependent defaults, recorded in the config
        spec.prepare_config(model, config)
    by_parameter = _parameter_targets(model, spec, config)
    if by_parameter and config.target_modules == []:  # HF peft's way of saying "parameters only"
        wrapped = _wrap_parameters(model, spec, config, name, by_parameter)
        if spec.finish_injection is not None:
            spec.finish_injection(model, config, name)
        return wrapped
    wanted = resolve_targets(model, spec, config)
    targets = find_targets(model, config, wanted, protected=protected)
    refused = _refusals(spec, config, targets)
    if refused and wanted != ALL_LINEAR:
        shown = [f"{path}: {reason}" for path, reason in list(refused.items())[:6]]
        raise TargetError(
            f"{spec.name} cannot wrap {len(refused)} of the target modules: {'; '.join(shown)}"
            f"{' ...' if len(refused) > 6 else ''}. Narrow target_modules, add exclude_modules, or change the option."
        )
    wrapped: list[str] = []
    unsupported: list[str] = []
    for target in targets:
        module = target.module
        if target.path in refused:
            continue
        if isinstance(module, DeltaLayer) and module.method_name == spec.name:
            module.add(name, config, target.path)
        else:
            layer = spec.wrap(module, config, name, target.path)
            if layer is None:
                unsupported.append(f"{target.path} ({type(unwrapped(module)).__name__})")
                continue
            setattr(target.parent, target.child_name, layer)
        wrapped.append(target.path)
    if unsupported and wanted != ALL_LINEAR:
        raise TargetError(
            f"{spec.name} cannot wrap these target modules: {unsupported[:8]}"
            f"{' ...' if len(unsupported) > 8 else ''}. Choose modules of a supported type "
            "(see the method's documentation) or narrow target_modules / add exclude_modules."
        )
    if not wrapped:
        raise TargetError(f"{spec.name}: none of the modules selected by target_modules={wanted!r} can be wrapped.")
    wrapped += _wrap_parameters(model, spec, config, name, by_parameter)
    if spec.finish_injection is not None:
        spec.finish_injection(model, config, name)
    return wrapped


def _parameter_targets(model: nn.Module, spec: MethodSpec, config: TargetedConfig) -> dict[str, list[str]]:
    """``{module path: parameter names}`` for the config's ``target_parameters`` (checked before any wrapping)."""
    wanted = getattr(config, "target_parameters", None)
    if not wanted:
        return {}
    if spec.make_parameter_layer is None:
        raise ConfigError(f"{spec.name} cannot target parameters; leave target_parameters empty.")
    return find_parameter_targets(model, list(wanted))


def _wrap_parameters(model: nn.Module, spec: MethodSpec, config: TargetedConfig, name: str,
                     by_parameter: dict[str, list[str]]) -> list[str]:
    modules = dict(model.named_modules())
    for path, params in by_parameter.items():
        parent_path, _, child = path.rpartition(".")
        layer = spec.make_parameter_layer(modules[path], config, name, path, params)  # type: ignore[misc]
        setattr(modules[parent_path], child, layer)
    return list(by_parameter)


def wrap_modules_to_save(model: nn.Module, names: list[str], adapter: str) -> list[str]:
    """Give adapter ``adapter`` a trainable copy of every module whose path matches ``names``."""
    found: list[str] = []
    modules = dict(model.named_modules())
    for path, module in list(modules.items()):
        if not path or not name_matches(path, names) or any(path.startswith(f + ".") for f in found):
            continue
        if isinstance(module, ModulesToSaveWrapper):
            wrapper = module
        elif any(path.startswith(p + ".") for p, m in modules.items() if isinstance(m, ModulesToSaveWrapper) and p):
            continue
        else:
            wrapper = ModulesToSaveWrapper(module)
            parent_path, _, child = path.rpartition(".")
            setattr(modules[parent_path], child, wrapper)
        wrapper.add(adapter)
        found.append(path)
    return found


def remove_adapter_everywhere(model: nn.Module, name: str) -> None:
    """Delete adapter ``name`` from every wrapper; unwrap wrappers left without adapters."""
    for _, wrapper in list(iter_wrappers(model)):
        wrapper.delete(name)
    unwrap(model, only_empty=True)


def unwrap(model: nn.Module, only_empty: bool = False, keep_trained_copy: bool = False) -> None:
    """Replace wrappers by the module they wrap (all of them, or only those with no adapters left).

    Nested wrappers (one method's layer around another's) are peeled one by one. With
    ``keep_trained_copy``, a modules-to-save wrapper is replaced by its active trained copy.
    """
    for name, child in list(model.named_children()):
        stripped = _strip(child, only_empty, keep_trained_copy)
        if stripped is not child:
            setattr(model, name, stripped)


def _strip(module: nn.Module, only_empty: bool, keep_trained_copy: bool) -> nn.Module:
    """``module`` with its (empty) wrappers peeled off; wrappers below a kept one are handled too."""
    while getattr(module, "_delta_base_child", None):
        inner = getattr(module, module._delta_base_child)
        if only_empty and module.adapter_names:
            stripped = _strip(inner, only_empty, keep_trained_copy)
            if stripped is not inner:
                setattr(module, module._delta_base_child, stripped)
            return module
        if keep_trained_copy and isinstance(module, ModulesToSaveWrapper) and module.active_adapter:
            module = module.modules_to_save[module.active_adapter]
        else:
            module = inner
    unwrap(module, only_empty, keep_trained_copy)
    return module


def head_paths(model: nn.Module, config: DeltaConfig, head_names: list[str]) -> list[str]:
    """Names for ``modules_to_save``: the config's plus task heads present in ``model``."""
    names = list(dict.fromkeys(config.modules_to_save or []))  # HF peft may list a head twice
    for head in head_names:
        if head not in names and any(p == head or p.endswith("." + head) for p, _ in model.named_modules()):
            names.append(head)
    return names
