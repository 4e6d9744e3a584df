"""LoftQ (Li et al., arXiv 2310.08659) on GPT-2's ``Conv1D`` layers (weight stored ``(in, out)``).

Reference: the alternation written out below on the transposed weight ``W = W_conv^T`` with bitsandbytes'
own ``quantize_4bit`` / ``dequantize_4bit`` and ``torch.linalg.svd``; the layer that replaces a Conv1D is
checked against the Conv1D's own function ``x W_conv + b`` evaluated on ``dequant(Q)^T``.
"""

from __future__ import annotations

import json

import pytest
import torch
from _loftq_reference import reference_loftq
from torch import nn

import deltatune as dt

pytestmark = pytest.mark.filterwarnings("ignore")
bnb_functional = pytest.importorskip("bitsandbytes.functional")
CONV1DS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
VOCAB = 96


def tiny_gpt2(seed: int = 0) -> nn.Module:
    """Dropout off, so train mode (bitsandbytes' float32 CPU kernel) is deterministic; in_features 64 and 256."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(1, VOCAB, (2, 9), generator=torch.Generator().manual_seed(5))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def loftq_config(r: int = 4, alpha: float = 8, iters: int = 1) -> dt.LoraConfig:
    return dt.LoraConfig(r=r, lora_alpha=alpha, target_modules="all-linear", init_lora_weights="loftq",
                         loftq_config=dt.LoftQConfig(loftq_bits=4, loftq_iter=iters))


def wrapped(delta: dt.DeltaModel) -> dict[str, nn.Module]:
    return {p: m for p, m in delta.get_base_model().named_modules() if p.endswith(CONV1DS) and hasattr(m, "lora_A")}


def test_loftq_on_conv1d_follows_the_alternation_on_the_transposed_weight() -> None:
    from transformers.pytorch_utils import Conv1D

    convs = {p: m for p, m in tiny_gpt2().named_modules() if isinstance(m, Conv1D)}
    config = loftq_config(iters=2)
    delta = dt.get_delta_model(tiny_gpt2(), config)
    assert config.fan_in_fan_out is False  # the targets are now (out, in) bitsandbytes layers, for peft too
    layers = wrapped(delta)
    assert set(layers) == set(convs) and len(layers) == 8
    x = torch.randn(3, 5, 256, generator=torch.Generator().manual_seed(1))
    for path, layer in layers.items():
        conv, base = convs[path], layer.get_base_layer()
        assert "Linear4bit" in {c.__name__ for c in type(base).__mro__} and not layer.fan_in_fan_out
        assert (base.in_features, base.out_features) == tuple(conv.weight.shape)  # Conv1D: (in, out)
        s = layer.scaling["default"]
        _, q, a, b = reference_loftq(conv.weight.detach().T, 4, s, 2)  # (out, in)
        assert not getattr(base.weight.quant_state, "packing_format_for_cpu", False)
        torch.testing.assert_close(bnb_functional.dequantize_4bit(base.weight.data, base.weight.quant_state), q,
                                   atol=1e-6, rtol=0)
        torch.testing.assert_close(layer.lora_A["default"].weight, a, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(layer.lora_B["default"].weight, b, atol=1e-5, rtol=1e-4)
        # the replacement computes the Conv1D's function x W_conv + b, with W_conv = dequant(Q)^T (in, out)
        xi = x[..., : conv.weight.shape[0]]
        conv_of_q = Conv1D(conv.nf, conv.nx)
        with torch.no_grad():
            conv_of_q.weight.copy_(q.T)
            conv_of_q.bias.copy_(conv.bias)
            torch.testing.assert_close(base.train()(xi), conv_of_q(xi), atol=1e-4, rtol=1e-4)
            want = conv_of_q(xi) + s * xi @ a.T @ b.T  # h = x dequant(Q)^T + b + s B A x
            torch.testing.assert_close(layer.train()(xi), want, atol=1e-4, rtol=1e-4)


def test_loftq_gpt2_starts_closer_to_the_float_model_than_plain_nf4() -> None:
    inputs = batch()
    with torch.no_grad():  # train mode: bitsandbytes' float32 CPU kernel (dropout is off)
        want = tiny_gpt2()(**inputs).logits
        nf4 = dt.quantize(tiny_gpt2(), "nf4").train()(**inputs).logits
        got = dt.get_delta_model(tiny_gpt2(), loftq_config(r=8, alpha=16, iters=2)).train()(**inputs).logits
    plain_error, loftq_error = (nf4 - want).pow(2).mean(), (got - want).pow(2).mean()
    assert loftq_error < 0.9 * plain_error, (float(loftq_error), float(plain_error))


def test_loftq_gpt2_adapter_round_trip(tmp_path) -> None:
    """T=1: the adapter loads onto the usual nf4 load of GPT-2 (dt.quantize, and transformers'
    BitsAndBytesConfig, which also quantizes each Conv1D transposed) with the same outputs. T=2: refused there;
    the LoftQ base, dequantized back to Conv1D layers and saved, reloads quantized and fits."""
    from transformers import GPT2LMHeadModel

    from deltatune.quant.load import from_pretrained_quantized

    tiny_gpt2().save_pretrained(tmp_path / "float")
    inputs = batch()
    for iters in (1, 2):
        delta = dt.get_delta_model(tiny_gpt2(), loftq_config(iters=iters)).train()
        optimizer = torch.optim.SGD([p for p in delta.parameters() if p.requires_grad], lr=0.1)
        delta(**inputs, labels=inputs["input_ids"]).loss.backward()
        optimizer.step()  # a QLoRA step: non-zero, moved factors
        with torch.no_grad():
            expected = delta(**inputs).logits
        folder = tmp_path / f"adapter{iters}"
        delta.save_pretrained(folder)
        saved = json.loads((folder / "adapter_config.json").read_text())
        assert saved["init_lora_weights"] is True and saved["fan_in_fan_out"] is False
        if iters == 1:
            bases = [dt.quantize(tiny_gpt2(), "nf4"),
                     from_pretrained_quantized(GPT2LMHeadModel, str(tmp_path / "float"), "nf4")]
        else:
            with pytest.raises(dt.BaseModelMismatchError, match="different weights"):
                dt.DeltaModel.from_pretrained(dt.quantize(tiny_gpt2(), "nf4"), folder)
            float_base = dt.dequantize(delta.unload())
            assert type(float_base.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
            float_base.save_pretrained(tmp_path / "loftq-base")
            bases = [from_pretrained_quantized(GPT2LMHeadModel, str(tmp_path / "loftq-base"), "nf4")]
        for base in bases:
            loaded = dt.DeltaModel.from_pretrained(base, folder).train()
            with torch.no_grad():  # re-quantizing dequant(Q) gives Q's codes; double-quantised scales move by 1e-6
                torch.testing.assert_close(loaded(**inputs).logits, expected, atol=1e-5 if iters == 1 else 1e-3,
                                           rtol=0)
