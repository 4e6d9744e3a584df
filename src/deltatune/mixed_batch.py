"""Mixed-adapter batches: ``model(**batch, adapter_names=[...])`` and ``model.generate(..., adapter_names=[...])``.

One adapter name per example (``"__base__"``: the frozen model alone), HF peft's keyword and
sentinel. The names are checked before any work starts, turned into a :class:`~deltatune.routing.Routing`
and made current for the whole call (every decoding step of ``generate`` included); layer methods
read it in their forward, input methods get the call through their ``run_routed`` / ``generate_routed``.
``model`` below is a :class:`~deltatune.model.DeltaModel` (not imported: the model imports this module).
Unlike peft's, it is allowed in training mode: each example's loss reaches only its adapter's tensors.

Step-by-step decoding outside ``generate`` (a server's continuous batching) uses three more calls:
:func:`input_groups` (which rows may share their first forward), :func:`leading_mask` (the cache
columns input methods put in front of each row at that first forward: virtual tokens, key/value
prefixes) and :func:`routed_continuation` (a later step, with those contributions already cached).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .errors import ConfigError, MergeError
from .inject import iter_wrappers
from .input_delta import InputDelta
from .layer import DeltaLayer
from .routing import Routing, routed

_INPUT_KEYS = ("input_ids", "inputs_embeds", "x", "pixel_values")


def batch_size(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    """Examples in a model call: the first dimension of its main input."""
    if args and isinstance(args[0], torch.Tensor):
        return int(args[0].shape[0])
    for key in _INPUT_KEYS:
        if isinstance(kwargs.get(key), torch.Tensor):
            return int(kwargs[key].shape[0])
    for value in kwargs.values():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    raise ConfigError("adapter_names needs a batched model input (input_ids=..., inputs_embeds=...) to route.")


def make_routing(model: nn.Module, adapter_names: list[str], batch: int) -> Routing:
    """Validate ``adapter_names`` for ``model`` and a batch of ``batch`` examples (nothing runs before)."""
    routing = Routing.from_names(adapter_names, list(model.peft_config))
    if routing.batch_size != batch:
        raise ConfigError(
            f"adapter_names has {routing.batch_size} names but the batch has {batch} examples; give exactly one "
            "adapter name per example (\"__base__\" for the base model)."
        )
    wrappers = [w for _, w in iter_wrappers(model.get_base_model())]
    merged = sorted({n for w in wrappers for n in getattr(w, "merged_adapters", [])})
    if merged:
        raise MergeError(
            f"Adapter(s) {merged} are merged into the base weights, so every example would see them; a mixed "
            "batch needs unmerged adapters. Call unmerge_adapter() first."
        )
    unrouted = sorted({w.method_name for w in wrappers if isinstance(w, DeltaLayer) and not w.serves_mixed_batches
                       and any(n in w.adapter_names for n in routing.names)})
    if unrouted:
        raise ConfigError(
            f"{unrouted} adapters cannot share a mixed-adapter batch yet (their layers run one adapter for the "
            "whole batch); call them without adapter_names, one adapter at a time (set_adapter)."
        )
    if torch.is_grad_enabled() and any(getattr(m, "gradient_checkpointing", False) is True
                                       for m in model.get_base_model().modules()):
        raise ConfigError(
            "adapter_names with gradients cannot be combined with gradient checkpointing: the recomputation in "
            "the backward pass runs after the call and would not see the per-example routing. Call "
            "gradient_checkpointing_disable() (or train without adapter_names)."
        )
    return routing


def _input_runner(deltas: dict[str, InputDelta]) -> type[InputDelta]:
    """The input-method class that serves every input adapter of the batch (one family per batch)."""
    runners = {type(d).run_routed.__func__: type(d) for d in deltas.values()}
    if len(runners) > 1:
        kinds = sorted({type(d).method_name for d in deltas.values()})
        raise ConfigError(
            f"A mixed batch can hold adapters of one input-method family only; this one mixes {kinds}. Split the "
            "batch (prompt tuning and P-tuning share a batch; prefix tuning needs its own)."
        )
    return next(iter(runners.values()))


def _deltas(model: nn.Module, routing: Routing) -> dict[str, InputDelta]:
    return {n: model.input_deltas[n] for n in routing.names if n in model.input_deltas}


def mixed_forward(model: nn.Module, adapter_names: list[str], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``model.get_base_model()(*args, **kwargs)`` with example ``b`` using adapter ``adapter_names[b]``."""
    if getattr(model, "_adapters_disabled", False):
        return model.get_base_model()(*args, **kwargs)
    routing = make_routing(model, adapter_names, batch_size(args, kwargs))
    deltas = _deltas(model, routing)
    with routed(routing):
        if not deltas:
            return model.get_base_model()(*args, **kwargs)
        return _input_runner(deltas).run_routed(model.get_base_model(), args, kwargs, routing, deltas)


def mixed_generate(model: nn.Module, adapter_names: list[str], kwargs: dict[str, Any]) -> Any:
    """``model.get_base_model().generate(**kwargs)`` with example ``b`` (and its beams / returned sequences)
    using adapter ``adapter_names[b]`` at every decoding step."""
    if getattr(model, "_adapters_disabled", False):
        return model.get_base_model().generate(**kwargs)
    routing = make_routing(model, adapter_names, batch_size((), kwargs))
    deltas = _deltas(model, routing)
    with routed(routing):
        if not deltas:
            return model.get_base_model().generate(**kwargs)
        return _input_runner(deltas).generate_routed(model.get_base_model(), kwargs, routing, deltas)


def _row_deltas(model: nn.Module, adapter_names: list[str]) -> list[InputDelta | None]:
    return [model.input_deltas[n] if n in model.input_deltas else None  # noqa: SIM401 (ModuleDict has no .get)
            for n in adapter_names]


def input_groups(model: nn.Module, adapter_names: list[str]) -> list[list[int]]:
    """Rows (indices into ``adapter_names``) that can share one first forward: a mixed batch holds input
    adapters of one family only, so each family gets a group; rows of layer methods and of the base
    join the first group. Every row is in exactly one group, in order within it."""
    groups: dict[object, list[int]] = {}
    plain: list[int] = []
    for row, delta in enumerate(_row_deltas(model, adapter_names)):
        if delta is None:
            plain.append(row)
        else:
            groups.setdefault(type(delta).run_routed.__func__, []).append(row)
    found = list(groups.values()) or [[]]
    found[0] = sorted(found[0] + plain)
    return [group for group in found if group]


def leading_mask(model: nn.Module, adapter_names: list[str]) -> torch.Tensor:
    """``(B, P)`` attention mask of the columns that input methods put in front of each row's input in a
    first forward of a decoder-only model with ``adapter_names``: row ``b`` has ``P_b`` (its adapter's
    :meth:`~deltatune.input_delta.InputDelta.leading_positions`) ones at the end, zeros before, ``P = max P_b``.
    The first forward's cache is ``P`` columns wider than its input; these columns come first."""
    lengths = [0 if d is None else d.leading_positions() for d in _row_deltas(model, adapter_names)]
    width = max(lengths, default=0)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        if n:
            mask[row, width - n:] = 1
    return mask


def routed_continuation(model: nn.Module, adapter_names: list[str], kwargs: dict[str, Any]) -> Any:
    """A later decoding step of rows whose first forward ran with ``adapter_names`` (and whose key/value
    cache ``kwargs`` carries): what input methods contributed (virtual tokens, prefixes) is in that cache
    already, so only the layer methods route; ``model.get_base_model()(**kwargs)`` under the routing."""
    if getattr(model, "_adapters_disabled", False):
        return model.get_base_model()(**kwargs)
    routing = make_routing(model, adapter_names, batch_size((), kwargs))
    with routed(routing):
        return model.get_base_model()(**kwargs)
