"""``DeltaLayer``: the base of every layer method. It wraps one module of the frozen model.

A subclass keeps its per-adapter tensors in ``nn.ModuleDict`` / ``nn.ParameterDict`` attributes
keyed by adapter name and listed in ``adapter_attr_names`` (``("lora_A", "lora_B")`` for instance),
so that parameter names match the field's vocabulary and checkpoints interoperate. It implements:

* ``add(name, config)`` — create an adapter's tensors;
* ``add_delta(name, x, result)`` — add the adapter's contribution to the base output ``result``;
* ``delta_weight(name)`` — the change to ``base_layer.weight`` that merging applies (optional);
* ``add_routed_delta(names, slots, x, result)`` — a mixed-adapter batch (row ``i`` uses adapter
  ``names[slots[i]]``, none where ``slots[i] == len(names)``) served at once, typically one gathered
  ``bmm`` over the adapters' stacked tensors (see :meth:`DeltaLayer.stacked`); the default runs
  ``add_delta`` once per adapter on its rows.

and this class handles activation, disabling, merging, unmerging, deletion and per-example routing
(:mod:`deltatune.routing`) for all of them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import torch
from torch import nn

from .errors import AdapterNotFoundError, MergeError
from .routing import Routing, current_routing
from .weights import WeightSnapshot, add_to_weight, quantization, read_weight, restore_weight, snapshot_weight

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self from Python 3.11

T = TypeVar("T")


def to_delta_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` in the dtype of a delta's weights, except under autocast.

    A delta keeps float32 weights on a half-precision base; outside autocast its input is cast to
    that dtype. Under autocast the matmuls pick their own dtype, so casting a bf16 activation up to
    float32 would only add two copy kernels (up here, back down inside the matmul).
    """
    return x if torch.is_autocast_enabled(x.device.type) else x.to(dtype)


def scale_activation(h: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``h * scale`` in ``h``'s dtype; the (small) scale vector is cast, never the (large) activation."""
    return h * scale if scale.dtype == h.dtype else h * scale.to(h.dtype)


def row_dropout(x: torch.Tensor, p: Sequence[float], slots: torch.Tensor, training: bool) -> torch.Tensor:
    """Inverted dropout with probability ``p[slots[i]]`` on row ``i`` (none for the zero slot)."""
    if not training or not any(q > 0 for q in p):
        return x
    prob = torch.tensor([*p, 0.0], device=x.device)[slots].view(-1, *([1] * (x.dim() - 1)))  # (n, 1..)
    keep = (torch.rand_like(x) >= prob).to(x.dtype)
    return x * keep / (1 - prob).to(x.dtype)


class DeltaLayer(nn.Module):
    """A module of the base model plus named adapters living beside it.

    Attributes:
        base_layer: the wrapped module; its parameters stay frozen unless a method says otherwise.
        active_adapters: adapters whose delta is applied in ``forward`` (several may be active).
        merged_adapters: adapters currently folded into ``base_layer``'s weights.
    """

    adapter_attr_names: ClassVar[tuple[str, ...]] = ()
    #: a subclass that overrides ``forward`` sets this once its forward serves mixed-adapter batches itself
    routes_rows: ClassVar[bool] = False
    method_name: ClassVar[str] = "this method"
    _delta_base_child: ClassVar[str] = "base_layer"

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        self._merge_snapshots: dict[str, WeightSnapshot] = {}  # quantized bases: the weight before each merge

    # -- to implement -------------------------------------------------------------------------
    @classmethod
    def wrapping(cls, base_layer: nn.Module, name: str, config: Any, path: str = "") -> Self:
        """``base_layer`` wrapped by this layer class with adapter ``name`` added: how the core
        (:meth:`~deltatune.registry.MethodSpec.wrap`) or a method's ``make_layer`` builds a layer once
        ``can_wrap`` has accepted the module."""
        layer = cls(base_layer)
        layer.add(name, config, path)
        return layer

    def add(self, name: str, config: Any, path: str = "") -> None:
        """Create adapter ``name``'s tensors; ``path`` is this layer's module path (for per-module patterns)."""
        raise NotImplementedError

    def add_delta(self, name: str, x: torch.Tensor, result: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise NotImplementedError

    def add_routed_delta(self, names: list[str], slots: torch.Tensor, x: torch.Tensor, result: torch.Tensor,
                         *args: Any, **kwargs: Any) -> torch.Tensor:
        """Add, to each row ``i`` of ``result``, the delta of adapter ``names[slots[i]]`` (none where
        ``slots[i] == len(names)``). Fallback: one :meth:`add_delta` per adapter on its rows."""
        for i, name in enumerate(names):
            rows = (slots == i).nonzero().flatten()  # (n_i,)
            if rows.numel():
                part = self.add_delta(name, x.index_select(0, rows), result.index_select(0, rows), *args, **kwargs)
                result = result.index_copy(0, rows, part)
        return result

    def delta_weight(self, name: str) -> torch.Tensor:
        """The additive change to ``base_layer.weight`` equivalent to adapter ``name``."""
        raise MergeError(f"{self.method_name} cannot be merged into the base weights; use it unmerged.")

    # -- bookkeeping -----------------------------------------------------------------------------
    @property
    def adapter_names(self) -> list[str]:
        names: dict[str, None] = {}
        for attr in self.adapter_attr_names:
            names.update(dict.fromkeys(getattr(self, attr)))
        return list(names)

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        """Every trainable tensor that belongs to adapter ``name`` in this layer."""
        params: list[nn.Parameter] = []
        for attr in self.adapter_attr_names:
            container = getattr(self, attr)
            if name in container:
                item = container[name]
                params.extend(item.parameters() if isinstance(item, nn.Module) else [item])
        return params

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        """Adapter ``name``'s tensors, keyed relative to this layer with the adapter name removed.

        ``lora_A`` (a ModuleDict of Linear) gives ``"lora_A.weight"``; a ParameterDict gives
        ``"lora_magnitude_vector"`` — HF peft's on-disk naming.
        """
        state: dict[str, torch.Tensor] = {}
        for attr in self.adapter_attr_names:
            container = getattr(self, attr)
            if name not in container:
                continue
            item = container[name]
            if isinstance(item, nn.Module):
                for key, tensor in item.state_dict().items():
                    state[f"{attr}.{key}"] = tensor
            else:
                state[attr] = item.detach()  # shares the version counter (``.data`` does not): writes show
        return state

    def load_adapter_state(self, name: str, state: dict[str, torch.Tensor]) -> None:
        """Copy tensors in :meth:`adapter_state`'s layout into adapter ``name`` (shapes checked by caller)."""
        own = self.adapter_state(name)
        with torch.no_grad():
            for key, tensor in state.items():
                own[key].copy_(tensor.to(own[key].dtype))
        self.__dict__.pop("_stack_cache", None)  # stacks built from the old values

    def set_active(self, names: list[str]) -> None:
        self.active_adapters = [n for n in names if n in self.adapter_names]

    def delete(self, name: str) -> None:
        if name in self.merged_adapters:
            raise MergeError(
                f"Adapter {name!r} is merged into the base weights; call unmerge_adapter() before deleting it, "
                "otherwise the base model would keep its changes."
            )
        for attr in self.adapter_attr_names:
            container = getattr(self, attr)
            if name in container:
                del container[name]
        self.active_adapters = [n for n in self.active_adapters if n != name]
        self.__dict__.pop("_stack_cache", None)

    def get_base_layer(self) -> nn.Module:
        """The innermost original module (layers of different methods may be nested)."""
        base = self.base_layer
        return base.get_base_layer() if isinstance(base, DeltaLayer) else base

    @property
    def weight(self) -> torch.Tensor:
        """The wrapped module's weight: model code that reads ``module.weight`` (T5 reads ``wo.weight.dtype``) keeps working."""
        return self.get_base_layer().weight

    @property
    def bias(self) -> torch.Tensor | None:
        """The wrapped module's bias (``None`` when it has none)."""
        return getattr(self.get_base_layer(), "bias", None)

    # -- merging ---------------------------------------------------------------------------------
    def merge_one(self, name: str) -> None:
        """Fold adapter ``name`` into the base weight. Methods with a non-additive merge override.

        Reads and writes go through :mod:`deltatune.weights`, which dequantizes and re-quantizes a
        quantized base weight.
        """
        add_to_weight(self.get_base_layer(), self.delta_weight(name))

    def unmerge_one(self, name: str) -> None:
        """Undo :meth:`merge_one` for adapter ``name``."""
        add_to_weight(self.get_base_layer(), -self.delta_weight(name))

    def merge(self, names: list[str] | None = None, safe: bool = False) -> None:
        """Merge ``names`` (default: the active adapters) into the base weights.

        With ``safe=True`` the merged weights are checked for NaN/inf before they replace the
        originals; on failure the base stays untouched and :class:`MergeError` is raised.
        """
        for name in names if names is not None else self.active_adapters:
            if name not in self.adapter_names:
                raise AdapterNotFoundError(f"Layer has no adapter {name!r}; it has {self.adapter_names}.")
            if name in self.merged_adapters:
                continue
            base = self.get_base_layer()
            # A quantized weight cannot be un-merged by subtraction (re-quantizing rounds twice): keep the original.
            kept = snapshot_weight(base) if safe or quantization(base) else None
            self.merge_one(name)
            if safe and not torch.isfinite(read_weight(base)).all():
                restore_weight(base, kept)
                raise MergeError(f"Merging adapter {name!r} gives NaN/inf weights; base left unchanged.")
            if kept is not None and kept.quantized:
                self._merge_snapshots[name] = kept
            self.merged_adapters.append(name)

    def unmerge_last(self) -> None:
        """Undo the most recent merge (a quantized base gets its original weight back bit for bit)."""
        name = self.merged_adapters.pop()
        kept = self._merge_snapshots.pop(name, None)
        if kept is not None:
            restore_weight(self.get_base_layer(), kept)
        else:
            self.unmerge_one(name)

    def unmerge(self) -> None:
        """Undo every merge, most recent first, restoring the base weights."""
        while self.merged_adapters:
            self.unmerge_last()

    def owns_result(self) -> bool:
        """Whether a delta may be added into the base layer's output in place (saving a fresh tensor):
        no gradients (autograd may need the output), and no forward hook that could hold it."""
        from torch.nn.modules import module as torch_module

        return not (torch.is_grad_enabled() or self.base_layer._forward_hooks or self.get_base_layer()._forward_hooks
                    or torch_module._global_forward_hooks)

    # -- mixed-adapter batches --------------------------------------------------------------------
    @property
    def serves_mixed_batches(self) -> bool:
        """Layers using this class's ``forward`` route rows (:meth:`add_routed_delta`); others must say so."""
        return type(self).forward is DeltaLayer.forward or self.routes_rows

    def routed_names(self, routing: Routing) -> tuple[list[str], bool]:
        """``(stack, uniform)``: the adapters to stack for ``routing``, and whether every row uses ``stack[0]``.

        With gradients the stack holds the batch's adapters (built from the live tensors in every
        forward, so gradients reach them); without, all of this layer's adapters in a fixed order, so
        one cached stack (:meth:`stacked`) serves every batch until a tensor changes.
        """
        mine = self.adapter_names
        if routing.uniform is not None:
            return ([routing.uniform], True) if routing.uniform in mine else ([], True)
        own = set(mine)
        present = [n for n in routing.names if n in own]
        if not present or torch.is_grad_enabled():
            return present, False
        return mine, False

    def stacked(self, names: Sequence[str], build: Callable[[Sequence[str]], T]) -> T:
        """``build(names)``: the adapters' tensors stacked for a gathered matmul.

        Without gradients the result is cached until an adapter is added or deleted or one of its
        tensors changes (optimizer step, load: every in-place write bumps ``Tensor._version``; a move
        or cast gives it new storage). Deleting an adapter drops the cache (its name may come back
        with new tensors).
        With gradients it is built from the live parameters every time, so that they receive gradients.
        """
        if torch.is_grad_enabled():
            return build(names)
        cache: dict[tuple[Any, ...], tuple[Any, ...]] = self.__dict__.setdefault("_stack_cache", {})
        key = (build.__name__, tuple(names))
        hit = cache.get(key)
        if hit is not None:  # the same tensors, unchanged since the build: one version check per tensor
            params, versions, value = hit
            if versions == tuple((p._version, p.data_ptr()) for p in params):
                return value
        params = [p for n in names for p in self.adapter_parameters(n)]
        versions = tuple((p._version, p.data_ptr()) for p in params)
        if len(cache) >= 4:  # a layer serves one or two stacks (per placement); keep the last few
            cache.pop(next(iter(cache)))
        value = build(names)
        cache[key] = (params, versions, value)
        return value

    def routed_forward(self, routing: Routing, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The base output plus, for every row, its own adapter's delta (the active adapters are not used)."""
        result = self.base_layer(x, *args, **kwargs)
        stack, uniform = self.routed_names(routing)
        if not stack:
            return result
        if uniform:  # one adapter for the whole batch: the single-adapter fast path
            return self.add_delta(stack[0], x, result, *args, **kwargs)
        slots = routing.slots(stack, x.shape[0], x.device)  # (B,)
        return self.add_routed_delta(stack, slots, x, result, *args, **kwargs)

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disabled and self.merged_adapters:
            self.unmerge()
        routing = None if self.disabled else current_routing()
        if routing is not None:
            return self.routed_forward(routing, x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return result
        for name in self.active_adapters:
            if name not in self.merged_adapters:
                result = self.add_delta(name, x, result, *args, **kwargs)
        return result

    def extra_repr(self) -> str:
        return f"adapters={self.adapter_names}, active={self.active_adapters}, merged={self.merged_adapters}"
