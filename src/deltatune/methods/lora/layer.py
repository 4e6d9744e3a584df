"""LoRA layers for linear (incl. transposed ``Conv1D``), embedding and convolution modules.

For a frozen weight ``W`` the layer computes ``h = W x + s * B (A dropout(x))`` with
``s = alpha / r`` (``alpha / sqrt(r)`` for rsLoRA), ``A: (r, in)``, ``B: (out, r)``. Merging adds
``s * B A`` to ``W``; unmerging subtracts it again.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ConfigError
from ...layer import DeltaLayer, row_dropout, to_delta_dtype
from ...model_interface import is_linear_like, linear_dims
from ...targeting import pattern_value, unwrapped
from ...weights import quantization, read_weight
from .batched import LoraStack, routed_lora, stack_lora
from .config import REWRITES_BASE, LoftQConfig, LoraConfig
from .dora import DoraMixin
from .init import init_lora, init_lora_embedding, init_olora, init_pissa
from .loftq import init_loftq, loftq_refusal


class LoraLayer(DeltaLayer):
    """Shared bookkeeping: rank, scaling and dropout per adapter."""

    method_name = "lora"

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.dropout_p: dict[str, float] = {}

    def _set_hyper(self, name: str, config: LoraConfig, path: str) -> int:
        r = int(pattern_value(path, config.rank_pattern) or config.r)
        alpha = float(pattern_value(path, config.alpha_pattern) or config.lora_alpha)
        self.r[name] = r
        self.scaling[name] = alpha / math.sqrt(r) if config.use_rslora else alpha / r
        self.dropout_p[name] = config.lora_dropout
        return r

    def _dropout(self, name: str, x: torch.Tensor) -> torch.Tensor:
        p = self.dropout_p[name]
        return F.dropout(x, p, training=True) if p > 0 and self.training else x  # no identity call when p == 0

    def _routed_dropout(self, names: list[str], slots: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Dropout with each row's own adapter's probability (rows of no adapter: none)."""
        return row_dropout(x, [self.dropout_p[n] for n in names], slots, self.training)

    def delete(self, name: str) -> None:
        super().delete(name)
        for table in (self.r, self.scaling, self.dropout_p):
            table.pop(name, None)


class LoraLinear(DoraMixin, LoraLayer):
    """LoRA on ``nn.Linear`` or a transposed linear layer (GPT-2's ``Conv1D``, weight ``(in, out)``)."""

    adapter_attr_names = ("lora_A", "lora_B", "lora_magnitude_vector")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = not isinstance(self.get_base_layer(), nn.Linear)
        self.in_features, self.out_features = linear_dims(self.get_base_layer())
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ParameterDict()

    def add(self, name: str, config: LoraConfig, path: str = "") -> None:
        r = self._set_hyper(name, config, path)
        weight = self.get_base_layer().weight
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, device=weight.device, dtype=torch.float32)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, device=weight.device, dtype=torch.float32)
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        if config.init_lora_weights == "loftq":  # the float base layer becomes its quantization Q (see .loftq)
            self.base_layer = init_loftq(a, b, self.base_layer, self.scaling[name], LoftQConfig.of(config.loftq_config))
            self.fan_in_fan_out = False  # a Conv1D base is now a bitsandbytes linear layer, weight (out, in)
        elif config.init_lora_weights in REWRITES_BASE:
            init = init_pissa if config.init_lora_weights == "pissa" else init_olora
            residual = init(a, b, self.base_weight(), self.scaling[name])  # (out, in)
            weight.data.copy_((residual.T if self.fan_in_fan_out else residual).to(weight.dtype))
        else:
            init_lora(a, b, config.init_lora_weights, r)
        if config.use_dora:
            self.add_magnitude(name)
        self.set_active(self.active_adapters)

    def base_weight(self) -> torch.Tensor:
        """The base weight as ``(out, in)`` (dequantized for a quantized base)."""
        weight = read_weight(self.get_base_layer())
        return weight.T if self.fan_in_fan_out else weight

    def row_major_delta(self, name: str) -> torch.Tensor:
        """``s * B A`` as ``(out, in)``: the one place LoRA's weight update is formed."""
        return (self.lora_B[name].weight @ self.lora_A[name].weight) * self.scaling[name]  # (out, in)

    def delta_weight(self, name: str) -> torch.Tensor:
        """``s * B A`` in the base weight's layout (transposed for fan-in-fan-out weights)."""
        delta = self.row_major_delta(name)  # (out, in)
        return delta.T if self.fan_in_fan_out else delta

    def add_delta(self, name: str, x: torch.Tensor, result: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        lora_A, lora_B = self.lora_A[name], self.lora_B[name]
        x_in = to_delta_dtype(self._dropout(name, x), lora_A.weight.dtype)
        down = lora_A(x_in)  # (..., r)
        if name in self.lora_magnitude_vector:
            return self.dora_add_delta(name, result, lora_B(down) * self.scaling[name])
        if down.dtype == result.dtype and result.is_contiguous():
            # One fused kernel for  result + s * down @ B^T  (no separate scale and add, no (..., out) temporaries);
            # without gradients into the base layer's fresh output itself (a new tensor costs its page faults).
            flat, down2d = result.view(-1, result.shape[-1]), down.reshape(-1, down.shape[-1])
            if self.owns_result() and lora_B.weight.dtype == flat.dtype:  # (in-place ops skip autocast's casts)
                return flat.addmm_(down2d, lora_B.weight.t(), alpha=self.scaling[name]).view(result.shape)
            return torch.addmm(flat, down2d, lora_B.weight.t(), alpha=self.scaling[name]).view(result.shape)
        return result + (lora_B(down) * self.scaling[name]).to(result.dtype)

    def add_routed_delta(self, names: list[str], slots: torch.Tensor, x: torch.Tensor, result: torch.Tensor,
                         *args: Any, **kwargs: Any) -> torch.Tensor:
        """Every row with its own adapter in two gathered ``bmm`` (see :mod:`.batched`)."""
        stack = self.stacked(names, self._lora_stack)
        x_in = to_delta_dtype(self._routed_dropout(names, slots, x), stack.a.dtype)
        return routed_lora(stack, slots, x_in, result, self.get_base_layer().bias, in_place=self.owns_result())

    def _lora_stack(self, names: Sequence[str]) -> LoraStack:
        dora = [self._dora_factor(n) if n in self.lora_magnitude_vector else None for n in names]
        return stack_lora([self.lora_A[n].weight for n in names], [self.lora_B[n].weight for n in names],
                          [self.scaling[n] for n in names], dora)


class LoraEmbedding(LoraLayer):
    """LoRA on ``nn.Embedding``: ``h = E[x] + s * (A^T[x]) B^T`` with ``A: (r, vocab)``, ``B: (dim, r)``."""

    adapter_attr_names = ("lora_embedding_A", "lora_embedding_B")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()

    def add(self, name: str, config: LoraConfig, path: str = "") -> None:
        if config.use_dora:
            raise ConfigError(f"use_dora supports linear layers only; {path} is an embedding. Exclude it or drop use_dora.")
        r = self._set_hyper(name, config, path)
        base = self.get_base_layer()
        weight = base.weight
        self.lora_embedding_A[name] = nn.Parameter(torch.zeros(r, base.num_embeddings, device=weight.device))
        self.lora_embedding_B[name] = nn.Parameter(torch.zeros(base.embedding_dim, r, device=weight.device))
        init_lora_embedding(self.lora_embedding_A[name], self.lora_embedding_B[name], config.init_lora_weights)
        self.set_active(self.active_adapters)

    def delta_weight(self, name: str) -> torch.Tensor:
        return (self.lora_embedding_B[name] @ self.lora_embedding_A[name]).T * self.scaling[name]  # (vocab, dim)

    def add_delta(self, name: str, x: torch.Tensor, result: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        base = self.get_base_layer()
        rows = F.embedding(x, self.lora_embedding_A[name].T, base.padding_idx, base.max_norm, base.norm_type,
                           base.scale_grad_by_freq, base.sparse)  # (..., r)
        return result + (rows @ self.lora_embedding_B[name].T * self.scaling[name]).to(result.dtype)

    def add_routed_delta(self, names: list[str], slots: torch.Tensor, x: torch.Tensor, result: torch.Tensor,
                         *args: Any, **kwargs: Any) -> torch.Tensor:
        """Each row's ``A^T[x]`` from one lookup in the stacked tables (row ``k * vocab + id``), then one ``bmm``."""
        base = self.get_base_layer()
        if base.max_norm is not None or base.scale_grad_by_freq or base.sparse:
            return super().add_routed_delta(names, slots, x, result, *args, **kwargs)
        table, up = self.stacked(names, self._embedding_stack)  # ((K+1) * vocab, R), (K+1, dim, R)
        flat = x + slots.view(-1, *([1] * (x.dim() - 1))) * base.num_embeddings  # (n, ...)
        rows = F.embedding(flat, table)  # (n, ..., R)
        if base.padding_idx is not None and torch.is_grad_enabled():  # as nn.Embedding: no gradient for padding
            rows = torch.where((x == base.padding_idx).unsqueeze(-1), rows.detach(), rows)
        n = x.shape[0]
        delta = torch.bmm(rows.reshape(n, -1, rows.shape[-1]), up[slots].transpose(1, 2))  # (n, L, dim)
        return result + delta.view(result.shape).to(result.dtype)

    def _embedding_stack(self, names: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``A_k^T`` stacked as one ``((K+1) * vocab, R)`` table and ``s_k B_k`` as ``(K+1, dim, R)``, ranks
        zero-padded, plus an all-zero slot for rows of no adapter."""
        stack = stack_lora([self.lora_embedding_A[n] for n in names], [self.lora_embedding_B[n] for n in names],
                           [self.scaling[n] for n in names], [None] * len(names))
        return stack.a.transpose(1, 2).reshape(-1, stack.a.shape[1]), stack.b


class LoraConv(LoraLayer):
    """LoRA on ``nn.Conv1d`` / ``nn.Conv2d``: ``A`` has the base kernel with ``r`` outputs, ``B`` is 1x1.

    A mixed-adapter batch runs every row's ``A`` in one grouped convolution (group ``i`` = row ``i``'s
    channels and kernels) and every row's ``B`` in one gathered ``bmm``."""

    adapter_attr_names = ("lora_A", "lora_B")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    def add(self, name: str, config: LoraConfig, path: str = "") -> None:
        if config.use_dora:
            raise ConfigError(f"use_dora supports linear layers only; {path} is a convolution. Exclude it or drop use_dora.")
        r = self._set_hyper(name, config, path)
        base = self.get_base_layer()
        conv = type(base)
        kw = {"device": base.weight.device, "bias": False}
        self.lora_A[name] = conv(base.in_channels, r, base.kernel_size, base.stride, base.padding, base.dilation,
                                 padding_mode=base.padding_mode, **kw)
        self.lora_B[name] = conv(r, base.out_channels, 1, **kw)
        init_lora(self.lora_A[name].weight, self.lora_B[name].weight, config.init_lora_weights, r)
        self.set_active(self.active_adapters)

    def delta_weight(self, name: str) -> torch.Tensor:
        """Compose the two convolutions into one kernel of the base's shape ``(out, in, *k)``."""
        a = self.lora_A[name].weight  # (r, in, *k)
        b = self.lora_B[name].weight.flatten(1)  # (out, r)
        return torch.einsum("or,ri...->oi...", b, a) * self.scaling[name]

    def add_delta(self, name: str, x: torch.Tensor, result: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        x_in = to_delta_dtype(self._dropout(name, x), self.lora_A[name].weight.dtype)
        return result + (self.lora_B[name](self.lora_A[name](x_in)) * self.scaling[name]).to(result.dtype)

    def add_routed_delta(self, names: list[str], slots: torch.Tensor, x: torch.Tensor, result: torch.Tensor,
                         *args: Any, **kwargs: Any) -> torch.Tensor:
        """Each row's ``A`` as one grouped convolution (the rows side by side as channel groups), then each
        row's ``s B`` in one gathered ``bmm``; a padding mode other than zeros takes the per-adapter loop."""
        base = self.get_base_layer()
        if base.padding_mode != "zeros" or x.dim() != base.weight.dim():
            return super().add_routed_delta(names, slots, x, result, *args, **kwargs)
        a, b = self.stacked(names, self._conv_stack)  # (K+1, R, in, *k), (K+1, out, R)
        x_in = to_delta_dtype(self._routed_dropout(names, slots, x), a.dtype)
        n, rank = x.shape[0], a.shape[1]
        conv = F.conv1d if x.dim() == 3 else F.conv2d
        kernels = a.index_select(0, slots).reshape(n * rank, *a.shape[2:])  # (n*R, in, *k)
        down = conv(x_in.reshape(1, -1, *x.shape[2:]), kernels, None, base.stride, base.padding, base.dilation,
                    groups=n)  # (1, n*R, *S')
        up = torch.bmm(b.index_select(0, slots), down.view(n, rank, -1))  # (n, out, prod S')
        return result + up.view(result.shape).to(result.dtype)

    def _conv_stack(self, names: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``A_k`` ``(K+1, R, in, *k)`` and ``s_k B_k`` ``(K+1, out, R)``, ranks zero-padded, zero slot last."""
        kernel = self.lora_A[names[0]].weight.shape[1:]  # (in, *k)
        stack = stack_lora([self.lora_A[n].weight.flatten(1) for n in names],
                           [self.lora_B[n].weight.flatten(1) for n in names], [self.scaling[n] for n in names],
                           [None] * len(names))
        return stack.a.view(stack.a.shape[0], stack.a.shape[1], *kernel), stack.b


def _layer_class(module: nn.Module) -> type[LoraLayer] | None:
    base = unwrapped(module)
    if is_linear_like(base):
        return LoraLinear
    if isinstance(base, nn.Embedding):
        return LoraEmbedding
    if isinstance(base, (nn.Conv1d, nn.Conv2d)) and base.groups == 1:
        return LoraConv
    return None


def can_wrap(module: nn.Module, config: LoraConfig, path: str) -> str | None:
    """Why LoRA with ``config`` cannot wrap ``module`` (``None`` when it can)."""
    cls = _layer_class(module)
    kind = type(unwrapped(module)).__name__
    if cls is None:
        return f"{kind} is not supported (LoRA wraps nn.Linear, Conv1D, nn.Embedding, nn.Conv1d/2d with groups=1)"
    if cls is not LoraLinear and config.use_dora:
        return f"use_dora supports linear layers only, this is an {kind}; exclude it or drop use_dora"
    init = config.init_lora_weights
    if cls is not LoraLinear and init in REWRITES_BASE:
        return f"init_lora_weights={init!r} supports linear layers only, this is an {kind}"
    quantized = quantization(unwrapped(module))
    if init == "loftq":  # bitsandbytes itself is checked once, before targeting (lora.prepare_config)
        return loftq_refusal(module, unwrapped(module), quantized)
    if quantized and init in REWRITES_BASE:
        return (f"init_lora_weights={init!r} rewrites the base weight, which is quantized ({quantized}) here; "
                "initialise on the float model, or use the default initialisation")
    return None


def make_lora_layer(module: nn.Module, config: LoraConfig, name: str, path: str) -> LoraLayer | None:
    """Wrap ``module`` with the LoRA layer for its type, or ``None`` when LoRA cannot wrap it."""
    cls = _layer_class(module)
    if cls is None:
        return None
    return cls.wrapping(module, name, config, path)
