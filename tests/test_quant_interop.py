"""Quantized bases with the ecosystem: transformers' quantized loading, HF peft both ways, fingerprints.

Tolerance for deltatune vs HF peft on the same quantized base: both run the same bitsandbytes /
torchao kernels and the same float32 LoRA matmuls, so logits agree to float32 rounding (atol 1e-5).
"""

from __future__ import annotations

import copy

import pytest
import torch
from _quant_models import inputs, quantized_llama, tiny_llama

import deltatune as dt

pytestmark = pytest.mark.filterwarnings("ignore")
PEFT_TOL = 1e-5


def _saved_float_model(tmp_path):
    folder = tmp_path / "base"
    tiny_llama(seed=0).save_pretrained(folder)
    return folder


def _hf_quantized(folder, kind: str):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, TorchAoConfig

    if kind == "torchao-int8":
        from torchao.quantization import Int8WeightOnlyConfig

        config = TorchAoConfig(Int8WeightOnlyConfig())
    elif kind == "int8":
        config = BitsAndBytesConfig(load_in_8bit=True)
    else:
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind, bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, device_map="cpu",
                                                dtype=torch.float32).eval()


@pytest.mark.parametrize("kind", ["nf4", "int8", "torchao-int8"])
def test_transformers_quantized_loading_matches_dt_quantize(tmp_path, kind: str) -> None:
    """A base loaded with BitsAndBytesConfig / TorchAoConfig is the model dt.quantize makes: same layers,
    same fingerprint, so an adapter trained on one loads on the other."""
    hf = _hf_quantized(_saved_float_model(tmp_path), kind)
    ours = quantized_llama(kind, seed=0)
    delta = dt.get_delta_model(ours, dt.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    delta.save_pretrained(tmp_path / "adapter")
    loaded = dt.DeltaModel.from_pretrained(hf, tmp_path / "adapter")  # fingerprint check passes
    delta.train()
    loaded.train()
    batch = inputs()
    with torch.no_grad():
        assert torch.allclose(loaded(**batch).logits, delta(**batch).logits, atol=PEFT_TOL)


def test_fingerprint_names_a_different_quantization(tmp_path) -> None:
    delta = dt.get_delta_model(quantized_llama("nf4"), dt.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    delta.save_pretrained(tmp_path)
    dt.DeltaModel.from_pretrained(quantized_llama("nf4"), tmp_path)  # same model, same quantization: loads
    with pytest.raises(dt.BaseModelMismatchError, match="quantization: adapter was trained on a nf4 base, this "
                       "model is int8"):
        dt.DeltaModel.from_pretrained(quantized_llama("int8"), tmp_path)
    with pytest.raises(dt.BaseModelMismatchError, match="this model is float \\(unquantized\\)"):
        dt.DeltaModel.from_pretrained(tiny_llama(), tmp_path)
    with pytest.raises(dt.BaseModelMismatchError, match="different weights"):
        dt.DeltaModel.from_pretrained(quantized_llama("nf4", seed=1), tmp_path)
    dt.DeltaModel.from_pretrained(quantized_llama("fp4"), tmp_path, ignore_base_mismatch=True)


def test_fingerprint_is_the_same_after_an_inference_call_repacks_4bit_weights(tmp_path) -> None:
    """bitsandbytes re-lays-out 4-bit weights for its CPU inference kernel at the first eval call."""
    delta = dt.get_delta_model(quantized_llama("nf4"), dt.LoraConfig(r=2, target_modules=["q_proj"]))
    delta.save_pretrained(tmp_path)
    base = quantized_llama("nf4")
    with torch.no_grad():
        base(**inputs())  # eval mode, no grad: repacked where the CPU has AVX512-BF16
    dt.DeltaModel.from_pretrained(base, tmp_path)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_deltatune_adapter_on_quantized_base_loads_in_peft_with_equal_outputs(tmp_path, kind: str) -> None:
    from peft import PeftModel

    delta = dt.get_delta_model(quantized_llama(kind), dt.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                                       init_lora_weights=False))
    delta.save_pretrained(tmp_path)
    peft_model = PeftModel.from_pretrained(quantized_llama(kind), tmp_path)
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    assert type(layer).__module__ == "peft.tuners.lora.bnb"  # peft's own bitsandbytes LoRA layer
    delta.train()
    peft_model.train()
    batch = inputs()
    with torch.no_grad():
        assert torch.allclose(peft_model(**batch).logits, delta(**batch).logits, atol=PEFT_TOL)


@pytest.mark.parametrize("kind", ["nf4", "fp4"])
def test_peft_qlora_adapter_loads_in_deltatune(tmp_path, kind: str) -> None:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    base = prepare_model_for_kbit_training(quantized_llama(kind), use_gradient_checkpointing=False)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=16, target_modules="all-linear",
                                                 init_lora_weights=False, use_dora=kind == "fp4"))
    peft_model.save_pretrained(tmp_path)
    delta = dt.DeltaModel.from_pretrained(quantized_llama(kind), tmp_path)
    delta.train()
    peft_model.train()
    batch = inputs()
    with torch.no_grad():
        assert torch.allclose(delta(**batch).logits, peft_model(**batch).logits, atol=PEFT_TOL)
    # merged into the quantized base, peft's and deltatune's merged weights agree (both re-quantize once)
    ours = delta.merge_and_unload()
    theirs = copy.deepcopy(peft_model).merge_and_unload() if kind == "nf4" else None
    if theirs is not None:
        from deltatune.weights import param_tensors

        a = ours.model.layers[0].self_attn.q_proj.weight  # may be in bitsandbytes' CPU-kernel layout after the probe
        b = theirs.model.layers[0].self_attn.q_proj.weight
        same = (param_tensors(a)[0].flatten() == b.data.flatten()).float().mean().item()
        assert same > 0.999, same  # the same 4-bit codes, but for values on a rounding boundary
