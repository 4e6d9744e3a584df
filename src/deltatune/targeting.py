"""Pick the modules a layer method wraps. Pure: looks at the model, changes nothing.

Matching rules (HF peft's, so configs carry over):

* a list of names matches a module whose path equals a name or ends with ``"." + name``;
* a string is a regular expression that must match the whole module path;
* ``"all-linear"`` matches every linear layer except the output head and ``modules_to_save``.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

from torch import nn

from .config import TargetedConfig
from .errors import TargetError
from .model_interface import is_linear_like, layer_index, output_head_paths
from .modules_to_save import ModulesToSaveWrapper
from .structure import unwrapped

ALL_LINEAR = "all-linear"


@dataclass(frozen=True)
class Target:
    """One module to wrap: its dotted path, the module, and where it hangs in its parent."""

    path: str
    module: nn.Module
    parent: nn.Module
    child_name: str


def name_matches(path: str, spec: list[str] | str | None) -> bool:
    """Whether module ``path`` is selected by ``spec`` (list: exact or suffix; str: full regex)."""
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, path) is not None
    return any(path == name or path.endswith("." + name) for name in spec)


def pattern_value(path: str, patterns: dict[str, object] | None) -> object | None:
    """Value of the first key of ``patterns`` (a regex) that matches the end of ``path``."""
    for pattern, value in (patterns or {}).items():
        if re.fullmatch(rf"(.*\.)?(?:{pattern})", path):
            return value
    return None


def _is_inside_delta(path: str, delta_paths: list[str]) -> bool:
    """Inside a wrapper (its base module or adapter tensors); the wrapper itself may be targeted again."""
    return any(path.startswith(p + ".") for p in delta_paths)


def unwrapped_modules(model: nn.Module) -> dict[str, nn.Module]:
    """``{path: original module}`` for every module of ``model`` outside deltatune's wrappers' insides.

    A wrapped module is listed once, under its own path, as the module it wraps.
    """
    modules = dict(model.named_modules())
    delta_paths = [n for n, m in modules.items() if getattr(m, "_delta_base_child", None)]
    return {p: unwrapped(m) for p, m in modules.items() if p and not _is_inside_delta(p, delta_paths)}


def find_targets(
    model: nn.Module,
    config: TargetedConfig,
    target_modules: list[str] | str,
    protected: list[str] | None = None,
) -> list[Target]:
    """Modules of ``model`` selected by ``target_modules`` and the filters in ``config``.

    Args:
        model: the (possibly already wrapped) model.
        config: supplies ``exclude_modules``, ``layers_to_transform`` and ``layers_pattern``.
        target_modules: resolved target spec (the config's, or the method's default).
        protected: names (matched like ``target_modules`` lists: exact path or suffix) of modules never
            targeted, nor anything inside them (task heads trained in full, for instance).

    Raises:
        TargetError: when nothing matches; the message lists the closest existing module names.
    """
    modules = dict(model.named_modules())
    delta_paths = [n for n, m in modules.items() if getattr(m, "_delta_base_child", None)]
    # Modules trained in full (task heads) are never wrapped, nor is anything inside them.
    skip = {p for p, m in modules.items() if p and (name_matches(p, protected) or isinstance(m, ModulesToSaveWrapper))}
    all_linear = target_modules == ALL_LINEAR
    if all_linear:
        skip |= output_head_paths(model)
    targets: list[Target] = []
    for path, module in modules.items():
        if not path or _is_inside_delta(path, delta_paths) or any(path == s or path.startswith(s + ".") for s in skip):
            continue
        selected = is_linear_like(unwrapped(module)) if all_linear else name_matches(path, target_modules)
        if not selected or name_matches(path, config.exclude_modules):
            continue
        if config.layers_to_transform is not None:
            index = layer_index(path, config.layers_pattern)
            if index is None or index not in config.layers_to_transform:
                continue
        parent_path, _, child = path.rpartition(".")
        targets.append(Target(path, module, modules[parent_path], child))
    if not targets:
        raise TargetError(_nothing_matched_message(model, target_modules, config))
    return targets


def _nothing_matched_message(model: nn.Module, spec: list[str] | str, config: TargetedConfig) -> str:
    paths = [p for p, _ in model.named_modules() if p]
    suffixes = sorted({".".join(p.split(".")[-k:]) for p in paths for k in (1, 2)})
    wanted = [spec] if isinstance(spec, str) else list(spec)
    close = sorted({c for w in wanted for c in difflib.get_close_matches(w.split(".")[-1], suffixes, n=4, cutoff=0.5)})
    leaf_names = sorted({p.split(".")[-1] for p, m in model.named_modules() if p and not list(m.children())})
    hint = f" Closest existing names: {close}." if close else ""
    filters = []
    if config.exclude_modules:
        filters.append(f"exclude_modules={config.exclude_modules!r}")
    if config.layers_to_transform is not None:
        filters.append(f"layers_to_transform={config.layers_to_transform!r}")
    filt = f" (after filters {', '.join(filters)})" if filters else ""
    return (
        f"target_modules={spec!r} matched no module of {type(model).__name__}{filt}.{hint} "
        f"Leaf module names in this model: {leaf_names[:30]}{' ...' if len(leaf_names) > 30 else ''}. "
        "Give names (suffixes of module paths), a regex matching whole paths, or 'all-linear'."
    )
