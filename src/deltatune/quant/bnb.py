"""bitsandbytes backends: 4-bit NF4/FP4 (QLoRA, Dettmers et al., arXiv 2305.14314) and LLM.int8()
(Dettmers et al., arXiv 2208.07339) linear layers.

4-bit: ``W ~ absmax_b * code[q]`` per block ``b`` of ``blocksize`` values (64 unless set; NF4 or FP4 code
book, ``q`` 4 bits, two per byte); with double quantisation the block scales are themselves quantised to 8 bits.
8-bit: ``W ~ SCB[:, None] * q / 127`` with one float scale per output row, ``q`` int8.

Both module types are ``nn.Linear`` subclasses, so layer methods wrap them as they wrap a float
linear layer; only merging goes through :class:`Bnb4bitAccess` / :class:`Bnb8bitAccess`.
bitsandbytes is imported only when a module of its own is met, so deltatune runs without it.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

from ..structure.modules import is_transposed_linear, linear_dims, row_major_weight
from .spec import DEFAULT_BLOCKSIZE, kind_spec


def _class_names(obj: object) -> set[str]:
    return {c.__name__ for c in type(obj).__mro__ if c.__module__.startswith("bitsandbytes")}


def _codes_and_state(weight: Any) -> tuple[torch.Tensor, Any]:
    """The 4-bit codes in bitsandbytes' standard layout and a quant state that dequantizes them, without
    changing ``weight``.

    On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight at its first inference call (codes
    re-ordered, block scales un-nested and rounded to bfloat16); its kernel then computes with those
    scales. The codes are unpacked again here and the bfloat16 scales kept, so reading gives the weight
    the kernel uses, and the weight object stays as it is (a snapshot of it restores exactly).
    """
    state = weight.quant_state
    if not getattr(state, "packing_format_for_cpu", False):
        return weight.data, state
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    state = copy.deepcopy(state)
    state.original_nested = False  # keep the (bf16) block scales the kernel uses; do not re-quantize them
    codes, state = _convert_weight_packed_for_cpu_inverse(weight.data.clone(), state)
    state.absmax = state.absmax.T.reshape(-1).float()  # (K/blocksize, N) -> blocks in row-major order
    return codes, state


class Bnb4bitAccess:
    """``bnb.nn.Linear4bit`` (weight ``Params4bit``: packed ``uint8`` plus a ``quant_state``)."""

    def owns(self, module: nn.Module) -> bool:
        return "Linear4bit" in _class_names(module)

    def kind(self, module: nn.Module) -> str:
        return kind_spec(str(module.weight.quant_type), int(module.weight.blocksize))  # "nf4", "nf4:32"

    def read(self, module: nn.Module) -> torch.Tensor:
        import bitsandbytes as bnb

        codes, state = _codes_and_state(module.weight)
        return bnb.functional.dequantize_4bit(codes, state).float()  # (out, in)

    def write(self, module: nn.Module, weight: torch.Tensor) -> None:
        import bitsandbytes as bnb

        old = module.weight
        device = old.device
        state = old.quant_state  # its dtype: what dequantization returns (the kernel's packing records the original)
        dtype = getattr(state, "original_dtype", None) if getattr(state, "packing_format_for_cpu", False) else state.dtype
        new = bnb.nn.Params4bit(
            weight.detach().to("cpu", dtype), requires_grad=False, blocksize=old.blocksize,
            compress_statistics=old.compress_statistics, quant_type=old.quant_type,
            quant_storage=old.quant_storage, module=module,
        )
        module.weight = new.to(device)  # moving it quantises it

    def owns_param(self, param: torch.Tensor) -> bool:
        return "Params4bit" in _class_names(param)

    def param_tensors(self, param: torch.Tensor) -> list[torch.Tensor]:
        return [_codes_and_state(param)[0]]  # the codes alone: the same however bitsandbytes laid them out

    def param_numel(self, param: torch.Tensor) -> int:
        return math.prod(param.quant_state.shape)


class Bnb8bitAccess:
    """``bnb.nn.Linear8bitLt`` with int8 weights (``has_fp16_weights=False``): int8 rows plus ``SCB``.

    bitsandbytes moves ``SCB`` from the weight into ``module.state`` at the first call; both places are read.
    """

    def owns(self, module: nn.Module) -> bool:
        return "Linear8bitLt" in _class_names(module)

    def kind(self, module: nn.Module) -> str:
        return "int8"

    @staticmethod
    def _scales(module: nn.Module) -> torch.Tensor:
        scb = getattr(module.weight, "SCB", None)
        return scb if scb is not None else module.state.SCB  # (out,)

    def read(self, module: nn.Module) -> torch.Tensor:
        q = module.weight.data  # (out, in) int8
        return q.float() * (self._scales(module).float()[:, None] / 127.0)

    def write(self, module: nn.Module, weight: torch.Tensor) -> None:
        import bitsandbytes as bnb

        device = module.weight.device
        new = bnb.nn.Int8Params(weight.detach().to("cpu", torch.float16 if device.type == "cuda" else torch.float32),
                                requires_grad=False, has_fp16_weights=False)
        self._install(module, new.to(device))

    def snapshot(self, module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        return module.weight, self._scales(module)

    def restore(self, module: nn.Module, kept: tuple[torch.Tensor, torch.Tensor]) -> None:
        weight, scales = kept
        weight.CB, weight.SCB = weight.data, scales
        self._install(module, weight)

    @staticmethod
    def _install(module: nn.Module, weight: torch.Tensor) -> None:
        module.weight = weight
        module.state.CB = None  # the next call takes CB/SCB from the new weight
        module.state.SCB = None

    def owns_param(self, param: torch.Tensor) -> bool:
        return "Int8Params" in _class_names(param)

    def param_tensors(self, param: torch.Tensor) -> list[torch.Tensor]:
        return [param.data]

    def param_numel(self, param: torch.Tensor) -> int:
        return param.numel()


def make_bnb_linear(linear: nn.Module, kind: str, compute_dtype: torch.dtype,
                    blocksize: int = DEFAULT_BLOCKSIZE) -> nn.Module:
    """A bitsandbytes copy of ``linear``: ``kind`` ``"nf4"``/``"fp4"`` (double quantisation, ``blocksize`` values
    per block scale) or ``"int8"``.

    ``linear`` is an ``nn.Linear`` or transformers' ``Conv1D`` (GPT-2), whose ``(in, out)`` weight is quantized
    transposed, ``(out, in)``, as transformers' ``BitsAndBytesConfig`` loading does: ``x W_conv + b`` and
    ``x W_conv^T^T + b`` are the same function, so the bitsandbytes linear layer replaces the ``Conv1D`` as is.
    """
    import bitsandbytes as bnb

    in_features, out_features = linear_dims(linear)
    device, has_bias = linear.weight.device, linear.bias is not None
    data = row_major_weight(linear).detach().to("cpu").contiguous()  # (out, in)
    if kind == "int8":
        module = bnb.nn.Linear8bitLt(in_features, out_features, bias=has_bias,
                                     has_fp16_weights=False, threshold=6.0, device="meta")
        module.weight = bnb.nn.Int8Params(data.float(), requires_grad=False, has_fp16_weights=False)
    else:
        module = bnb.nn.Linear4bit(in_features, out_features, bias=has_bias, compute_dtype=compute_dtype,
                                   compress_statistics=True, quant_type=kind, device="meta")
        module.weight = bnb.nn.Params4bit(data.to(compute_dtype), requires_grad=False, compress_statistics=True,
                                          quant_type=kind, blocksize=blocksize, module=module)
        if in_features % blocksize:
            # bitsandbytes' CPU inference re-layout (AVX512-BF16) reshapes the block scales to (out, in / blocksize)
            # and fails when blocks straddle rows (SmolLM2: in 576, blocksize 128); its generic kernel handles them
            module.support_avx512bf16_for_cpu = False
    if has_bias:
        module.bias = nn.Parameter(linear.bias.detach().to("cpu", compute_dtype), requires_grad=False)
    if is_transposed_linear(linear):
        module.source_cls = type(linear)  # transformers' record of a Conv1D's layer; dequantize restores it
    return module.to(device)  # moving the weight quantises it


def keep_training_layout(model: nn.Module) -> int:
    """Keep ``model``'s 4-bit weights in bitsandbytes' standard layout, so training is correct after
    inference calls; returns how many weights were unpacked.

    On CPUs with AVX512-BF16, bitsandbytes (0.50) re-lays-out a 4-bit weight at its first inference
    call (eval mode, no gradient) for a faster kernel. Training after that goes wrong: on a tiny Llama
    the loss moves by 4e-5 but LoRA gradients by up to 0.09 (largest 0.23), and on SmolLM2-135M LoRA
    barely trained (16 steps: loss 4.50 -> 4.47, vs 3.97 -> 3.41 on the float base; bench/quantized.py
    with a perplexity evaluated before training). Here every repacked weight is unpacked
    again (the codes and the bfloat16 block scales the kernel used) and the re-layout is switched off,
    so evaluation during training (eval loops, perplexity before training) leaves training intact.
    Inference then runs the generic kernel: slower on such CPUs, the same numbers as in training.
    """
    unpacked = 0
    for module in model.modules():
        if "Linear4bit" not in _class_names(module):
            continue
        module.support_avx512bf16_for_cpu = False
        weight = module.weight
        if getattr(weight.quant_state, "packing_format_for_cpu", False):
            codes, state = _codes_and_state(weight)
            state.packing_format_for_cpu = False
            weight.data, weight.quant_state = codes, state
            unpacked += 1
    return unpacked
