"""``DeltaModel.add_weighted_adapter``: a new adapter made from weighted existing ones.

The core checks what every combination needs (known adapters, one method, weights that fit, at most
one trained task head among them) and hands the work to the method's ``MethodSpec.combine``; a
method without one cannot be combined and says so. What each ``combination_type`` computes is the
method's business (see ``docs/methods.md``, "Adapter arithmetic").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .errors import ConfigError
from .registry import all_methods, get_method

COMBINATION_TYPES = ("svd", "cat", "linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")


@dataclass(frozen=True)
class CombineRequest:
    """What to combine and how; handed to ``MethodSpec.combine(model, request)``.

    Attributes:
        adapters / weights: the source adapters and their weights (negative weights subtract).
        name: the new adapter's name.
        combination_type: one of :data:`COMBINATION_TYPES` the method supports.
        rank: the new adapter's rank where the type produces one (``svd``: ``None`` = exact).
        density: share of entries kept by ``ties``, ``dare_*`` and ``magnitude_prune``.
        majority_sign_method: ``"total"`` or ``"frequency"`` (TIES sign election).
        seed: seed of DARE's random drops.
    """

    adapters: list[str]
    weights: list[float]
    name: str
    combination_type: str
    rank: int | None = None
    density: float | None = None
    majority_sign_method: str = "total"
    seed: int = 0

    def generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed)


def check_request(model: Any, request: CombineRequest) -> Any:
    """Refuse what no method can combine; returns the adapters' :class:`~deltatune.registry.MethodSpec`."""
    if request.name in model.peft_config:
        raise ConfigError(f"An adapter named {request.name!r} exists already; pick a new name for the combination.")
    if not request.adapters:
        raise ConfigError("add_weighted_adapter needs at least one adapter to combine.")
    for name in request.adapters:
        model._check_known(name)
    if len(request.weights) != len(request.adapters) or not all(math.isfinite(w) for w in request.weights):
        raise ConfigError(f"Give one finite weight per adapter: {len(request.adapters)} adapters, weights {request.weights}.")
    if request.combination_type not in COMBINATION_TYPES:
        raise ConfigError(f"combination_type={request.combination_type!r} is not one of {COMBINATION_TYPES}.")
    specs = {get_method(model.peft_config[a]).name for a in request.adapters}
    if len(specs) > 1:
        raise ConfigError(f"Adapters of different methods ({sorted(specs)}) cannot be combined: their deltas live in "
                          "different places. Combine adapters of one method.")
    spec = get_method(model.peft_config[request.adapters[0]])
    if spec.combine is None:
        able = [s.name for s in all_methods() if s.combine is not None]
        raise ConfigError(f"{spec.name} adapters cannot be combined by weighting (no meaningful sum of their "
                          f"deltas); add_weighted_adapter supports {able}.")
    with_heads = [a for a in request.adapters if model.saved_module_paths.get(a)]
    if len(with_heads) > 1:
        raise ConfigError(f"Adapters {with_heads} each train their own copy of {model.saved_module_paths[with_heads[0]]} "
                          "(task heads); those cannot be weighted into one. Combine adapters without heads, or at most one "
                          "with a head (its head is copied).")
    return spec


def copy_head(model: Any, request: CombineRequest) -> None:
    """The new adapter's task-head copies take the trained values of the one source adapter that has them."""
    source = next((a for a in request.adapters if model.saved_module_paths.get(a)), None)
    if source is None:
        return
    for path in model.saved_module_paths.get(request.name, []):
        wrapper = model.get_base_model().get_submodule(path)
        if source in wrapper.modules_to_save:
            wrapper.modules_to_save[request.name].load_state_dict(wrapper.modules_to_save[source].state_dict())


def combine(model: Any, request: CombineRequest) -> None:
    """Check ``request``, let the method build the new adapter, copy a trained head; all or nothing."""
    spec = check_request(model, request)
    try:
        spec.combine(model, request)
        copy_head(model, request)
    except BaseException:
        if request.name in model.peft_config:
            model.delete_adapter(request.name)
        raise


__all__ = ["COMBINATION_TYPES", "CombineRequest", "combine"]
