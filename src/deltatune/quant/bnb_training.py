"""bitsandbytes 4-bit linear layers in training: one dequantization fewer per step under gradient checkpointing.

A 4-bit layer computes ``y = x W^T + b`` with ``W = dequant(q, absmax)`` (QLoRA, Dettmers et al., arXiv
2305.14314; ``absmax`` itself 8-bit with double quantisation) and, for the input gradient that adapters
below it need, ``dx = dy W``. bitsandbytes' ``MatMul4Bit`` keeps only the codes ``q`` and dequantizes
``W`` again in backward. Under gradient checkpointing (Chen et al., arXiv 1604.06174) a checkpointed
block's forward runs twice, so ``W`` is dequantized three times per step: forward, recompute, backward.

:class:`Dequantized4bitMatmul` computes the same numbers with the same bitsandbytes calls
(``dequantize_4bit``, then ``F.linear`` / ``matmul``), and *inside a checkpointed region* saves the
dequantized ``W`` for backward: the checkpoint drops what the first forward saves and keeps what the
recompute saves until that block's backward, so ``W`` is dequantized twice per step and at most one
block's float weights live at a time, while the block is recomputed for its backward. Outside
checkpointing it saves only the codes (keeping ``W`` would hold every layer's float weight until
backward) and dequantizes in backward, as bitsandbytes does.

"Inside a checkpointed region" is known from a flag that :func:`flag_checkpointed_layers` sets around
each checkpointed layer's function, in its forward and in its recompute alike (the two runs must save
the same tensors). :func:`use_training_matmul` gives the model's 4-bit layers the class
:class:`TrainingLinear4bit` (a ``bnb.nn.Linear4bit`` subclass: every ``isinstance`` check, state dict
and accessor sees a ``Linear4bit``), whose forward uses :class:`Dequantized4bitMatmul` when it trains on
CPU and calls bitsandbytes' own forward otherwise. Importing this module imports bitsandbytes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import bitsandbytes as bnb
import torch
import torch.nn.functional as F
from torch import nn

_FLAG = threading.local()


def in_checkpointed_region() -> bool:
    """Whether the current forward runs inside a layer checkpointed by :func:`flag_checkpointed_layers`."""
    return getattr(_FLAG, "depth", 0) > 0


@contextmanager
def _checkpointed() -> Iterator[None]:
    _FLAG.depth = getattr(_FLAG, "depth", 0) + 1
    try:
        yield
    finally:
        _FLAG.depth -= 1


class _FlaggedCheckpoint:
    """A checkpointing function (``checkpoint(function, *args, **kwargs)``) whose ``function`` runs with the
    checkpointed-region flag set, in the forward pass and again when the backward pass recomputes it."""

    def __init__(self, checkpoint: Callable[..., Any]) -> None:
        self.checkpoint = checkpoint

    def __call__(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        def flagged(*inner: Any, **inner_kwargs: Any) -> Any:
            with _checkpointed():
                return function(*inner, **inner_kwargs)

        return self.checkpoint(flagged, *args, **kwargs)


def flag_checkpointed_layers(model: nn.Module) -> int:
    """Wrap the checkpointing function transformers gave each layer (``_gradient_checkpointing_func``) so that
    4-bit layers know they run checkpointed; returns how many were wrapped (wrapping twice is a no-op)."""
    wrapped = 0
    for module in model.modules():
        func = module.__dict__.get("_gradient_checkpointing_func")
        if func is not None and not isinstance(func, _FlaggedCheckpoint):
            module._gradient_checkpointing_func = _FlaggedCheckpoint(func)
            wrapped += 1
    return wrapped


def dequantize(codes: torch.Tensor, state: Any, dtype: torch.dtype) -> torch.Tensor:
    """``W = code[q] * absmax`` as ``(out, in)`` in ``dtype``, with bitsandbytes' own kernels, the way its
    ``gemm_4bit`` does (double-quantised ``absmax``: ``code2[absmax8] * absmax2 + offset``, blocks of 256)."""
    absmax = state.absmax
    if state.nested:
        absmax = torch.ops.bitsandbytes.dequantize_blockwise.default(
            state.absmax, state.state2.absmax, state.state2.code, state.state2.blocksize, torch.float32) + state.offset
    return torch.ops.bitsandbytes.dequantize_4bit.default(codes, absmax, state.blocksize, state.quant_type,
                                                          state.shape, dtype)


class Dequantized4bitMatmul(torch.autograd.Function):
    """``y = x W^T (+ b)``, ``dx = dy W`` with ``W`` dequantized by bitsandbytes; ``W`` is saved for backward
    only when ``keep`` (inside a checkpointed region, see the module docstring). ``b`` gets no gradient.

    The numbers are bitsandbytes' (``MatMul4Bit`` on CPU): forward dequantizes to ``x``'s dtype,
    backward to the weight's original dtype, then casts to the gradient's; ``W`` is kept only where the
    two are the same tensor (``keep`` with equal dtypes)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, codes: torch.Tensor, state: Any, bias: torch.Tensor | None,
                keep: bool) -> torch.Tensor:
        weight = dequantize(codes, state, x.dtype)  # (out, in)
        ctx.state, ctx.keep = state, keep and state.dtype == x.dtype
        ctx.save_for_backward(weight if ctx.keep else codes)
        return F.linear(x, weight, bias)  # (..., out)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None, None]:
        (saved,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        weight = saved if ctx.keep else dequantize(saved, ctx.state, ctx.state.dtype)  # (out, in)
        return torch.matmul(grad, weight.to(grad.dtype)), None, None, None, None  # (..., in)


class TrainingLinear4bit(bnb.nn.Linear4bit):
    """``bnb.nn.Linear4bit`` whose training forward on CPU is :class:`Dequantized4bitMatmul` (same numbers)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bnb.nn.modules.fix_4bit_weight_quant_state_from_module(self)
        state, bias = self.weight.quant_state, self.bias
        if (x.device.type != "cpu" or not torch.is_grad_enabled() or not x.requires_grad
                or getattr(state, "packing_format_for_cpu", False) or (bias is not None and bias.requires_grad)
                or self.compute_dtype is None or x.shape[-1] != state.shape[1]):
            return super().forward(x)
        inp_dtype = x.dtype
        x = x.to(self.compute_dtype)
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        out = Dequantized4bitMatmul.apply(x, self.weight.data, state, bias, in_checkpointed_region())
        return out.to(inp_dtype)


def use_training_matmul(model: nn.Module) -> int:
    """Give each plain ``bnb.nn.Linear4bit`` of ``model`` the class :class:`TrainingLinear4bit` and flag
    its checkpointed layers (:func:`flag_checkpointed_layers`); returns how many 4-bit layers changed."""
    changed = 0
    for module in model.modules():
        if type(module) is bnb.nn.Linear4bit:
            module.__class__ = TrainingLinear4bit
            changed += 1
    flag_checkpointed_layers(model)
    return changed
