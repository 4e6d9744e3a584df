"""Quantized token embedding and tied LM head (``dt.quantize(..., embeddings=True)``), and
``prepare_for_kbit_training``'s default gradient checkpointing.

References are independent of :mod:`deltatune.quant.embedding`: bitsandbytes' own 4-bit
quantize/dequantize for NF4/FP4, the row-wise int8 formula written here, and a model whose float
embedding (tied to its head) holds the dequantized values, run by transformers itself.
"""

from __future__ import annotations

import copy
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _quant_models import inputs

import deltatune as dt
from deltatune.quant.embedding import QuantizedEmbedding, TiedQuantizedHead

pytestmark = pytest.mark.filterwarnings("ignore")
VOCAB = 200  # not a multiple of the head's chunk: the last chunk is partial
KINDS = ("nf4", "fp4", "int8", "torchao-int8")


def tied_llama(seed: int = 0, hidden: int = 64) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True, pad_token_id=0)
    model = LlamaForCausalLM(cfg).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def quantized(model: nn.Module, kind: str, embeddings: bool) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dt.quantize(copy.deepcopy(model), kind, embeddings=embeddings)


def reference_rows(weight: torch.Tensor, kind: str) -> torch.Tensor:
    """The embedding as the test's own references quantize and dequantize it."""
    if kind in ("int8", "torchao-int8"):
        scale = weight.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127.0  # (rows, 1); a zero row stays 0
        return torch.round(weight / scale).clamp(-127, 127) * scale
    import bitsandbytes.functional as F

    packed, state = F.quantize_4bit(weight.float(), blocksize=64, compress_statistics=False, quant_type=kind)
    return F.dequantize_4bit(packed, state).float()


@pytest.mark.parametrize("kind", KINDS)
def test_embedding_storage_matches_the_reference_quantizer(kind: str) -> None:
    weight = torch.randn(300, 128) * torch.linspace(0.01, 2.0, 300)[:, None]  # rows of very different scale
    module = QuantizedEmbedding(nn.Embedding.from_pretrained(weight), kind)
    ours, ref = module.dequantized(), reference_rows(weight, kind)
    # the same code for (almost) every value: a value exactly between two codes may round either way
    step = weight.abs().amax(dim=1, keepdim=True) * (1 / 127 if "int8" in kind else 0.25)
    assert ((ours - ref).abs() <= 1e-5 * step.clamp_min(1)).float().mean() > 0.999
    assert ((ours - ref).abs() <= step).all()
    stored = module.weight.numel() * module.weight.element_size() + module.scales.numel() * 4
    assert stored == (300 * 128 // 2 + 300 * 2 * 4 if kind in ("nf4", "fp4") else 300 * 128 + 300 * 4)
    ids = torch.tensor([[3, 0, 299], [7, 7, 150]])
    assert torch.equal(module(ids), ours[ids])  # a lookup dequantizes only the rows asked for, identically


@pytest.mark.parametrize("kind", KINDS)
def test_tied_quantized_head_computes_like_a_float_tied_model(kind: str) -> None:
    base = tied_llama()
    model = quantized(base, kind, embeddings=True)
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert isinstance(embedding, QuantizedEmbedding) and isinstance(head, TiedQuantizedHead)
    assert head.embedding is embedding and not list(head.parameters())  # one storage, held by the embedding
    # reference: linear layers quantized the same way, a float tied embedding holding the dequantized values
    ref = quantized(base, kind, embeddings=False)
    with torch.no_grad():
        ref.model.embed_tokens.weight.copy_(reference_rows(base.model.embed_tokens.weight, kind))
    assert ref.lm_head.weight is ref.model.embed_tokens.weight
    batch = inputs()
    with torch.no_grad():
        ours, theirs = model(**batch).logits, ref(**batch).logits
    torch.testing.assert_close(ours, theirs, atol=1e-3 if kind in ("nf4", "fp4") else 1e-4, rtol=0)
    # LoRA gradients through the quantized head's custom backward match autograd through the float head
    grads = []
    for m in (model, ref):
        torch.manual_seed(1)
        delta = dt.get_delta_model(m, dt.LoraConfig(r=4, target_modules=["q_proj", "down_proj"],
                                                    init_lora_weights=False))
        delta.train()
        delta(**batch, labels=batch["input_ids"]).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in delta.parameters() if p.requires_grad]))
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], atol=2e-3 if kind in ("nf4", "fp4") else 2e-4, rtol=1e-2)


def test_weight_memory_fingerprint_merge_and_dequantize_with_a_quantized_embedding() -> None:
    from bench.quantized import weight_bytes

    base = tied_llama()
    plain, emb = quantized(base, "nf4", embeddings=False), quantized(base, "nf4", embeddings=True)
    vocab_fp32 = VOCAB * 64 * 4
    assert weight_bytes(plain) - weight_bytes(emb) == vocab_fp32 - (VOCAB * 64 // 2 + VOCAB * 4)
    # fingerprints: the same quantization twice agrees; float vs quantized embedding is told apart
    fp = [dt.get_delta_model(m, dt.LoraConfig(r=2, target_modules=["q_proj"])).base_fingerprint("default")
          for m in (emb, quantized(base, "nf4", embeddings=True), plain)]
    assert fp[0]["sha256"] == fp[1]["sha256"] and fp[0]["num_parameters"] == fp[2]["num_parameters"]
    assert fp[0]["quantization"] == "embedding-nf4+nf4" and fp[2]["quantization"] == "nf4"
    # merge into the nf4 linears works and is measured; the embedding is untouched
    model = quantized(base, "nf4", embeddings=True)
    delta = dt.get_delta_model(model, dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    batch = inputs()
    with torch.no_grad():
        before = delta(**batch).logits
    codes = model.model.embed_tokens.weight.clone()
    merged = delta.merge_and_unload()
    assert delta.merge_report.max_logit_error < 0.5
    assert torch.equal(merged.model.embed_tokens.weight, codes)
    # dequantize: float embedding, head tied to it again, same logits as the merged quantized model
    with torch.no_grad():
        after = merged(**batch).logits
    assert 0 < float((after - before).abs().max()) < 1.0  # re-quantization error, as on the probe batch
    floats = dt.dequantize(merged)
    assert type(floats.model.embed_tokens) is nn.Embedding and type(floats.lm_head) is nn.Linear
    assert floats.lm_head.weight is floats.model.embed_tokens.weight
    with torch.no_grad():
        torch.testing.assert_close(floats(**batch).logits, after, atol=5e-2, rtol=0)


def test_a_peft_lora_on_the_quantized_embedding_model_matches_deltatune(tmp_path: Path) -> None:
    from peft import PeftModel

    base = tied_llama()
    torch.manual_seed(2)
    delta = dt.get_delta_model(quantized(base, "int8", embeddings=True),
                               dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    delta.save_pretrained(tmp_path / "adapter")
    peft_model = PeftModel.from_pretrained(quantized(base, "int8", embeddings=True), tmp_path / "adapter")
    delta.train()  # as in test_quant_interop: bitsandbytes' CPU inference kernel differs from its training path
    peft_model.train()
    batch = inputs()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(**batch).logits, delta(**batch).logits, atol=1e-5, rtol=0)


def test_untied_head_stays_float_and_bad_widths_are_refused() -> None:
    from _quant_models import tiny_llama

    model = quantized(tiny_llama(), "nf4", embeddings=True)  # tie_word_embeddings=False
    assert isinstance(model.get_input_embeddings(), QuantizedEmbedding)
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight.dtype == torch.float32
    odd = tied_llama(hidden=48)  # 48 values per row: no whole 64-value block
    with pytest.raises(dt.quant.QuantizationError, match="divisible by 64.*int8"):
        quantized(odd, "nf4", embeddings=True)
    assert isinstance(quantized(odd, "int8", embeddings=True).get_input_embeddings(), QuantizedEmbedding)


def test_prepare_for_kbit_training_turns_checkpointing_on_by_default_as_peft_does() -> None:
    model = dt.prepare_for_kbit_training(quantized(tied_llama(), "nf4", embeddings=True))
    assert model.is_gradient_checkpointing
    delta = dt.get_delta_model(model, dt.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    delta.train()
    batch = inputs()
    delta(**batch, labels=batch["input_ids"]).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in delta.parameters() if p.requires_grad)
    assert not dt.prepare_for_kbit_training(quantized(tied_llama(), "nf4", False), False).is_gradient_checkpointing
    plain = nn.Sequential(nn.Linear(4, 4))  # no checkpointing support: fine by default, an error when asked for
    dt.prepare_for_kbit_training(plain)
    with pytest.raises(dt.quant.QuantizationError, match="use_gradient_checkpointing=False"):
        dt.prepare_for_kbit_training(plain, use_gradient_checkpointing=True)


def test_an_inference_call_before_training_leaves_4bit_training_gradients_intact() -> None:
    """bitsandbytes re-lays-out 4-bit weights at the first CPU inference call on AVX512-BF16 CPUs, and its
    training path then computes different gradients; prepare_for_kbit_training undoes and prevents that."""
    from _quant_models import quantized_llama
    from bitsandbytes.functional import has_avx512bf16

    if not has_avx512bf16():
        pytest.skip("bitsandbytes re-lays-out 4-bit weights only on CPUs with AVX512-BF16")
    batch = inputs()

    def grads(eval_before: bool, eval_after: bool) -> torch.Tensor:
        model = quantized_llama("nf4")
        if eval_before:
            with torch.no_grad():
                model(**batch)  # eval mode, no gradient: re-lays-out every 4-bit weight
        model = dt.prepare_for_kbit_training(model, use_gradient_checkpointing=False)
        torch.manual_seed(0)
        delta = dt.get_delta_model(model, dt.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
        if eval_after:
            delta.eval()
            with torch.no_grad():
                delta(**batch)
        delta.train()
        delta(**batch, labels=batch["input_ids"]).loss.backward()
        return torch.cat([p.grad.flatten() for p in delta.parameters() if p.requires_grad])

    clean = grads(False, False)
    assert torch.equal(grads(False, True), clean)  # no re-layout after prepare_for_kbit_training
    # unpacked again: the same codes, block scales rounded to bfloat16 by the re-layout
    torch.testing.assert_close(grads(True, False), clean, atol=3e-3, rtol=0)
