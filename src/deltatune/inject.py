"""Put layer-method wrappers into a model and take them out again.

``inject_layers`` is the whole story for layer methods: for each target module,
``setattr(parent, child_name, spec.make_layer(module, config, name, path))``. A module already
wrapped by the same method gains another adapter instead of a second wrapper.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from .config import DeltaConfig, TargetedConfig
from .errors import ConfigError, TargetError
from .layer import DeltaLayer
from .modules_to_save import ModulesToSaveWrapper
from .registry import MethodSpec
from .targeting import find_targets, name_matches, unwrapped


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
            f"{spec.name}: no default target modules for {type(model).__name__} (model_type={mtype!r}). "
            "Pass target_modules=[...] (module names or suffixes), a regex, or 'all-linear'."
        )
    return default


def inject_layers(model: nn.Module, spec: MethodSpec, config: TargetedConfig, name: str, protected: list[str]) -> list[str]:
    """Wrap every target of ``config`` with ``spec``'s layer; returns the wrapped module paths."""
    if spec.prepare_config is not None:
        spec.prepare_config(model, config)
    wanted = resolve_targets(model, spec, config)
    targets = find_targets(model, config, wanted, protected=protected)
    plan: list[tuple[object, DeltaLayer | None]] = []
    unsupported: list[str] = []
    for target in targets:
        module = target.module
        if isinstance(module, DeltaLayer) and module.method_name == spec.name:
            plan.append((target, None))
            continue
        layer = spec.make_layer(module, config, name, target.path)
        if layer is None:
            unsupported.append(f"{target.path} ({type(unwrapped(module)).__name__})")
        plan.append((target, layer))
    if unsupported and wanted != "all-linear":
        raise TargetError(
            f"{spec.name} cannot wrap these target modules: {unsupported[:8]}"
            f"{' ...' if len(unsupported) > 8 else ''}. Choose modules of a supported type "
            "(see the method's documentation) or narrow target_modules / add exclude_modules."
        )
    wrapped = []
    for target, layer in plan:
        if layer is None and isinstance(target.module, DeltaLayer) and target.module.method_name == spec.name:
            target.module.add(name, config, target.path)
        elif layer is not None:
            setattr(target.parent, target.child_name, layer)
        else:
            continue
        wrapped.append(target.path)
    return wrapped


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

    With ``keep_trained_copy``, a modules-to-save wrapper is replaced by its active trained copy.
    """
    for name, child in list(model.named_children()):
        if getattr(child, "_delta_base_child", None):
            if only_empty and child.adapter_names:
                unwrap(getattr(child, child._delta_base_child), only_empty, keep_trained_copy)
                continue
            replacement = getattr(child, child._delta_base_child)
            if keep_trained_copy and isinstance(child, ModulesToSaveWrapper) and child.active_adapter:
                replacement = child.modules_to_save[child.active_adapter]
            setattr(model, name, replacement)
            unwrap(model, only_empty, keep_trained_copy)  # the replacement may itself be a wrapper
            return
        unwrap(child, only_empty, keep_trained_copy)


def head_paths(model: nn.Module, config: DeltaConfig, head_names: list[str]) -> list[str]:
    """Names for ``modules_to_save``: the config's plus task heads present in ``model``."""
    names = list(config.modules_to_save or [])
    for head in head_names:
        if head not in names and any(p == head or p.endswith("." + head) for p, _ in model.named_modules()):
            names.append(head)
    return names
