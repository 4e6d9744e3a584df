"""Tiny quantized Llama models for the quantized-base tests, and an independent float reference.

The reference never goes through :mod:`deltatune.weights`: it dequantizes each layer with the
backend's own public function (bitsandbytes ``dequantize_4bit`` / ``int8_vectorwise_dequant``,
torchao ``Tensor.dequantize``) and builds a plain float ``nn.Linear`` from it.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

BACKENDS = ("nf4", "fp4", "int8", "torchao-int8")
VOCAB = 96


def tiny_llama(seed: int = 0) -> nn.Module:
    """Dimensions are multiples of 64, so every 4-bit block and CPU kernel tile is full."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def quantized_llama(kind: str, seed: int = 0) -> nn.Module:
    import deltatune as dt

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dt.quantize(tiny_llama(seed), kind)


def inputs(batch: int = 2, seq: int = 9, seed: int = 5) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (batch, seq), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def dequantized_by_backend(module: nn.Module) -> torch.Tensor | None:
    """``module``'s weight dequantized with the backend's own API, ``(out, in)`` float32; ``None`` if float."""
    names = {c.__name__ for c in type(module).__mro__}
    if "Linear4bit" in names:
        import bitsandbytes.functional as F

        state = module.weight.quant_state
        assert not getattr(state, "packing_format_for_cpu", False), "reference expects the standard layout"
        return F.dequantize_4bit(module.weight.data, state).float()
    if "Linear8bitLt" in names:
        import bitsandbytes.functional as F

        scb = module.weight.SCB if module.weight.SCB is not None else module.state.SCB
        return F.int8_vectorwise_dequant(module.weight.data, scb).float()
    if isinstance(module, nn.Linear) and type(module.weight).__module__.startswith("torchao"):
        return module.weight.dequantize().float()
    return None


def float_reference(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` (no adapters yet) with every quantized linear replaced by a float one."""
    ref = copy.deepcopy(model)
    for path, module in list(ref.named_modules()):
        weight = dequantized_by_backend(module)
        if weight is None:
            continue
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if module.bias is not None:
                linear.bias.copy_(module.bias.float())
        parent, _, child = path.rpartition(".")
        setattr(ref.get_submodule(parent), child, linear)
    return ref


def requantized_by_backend(kind: str, weight: torch.Tensor) -> torch.Tensor:
    """``dequantize(quantize(weight))`` with the backend's own API (what a merged layer must hold)."""
    if kind in ("nf4", "fp4"):
        import bitsandbytes.functional as F

        codes, state = F.quantize_4bit(weight.float(), blocksize=64, compress_statistics=True, quant_type=kind)
        return F.dequantize_4bit(codes, state).float()
    if kind == "int8":
        import bitsandbytes.functional as F

        codes, scales, _ = F.int8_vectorwise_quant(weight.half())  # Int8Params quantizes from float16
        return F.int8_vectorwise_dequant(codes, scales).float()
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        linear.weight.copy_(weight)
    quantize_(linear, Int8WeightOnlyConfig())
    return linear.weight.dequantize().float()


def count_dequantizations(monkeypatch) -> list[int]:
    """Count calls of :func:`deltatune.quant.bnb_training.dequantize` from now on: ``calls[0]`` (a 4-bit weight
    dequantized once per call)."""
    from deltatune.quant import bnb_training

    calls = [0]
    original = bnb_training.dequantize

    def counted(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(bnb_training, "dequantize", counted)
    return calls
