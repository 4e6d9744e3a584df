"""Layer methods on quantized bases: every (method x backend) cell on a tiny Llama.

Each cell checks, against a float model built from the backend's own dequantized weights:
the adapted quantized model computes the same logits as the same adapter on that float model, a
training step changes the adapter (kept in float32) and nothing of the quantized base.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from _quant_models import (
    BACKENDS,
    dequantized_by_backend,
    float_reference,
    inputs,
    quantized_llama,
    tiny_llama,
)

import deltatune as dt
from deltatune.weights import param_tensors

pytestmark = pytest.mark.filterwarnings("ignore")

METHODS = {
    "lora": lambda: dt.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False),
    "dora": lambda: dt.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True,
                                  init_lora_weights=False),
    "rslora": lambda: dt.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                    use_rslora=True, init_lora_weights=False),
    "ia3": lambda: dt.IA3Config(init_ia3_weights=False),
    "bottleneck": lambda: dt.BottleneckConfig(variant="houlsby", init_weights=False),
}


def _copy_adapter(src: dt.DeltaModel, dst: dt.DeltaModel) -> None:
    dst_params = dict(dst.named_parameters())
    with torch.no_grad():
        for name, p in src.named_parameters():
            if p.requires_grad:
                dst_params[name].copy_(p)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", list(METHODS))
def test_method_on_quantized_base_matches_float_reference_and_trains_only_the_delta(method: str, backend: str) -> None:
    torch.manual_seed(1)
    quantized = quantized_llama(backend)
    reference = float_reference(quantized)
    delta = dt.get_delta_model(quantized, METHODS[method]())
    ref_delta = dt.get_delta_model(reference, METHODS[method]())
    _copy_adapter(delta, ref_delta)
    batch = inputs()
    # Train mode: bitsandbytes' CPU inference kernel (AVX512-BF16) would compute in bfloat16 in eval mode.
    delta.train()
    ref_delta.train()
    out = delta(**batch).logits
    with torch.no_grad():
        expected = ref_delta(**batch).logits
    assert torch.allclose(out, expected, atol=2e-5, rtol=1e-4), (out - expected).abs().max()
    with torch.no_grad(), ref_delta.disable_adapter():
        base_only = ref_delta(**batch).logits
    assert (out - base_only).abs().max() > 1e-3  # the adapter does act

    trainable = [p for p in delta.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    base_before = {n: [t.clone() for t in param_tensors(p)] for n, p in delta.named_parameters() if not p.requires_grad}
    delta_before = [p.detach().clone() for p in trainable]
    opt = torch.optim.SGD(trainable, lr=0.1)
    loss = torch.nn.functional.cross_entropy(out.flatten(0, 1), batch["input_ids"].flatten())
    loss.backward()
    opt.step()
    assert all(not torch.equal(a, p) for a, p in zip(delta_before, trainable) if p.grad is not None)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
    for name, p in delta.named_parameters():
        if not p.requires_grad:
            assert all(torch.equal(a, b) for a, b in zip(base_before[name], param_tensors(p))), name


def test_quantize_swaps_linear_layers_but_not_the_head() -> None:
    from deltatune.quant import quantization

    for kind, expected in [("nf4", "nf4"), ("fp4", "fp4"), ("int8", "int8"), ("torchao-int8", "torchao-int8")]:
        model = quantized_llama(kind)
        kinds = {path: quantization(m) for path, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        assert kinds.pop("lm_head") is None
        assert set(kinds.values()) == {expected} and len(kinds) == 14  # 7 linears x 2 layers
        q = model.model.layers[0].self_attn.q_proj
        assert dequantized_by_backend(q).shape == (64, 64)


def test_nf4_weight_memory_is_a_fraction_of_float32() -> None:
    from deltatune.weights import param_tensors as storage

    float_model = tiny_llama()
    nf4 = quantized_llama("nf4")

    def linear_bytes(model: torch.nn.Module) -> int:
        total = 0
        for name, p in model.named_parameters():
            if "layers" in name and name.endswith("proj.weight"):
                total += sum(t.numel() * t.element_size() for t in storage(p))
        return total

    # 4 bits per weight plus one 8-bit scale per 64 values: ~0.13 of float32 (codes only are counted: 0.125)
    assert linear_bytes(nf4) / linear_bytes(float_model) == pytest.approx(0.125, abs=0.01)


def test_bad_quantize_requests_fail_before_touching_the_model(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from deltatune.quant import QuantizationError

    model = tiny_llama()
    with pytest.raises(QuantizationError, match="choose one of nf4, fp4, int8, torchao-int8"):
        dt.quantize(model, "int4")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(QuantizationError, match=r"pip install 'bitsandbytes>=0.46'"):
        dt.quantize(model, "nf4")
    monkeypatch.undo()
    assert all(type(m) is torch.nn.Linear for m in model.modules() if isinstance(m, torch.nn.Linear))
    wrapped = dt.get_delta_model(model, dt.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(QuantizationError, match="before adding adapters"):
        dt.quantize(wrapped.base_model, "nf4")


def test_pissa_on_a_quantized_base_is_refused_before_anything_changes() -> None:
    model = quantized_llama("nf4")
    with pytest.raises(dt.TargetError, match="pissa.*quantized \\(nf4\\)"):
        dt.get_delta_model(model, dt.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="pissa"))
    assert not any(getattr(m, "_delta_base_child", None) for m in model.modules())


def test_prepare_for_kbit_training_casts_half_precision_and_trains_with_checkpointing() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = tiny_llama().to(torch.bfloat16)
        model = dt.quantize(base, "nf4", compute_dtype=torch.float32)
    model = dt.prepare_for_kbit_training(model, use_gradient_checkpointing=True)
    assert model.model.norm.weight.dtype == torch.float32 and model.lm_head.weight.dtype == torch.float32
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.uint8  # packed 4-bit, untouched
    assert model.is_gradient_checkpointing
    delta = dt.get_delta_model(model, dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    delta.train()
    batch = inputs()
    out = delta(**batch, labels=batch["input_ids"])
    out.loss.backward()
    grads = [p.grad for p in delta.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
