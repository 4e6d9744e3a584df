"""Bottleneck adapter layers: one wrapper type for the sequential and the parallel placement.

With ``a(h) = s * W_up f(W_down dropout(h))``, ``W_down: (b, d_in)``, ``W_up: (d_out, b)``:

    sequential (Houlsby, Pfeiffer):  y = M(x) + a(M(x))          # after module M
    parallel (He et al.):            y = M(x) + a(x)             # beside module M, reading its input

``M`` is a linear layer (the attention output or feed-forward output projection) or a whole block
(a feed-forward block module). BERT-style output blocks ``M(h, r) = LayerNorm(dense(h) + r)`` get the
block input as the residual ``r`` (see :func:`deltatune.model_interface.residual_input_arg`); there the
parallel adapter is added to ``r``, which equals adding it to the block's output before the norm.
Several active adapters on one module: parallel ones are summed, sequential ones applied in turn.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import TargetError
from ...layer import DeltaLayer, row_dropout, to_delta_dtype
from ...model_interface import is_linear_like, linear_dims, residual_input_arg
from ...routing import Routing, current_routing
from ...targeting import unwrapped
from .batched import BottleneckStack, routed_bottleneck, stack_bottleneck
from .config import BottleneckConfig

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu, "gelu": F.gelu, "swish": F.silu, "silu": F.silu, "tanh": torch.tanh,
}


def base_linears(module: nn.Module) -> list[nn.Module]:
    """Linear-like modules of the original model inside ``module``, in registration order.

    Adapter tensors of deltatune wrappers below ``module`` are skipped; their wrapped modules count.
    """
    module = unwrapped(module)
    if is_linear_like(module):
        return [module]
    found: list[nn.Module] = []
    for child in module.children():
        found.extend(base_linears(child))
    return found


def _experts_width(module: nn.Module) -> int | None:
    """Feature width of a mixture-of-experts block: its router's weight is ``(E, h)`` for ``E`` experts ``(E, ., .)``."""
    experts = {p.shape[0] for p in module.parameters() if p.dim() == 3}
    weights = [getattr(m, "weight", None) for m in module.modules()]
    widths = {w.shape[1] for w in weights if isinstance(w, nn.Parameter) and w.dim() == 2 and w.shape[0] in experts}
    return widths.pop() if len(widths) == 1 else None


def adapter_dims(module: nn.Module, parallel: bool) -> tuple[int, int] | None:
    """``(d_in, d_out)`` of an adapter on ``module`` (``None`` when they cannot be told).

    A mixture-of-experts block (3-D expert weights) maps ``h -> h``; ``h`` is read off its router.
    """
    base = unwrapped(module)
    if any(p.dim() == 3 for p in base.parameters()):
        width = _experts_width(base)
        return None if width is None else (width, width)
    linears = base_linears(base)
    if not linears:
        return None
    d_out = linear_dims(linears[-1])[1]
    if not parallel or residual_input_arg(base) is not None:
        return d_out, d_out  # reads the module's output, or the residual of a BERT-style block
    return linear_dims(linears[0])[0], d_out


class BottleneckLayer(DeltaLayer):
    """Bottleneck adapters after (sequential) or beside (parallel) one module of the model."""

    adapter_attr_names = ("adapter_down", "adapter_up")
    routes_rows = True
    method_name = "bottleneck"

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.adapter_down = nn.ModuleDict()
        self.adapter_up = nn.ModuleDict()
        self.parallel: dict[str, bool] = {}
        self.scaling: dict[str, float] = {}
        self.non_linearity: dict[str, str] = {}
        self.dropout_p: dict[str, float] = {}
        self.residual_arg = residual_input_arg(self.get_base_layer())
        # a mixture-of-experts block may return (hidden, router scores): the adapter acts on the hidden states
        self.experts_block = any(p.dim() == 3 for p in self.get_base_layer().parameters())
        # beside an inline feed-forward: the block input, handed over by a hook on the up projection (.inline)
        self.reads_block_input = False
        self.block_input: torch.Tensor | None = None

    def add(self, name: str, config: BottleneckConfig, path: str = "") -> None:
        parallel = config.variant == "parallel"
        dims = adapter_dims(self.base_layer, parallel)
        if parallel and path in (config.parallel_inputs or {}):  # reads the block input, adds to its output
            width = linear_dims(self.get_base_layer())[1]  # type: ignore[index]
            dims, self.reads_block_input = (width, width), True
        if dims is None:
            raise TargetError(f"bottleneck: cannot tell the feature size of {path} ({type(self.get_base_layer()).__name__}).")
        d_in, d_out = dims
        size = config.size_for(d_in)
        device = next(self.get_base_layer().parameters()).device
        self.adapter_down[name] = nn.Linear(d_in, size, device=device, dtype=torch.float32)  # (b, d_in)
        self.adapter_up[name] = nn.Linear(size, d_out, device=device, dtype=torch.float32)  # (d_out, b)
        up = self.adapter_up[name]
        with torch.no_grad():
            if config.init_weights:  # near-identity: the adapter adds exactly zero at the start
                nn.init.zeros_(up.weight)
                nn.init.zeros_(up.bias)
            else:
                nn.init.kaiming_uniform_(up.weight, a=math.sqrt(5))
                nn.init.uniform_(up.bias, -0.1, 0.1)
        self.parallel[name] = parallel
        self.scaling[name] = float(config.scaling)
        self.non_linearity[name] = config.non_linearity
        self.dropout_p[name] = config.adapter_dropout
        self.set_active(self.active_adapters)

    def delete(self, name: str) -> None:
        super().delete(name)
        for table in (self.parallel, self.scaling, self.non_linearity, self.dropout_p):
            table.pop(name, None)

    def adapt(self, name: str, h: torch.Tensor) -> torch.Tensor:
        """``s * W_up f(W_down dropout(h))``: ``(..., d_in) -> (..., d_out)``, in ``h``'s dtype."""
        down, up = self.adapter_down[name], self.adapter_up[name]
        x = to_delta_dtype(h, down.weight.dtype)
        p = self.dropout_p[name]
        if p > 0 and self.training:
            x = F.dropout(x, p, training=True)
        act = ACTIVATIONS[self.non_linearity[name]]
        return (up(act(down(x))) * self.scaling[name]).to(h.dtype)

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        routing = None if self.disabled else current_routing()
        if routing is not None:
            names, uniform = self.routed_names(routing)
            if names and not uniform:
                return self._routed_forward(routing, names, args, kwargs)
            return self._forward_with(names, args, kwargs)
        return self._forward_with([] if self.disabled else self.active_adapters, args, kwargs)

    def _forward_with(self, live: list[str], args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
        parallel = [n for n in live if self.parallel[n]]
        if parallel:
            args, out = self._run_parallel(lambda x: sum(self.adapt(name, x) for name in parallel), args, kwargs)
        else:
            out = self.base_layer(*args, **kwargs)
        rest: tuple | None = None
        if live and self.experts_block and isinstance(out, tuple) and isinstance(out[0], torch.Tensor):
            out, rest = out[0], out[1:]  # (hidden, router scores ...) of a mixture-of-experts block
        self._check_tensor(live, out)
        for name in live:
            if not self.parallel[name]:
                out = out + self.adapt(name, out)  # (..., d_out)
        return (out, *rest) if rest is not None else out

    def _check_tensor(self, live: list[str], out: Any) -> None:
        if live and not isinstance(out, torch.Tensor):
            raise TargetError(
                f"bottleneck adapters need modules that return one tensor; {type(self.get_base_layer()).__name__} "
                f"returns {type(out).__name__}. Target its output projection instead."
            )

    def _routed_forward(self, routing: Routing, names: list[str], args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
        """A mixed batch: each row through its own adapter, parallel ones beside and sequential ones after
        the module, each placement in one gathered ``bmm`` pair (:func:`.batched.routed_bottleneck`)."""
        parallel = [n for n in names if self.parallel[n]]
        sequential = [n for n in names if not self.parallel[n]]
        if parallel:
            args, out = self._run_parallel(lambda x: self._adapt_rows(routing, parallel, x), args, kwargs)
        else:
            out = self.base_layer(*args, **kwargs)
        self._check_tensor(names, out)
        if sequential:
            out = out + self._adapt_rows(routing, sequential, out)  # (B, ..., d_out)
        return out

    def _adapt_rows(self, routing: Routing, names: list[str], h: torch.Tensor) -> torch.Tensor:
        slots = routing.slots(names, h.shape[0], h.device)  # (B,)
        stack = self.stacked(names, self._bottleneck_stack)
        x = row_dropout(to_delta_dtype(h, stack.down.dtype), [self.dropout_p[n] for n in names], slots, self.training)
        acts = [ACTIVATIONS[self.non_linearity[n]] for n in names]
        return routed_bottleneck(stack, slots, x, acts).to(h.dtype)

    def _bottleneck_stack(self, names: Sequence[str]) -> BottleneckStack:
        return stack_bottleneck([self.adapter_down[n] for n in names], [self.adapter_up[n] for n in names],
                                [self.scaling[n] for n in names])

    def _run_parallel(self, extra_of: Callable[[torch.Tensor], torch.Tensor], args: tuple,
                      kwargs: dict[str, Any]) -> tuple[tuple, Any]:
        """Call the wrapped module with the parallel adapters' output ``extra_of(x)`` added beside it."""
        k = self.residual_arg if self.residual_arg is not None else 0
        if self.reads_block_input:
            x, self.block_input = self.block_input, None
            if x is None:
                raise TargetError("bottleneck: the feed-forward block's up projection was not called before its "
                                  f"down projection ({type(self.get_base_layer()).__name__}); cannot read the block input.")
        elif len(args) > k:
            x = args[k]
        elif k == 0 and kwargs:
            x = next(iter(kwargs.values()))
        else:
            raise TargetError(f"bottleneck: {type(self.get_base_layer()).__name__} was called without its input.")
        extra = extra_of(x)  # (..., d_out)
        if self.residual_arg is not None:  # BERT-style block: add to the residual it adds before its norm
            args = (*args[:k], x + extra, *args[k + 1 :])
            return args, self.base_layer(*args, **kwargs)
        out = self.base_layer(*args, **kwargs)
        if self.experts_block and isinstance(out, tuple) and isinstance(out[0], torch.Tensor):
            return args, (out[0] + extra.reshape(out[0].shape), *out[1:])  # some return tokens flattened (B*S, h)
        return args, out + extra if isinstance(out, torch.Tensor) else out


def can_wrap(module: nn.Module, config: BottleneckConfig, path: str) -> str | None:
    """``None`` when a bottleneck adapter can sit after/beside ``module``, else why not."""
    if adapter_dims(module, config.variant == "parallel") is None:
        return (f"{type(unwrapped(module)).__name__} holds no linear layer to take the adapter's feature size from; "
                "target a linear layer or a block that contains one")
    return None


__all__ = ["ACTIVATIONS", "BottleneckLayer", "adapter_dims", "base_linears", "can_wrap"]
