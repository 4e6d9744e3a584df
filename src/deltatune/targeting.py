"""Pick the modules a layer method wraps. Pure: looks at the model, changes nothing.

Matching rules (HF peft's, so configs carry over):

* a list of names matches a module whose path equals a name or ends with ``"." + name``;
* a string is a regular expression that must match the whole module path;
* ``"all-linear"`` matches every linear layer except the output head and ``modules_to_save``.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator
from dataclasses import dataclass

from torch import nn

from .config import TargetedConfig
from .errors import TargetError
from .model_interface import is_linear_like, layer_index, output_head_paths
from .modules_to_save import ModulesToSaveWrapper
from .structure import original_modules, unwrapped

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


def unwrapped_modules(model: nn.Module) -> dict[str, nn.Module]:
    """``{path: original module}`` for every module of ``model`` under its original path (wrappers' adapter
    tensors left out). A wrapped module is listed once, under its own path, as the module it wraps."""
    return {p: m for p, m in original_modules(model).items() if p}


def _walk(model: nn.Module) -> Iterator[tuple[str, nn.Module, nn.Module, str]]:
    """``(original path, module there, the module holding it, its attribute name)`` for every module.

    Paths are those of the model before any wrapper. A wrapper is listed under the path of the module it
    wraps (so it can gain another adapter or be wrapped again), and the walk goes on inside the module it
    wraps, never into its adapter tensors: modules inside a wrapped block (a bottleneck adapter around a
    feed-forward block) stay targetable under their own paths.
    """

    def visit(holder: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Module, nn.Module, str]]:
        for name, child in holder.named_children():
            path = f"{prefix}{name}"
            yield path, child, holder, name
            yield from visit(unwrapped(child), path + ".")

    yield from visit(unwrapped(model), "")


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
    walk = list(_walk(model))
    # Modules trained in full (task heads) are never wrapped, nor is anything inside them.
    skip = {p for p, m, _, _ in walk if name_matches(p, protected) or isinstance(m, ModulesToSaveWrapper)}
    all_linear = target_modules == ALL_LINEAR
    if all_linear:
        skip |= output_head_paths(model)
    targets: list[Target] = []
    for path, module, parent, child in walk:
        if any(path == s or path.startswith(s + ".") for s in skip):
            continue
        selected = is_linear_like(unwrapped(module)) if all_linear else name_matches(path, target_modules)
        if not selected or name_matches(path, config.exclude_modules):
            continue
        if config.layers_to_transform is not None:
            index = layer_index(path, config.layers_pattern)
            if index is None or index not in config.layers_to_transform:
                continue
        targets.append(Target(path, module, parent, child))
    if not targets:
        raise TargetError(_nothing_matched_message(model, target_modules, config))
    return targets


def find_parameter_targets(model: nn.Module, wanted: list[str]) -> dict[str, list[str]]:
    """``{module path: [parameter names]}`` selected by ``wanted`` (HF peft's rule: the full name
    ``<module>.<param>`` equals an entry or ends with ``"." + entry``).

    Raises:
        TargetError: an entry names no parameter, or a parameter that is not 3-D (one weight per expert).
    """
    found: dict[str, list[str]] = {}
    matched: set[str] = set()
    three_d = []
    for path, module in original_modules(model).items():
        for pname, param in module.named_parameters(recurse=False):
            full = f"{path}.{pname}" if path else pname
            if param.dim() == 3:
                three_d.append(full)
            hits = [w for w in wanted if full == w or full.endswith("." + w)]
            if not hits:
                continue
            if param.dim() != 3:
                raise TargetError(
                    f"target_parameters entry {hits[0]!r} names {full}, a {param.dim()}-D parameter of shape "
                    f"{tuple(param.shape)}; target_parameters is for 3-D expert weights (E, out, in). Target the "
                    "module holding it with target_modules (linear layers), or train it in full with modules_to_save."
                )
            if not path:
                raise TargetError(f"target_parameters: {full} sits on the model itself; wrap a submodule's parameter.")
            found.setdefault(path, []).append(pname)
            matched.update(hits)
    missing = [w for w in wanted if w not in matched]
    if missing:
        shown = sorted({".".join(p.split(".")[-2:]) for p in three_d})
        raise TargetError(
            f"target_parameters entries {missing} name no parameter of {type(model).__name__}. Its 3-D expert "
            f"parameters are {shown or 'none (the model has no mixture-of-experts weights)'}; give their names "
            "(suffixes such as 'experts.gate_up_proj')."
        )
    return found


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
