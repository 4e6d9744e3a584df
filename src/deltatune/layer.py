"""``DeltaLayer``: the base of every layer method. It wraps one module of the frozen model.

A subclass keeps its per-adapter tensors in ``nn.ModuleDict`` / ``nn.ParameterDict`` attributes
keyed by adapter name and listed in ``adapter_attr_names`` (``("lora_A", "lora_B")`` for instance),
so that parameter names match the field's vocabulary and checkpoints interoperate. It implements:

* ``add(name, config)`` — create an adapter's tensors;
* ``add_delta(name, x, result)`` — add the adapter's contribution to the base output ``result``;
* ``delta_weight(name)`` — the change to ``base_layer.weight`` that merging applies (optional);

and this class handles activation, disabling, merging, unmerging and deletion for all of them.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from .errors import AdapterNotFoundError, MergeError
from .weights import WeightSnapshot, add_to_weight, quantization, read_weight, restore_weight, snapshot_weight


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


class DeltaLayer(nn.Module):
    """A module of the base model plus named adapters living beside it.

    Attributes:
        base_layer: the wrapped module; its parameters stay frozen unless a method says otherwise.
        active_adapters: adapters whose delta is applied in ``forward`` (several may be active).
        merged_adapters: adapters currently folded into ``base_layer``'s weights.
    """

    adapter_attr_names: ClassVar[tuple[str, ...]] = ()
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
    def add(self, name: str, config: Any, path: str = "") -> None:
        """Create adapter ``name``'s tensors; ``path`` is this layer's module path (for per-module patterns)."""
        raise NotImplementedError

    def add_delta(self, name: str, x: torch.Tensor, result: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise NotImplementedError

    def delta_weight(self, name: str) -> torch.Tensor:
        """The additive change to ``base_layer.weight`` equivalent to adapter ``name``."""
        raise MergeError(f"{self.method_name} cannot be merged into the base weights; use it unmerged.")

    # -- bookkeeping -----------------------------------------------------------------------------
    @property
    def adapter_names(self) -> list[str]:
        names: list[str] = []
        for attr in self.adapter_attr_names:
            for key in getattr(self, attr):
                if key not in names:
                    names.append(key)
        return names

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
                state[attr] = item.data
        return state

    def load_adapter_state(self, name: str, state: dict[str, torch.Tensor]) -> None:
        """Copy tensors in :meth:`adapter_state`'s layout into adapter ``name`` (shapes checked by caller)."""
        own = self.adapter_state(name)
        with torch.no_grad():
            for key, tensor in state.items():
                own[key].copy_(tensor.to(own[key].dtype))

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

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disabled and self.merged_adapters:
            self.unmerge()
        result = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return result
        for name in self.active_adapters:
            if name not in self.merged_adapters:
                result = self.add_delta(name, x, result, *args, **kwargs)
        return result

    def extra_repr(self) -> str:
        return f"adapters={self.adapter_names}, active={self.active_adapters}, merged={self.merged_adapters}"
