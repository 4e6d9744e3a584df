"""Mixture-of-experts models: LoRA on 3-D expert weights (``target_parameters``), routers, bad input.

HF peft 0.21 is the reference: the same file loads in either library with equal outputs, and the
per-expert update is checked against the formula ``W_e + (alpha / r) B_e A_e`` written here.
"""

from __future__ import annotations

import peft
import pytest
import torch
from _zoo import tiny_inputs, tiny_model

import deltatune as dt
from deltatune.layer import DeltaLayer

EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]


def _logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def _random_lora(**kw) -> dt.LoraConfig:
    return dt.LoraConfig(r=2, lora_alpha=4, target_modules=[], target_parameters=EXPERTS, init_lora_weights=False, **kw)


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])  # (E, out, in) and transposed (E, in, out) experts
def test_expert_lora_matches_the_formula_and_merges(family: str) -> None:
    base = tiny_model(family)
    inputs = tiny_inputs(family)
    reference = _logits(base, inputs)
    weights = {n: p.detach().clone() for n, p in base.named_parameters() if p.dim() == 3}
    model = dt.get_delta_model(base, _random_lora())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    out = _logits(model, inputs)
    assert not torch.allclose(out, reference, atol=1e-4)
    layer = model.base_model.model.model.layers[0].mlp.experts
    transposed = getattr(layer.get_base_layer(), "is_transposed", False)
    model.merge_adapter()
    for param in ("gate_up_proj", "down_proj"):
        experts = weights[f"model.layers.0.mlp.experts.{param}"].shape[0]
        a = layer.lora_A["default"][param].weight  # (r * E, in): expert e in rows e*r .. e*r + r
        b = layer.lora_B["default"][param].weight  # (out, r * E): expert e in columns j * E + e
        merged = getattr(layer.get_base_layer(), param)
        for e in range(experts):
            a_e = a[e * 2:(e + 1) * 2]  # (r, in)
            b_e = b[:, [j * experts + e for j in range(2)]]  # (out, r)
            update = (4 / 2) * b_e @ a_e  # (out, in)
            expected = weights[f"model.layers.0.mlp.experts.{param}"][e] + (update.T if transposed else update)
            torch.testing.assert_close(merged[e], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_logits(model, inputs), out, atol=1e-4, rtol=1e-4)
    model.unmerge_adapter()
    with model.disable_adapter():
        torch.testing.assert_close(_logits(model, inputs), reference, atol=1e-5, rtol=1e-5)


def test_expert_lora_files_load_in_peft_and_back(tmp_path) -> None:
    inputs = tiny_inputs("mixtral")
    ours = dt.get_delta_model(tiny_model("mixtral"), _random_lora())
    expected = _logits(ours, inputs)
    ours.save_pretrained(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(tiny_model("mixtral"), tmp_path / "ours")
    torch.testing.assert_close(_logits(theirs, inputs), expected, atol=1e-5, rtol=1e-5)

    torch.manual_seed(1)
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=[], target_parameters=EXPERTS, init_lora_weights=False)
    made_by_peft = peft.get_peft_model(tiny_model("mixtral"), cfg)
    peft_out = _logits(made_by_peft, inputs)
    made_by_peft.save_pretrained(tmp_path / "peft")
    loaded = dt.DeltaModel.from_pretrained(tiny_model("mixtral"), tmp_path / "peft")
    torch.testing.assert_close(_logits(loaded, inputs), peft_out, atol=1e-5, rtol=1e-5)


def test_experts_and_attention_together_and_a_second_adapter(tmp_path) -> None:
    inputs = tiny_inputs("qwen3_moe")
    cfg = dt.LoraConfig(r=2, target_parameters=EXPERTS, init_lora_weights=False)  # default targets (q, v) too
    model = dt.get_delta_model(tiny_model("qwen3_moe"), cfg)
    wrapped = {p.split(".", 3)[-1] for p, m in model.base_model.named_modules() if isinstance(m, DeltaLayer)}
    assert wrapped == {"self_attn.q_proj", "self_attn.v_proj", "mlp.experts"}
    model.add_adapter("other", _random_lora())
    model.set_adapter("other")
    expected = _logits(model, inputs)
    model.save_pretrained(tmp_path)  # non-default adapters go to a sub-folder, as in HF peft
    loaded = dt.DeltaModel.from_pretrained(tiny_model("qwen3_moe"), tmp_path / "other", adapter_name="other")
    torch.testing.assert_close(_logits(loaded, inputs), expected, atol=1e-5, rtol=1e-5)


def test_router_is_trained_in_full_with_modules_to_save(tmp_path) -> None:
    inputs = tiny_inputs("mixtral")
    model = dt.get_delta_model(tiny_model("mixtral"), dt.LoraConfig(r=2, modules_to_save=["mlp.gate"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n in trainable if ".gate." in n} == {
        f"base_model.model.layers.{i}.mlp.gate.modules_to_save.default.weight" for i in (0, 1)}
    with torch.no_grad():
        model.base_model.model.model.layers[0].mlp.gate.modules_to_save["default"].weight.add_(1.0)
    expected = _logits(model, inputs)
    model.save_pretrained(tmp_path)
    loaded = dt.DeltaModel.from_pretrained(tiny_model("mixtral"), tmp_path)
    torch.testing.assert_close(_logits(loaded, inputs), expected, atol=1e-6, rtol=0)


def test_target_parameters_bad_input_is_refused_before_anything_changes() -> None:
    base = tiny_model("mixtral")
    keys = set(base.state_dict())
    with pytest.raises(dt.TargetError, match=r"name no parameter.*experts\.gate_up_proj"):
        dt.get_delta_model(base, dt.LoraConfig(target_modules=[], target_parameters=["experts.up_proj"]))
    with pytest.raises(dt.TargetError, match=r"2-D parameter of shape \(4, 32\).*modules_to_save"):
        dt.get_delta_model(base, dt.LoraConfig(target_modules=[], target_parameters=["mlp.gate.weight"]))
    with pytest.raises(dt.ConfigError, match="lora_dropout"):
        dt.get_delta_model(base, dt.LoraConfig(target_modules=[], target_parameters=EXPERTS, lora_dropout=0.1))
    assert set(base.state_dict()) == keys
    with pytest.raises(dt.TargetError, match="no mixture-of-experts weights"):
        dt.get_delta_model(tiny_model("llama"), dt.LoraConfig(target_parameters=["experts.down_proj"]))
