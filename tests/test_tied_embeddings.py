"""LoRA and modules_to_save on an input embedding tied to the output head (SmolLM2-style models).

References: an *untied* copy of the base whose embedding and head weights are set by the formula in the
test, and HF peft 0.21 (file layout; files load in either library with equal outputs).
"""

from __future__ import annotations

import peft
import pytest
import torch
import transformers as tf
from safetensors.torch import load_file

import deltatune as dt

IDS = torch.tensor([[5, 17, 42, 8, 99, 23]])


def _tied(tie: bool = True) -> tf.LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=40, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, tie_word_embeddings=tie, max_position_embeddings=64)
    return tf.LlamaForCausalLM(cfg).eval()


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _untied_reference(embedding: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    """Logits of the base with its input embedding and output head set to the given matrices, untied."""
    model = _tied(tie=False)
    model.load_state_dict({k: v for k, v in _tied().state_dict().items() if k != "lm_head.weight"}, strict=False)
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(embedding)
        model.lm_head.weight.copy_(head)
    return _logits(model)


def _lora(tying: bool) -> dt.LoraConfig:
    return dt.LoraConfig(r=2, lora_alpha=4, target_modules=["embed_tokens"], init_lora_weights=False,
                         ensure_weight_tying=tying)


def _updated_embedding(model: dt.DeltaModel) -> tuple[torch.Tensor, torch.Tensor]:
    layer = model.base_model.model.model.embed_tokens
    a, b = layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]  # (r, V), (d, r)
    base = layer.get_base_layer().weight.detach().clone()
    return base, base + (4 / 2) * (b @ a).T.detach()  # E, E + s (B A)^T


def test_lora_with_weight_tying_acts_on_both_sides_and_merges_once() -> None:
    model = dt.get_delta_model(_tied(), _lora(True))
    base, updated = _updated_embedding(model)
    out = _logits(model)
    torch.testing.assert_close(out, _untied_reference(updated, updated), atol=1e-5, rtol=1e-5)
    model.merge_adapter()
    torch.testing.assert_close(_logits(model), out, atol=1e-5, rtol=1e-5)
    assert model.base_model.lm_head.weight is model.base_model.model.model.embed_tokens.weight  # still tied
    torch.testing.assert_close(model.base_model.model.model.embed_tokens.weight, updated, atol=1e-6, rtol=0)
    model.unmerge_adapter()
    torch.testing.assert_close(model.base_model.model.model.embed_tokens.weight, base, atol=1e-6, rtol=0)
    torch.testing.assert_close(_logits(model), out, atol=1e-5, rtol=1e-5)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(trainable) == ["base_model.model.embed_tokens.lora_embedding_A.default",
                                 "base_model.model.embed_tokens.lora_embedding_B.default"]


def test_lora_without_weight_tying_keeps_the_head_and_refuses_to_merge() -> None:
    model = dt.get_delta_model(_tied(), _lora(False))
    base, updated = _updated_embedding(model)
    torch.testing.assert_close(_logits(model), _untied_reference(updated, base), atol=1e-5, rtol=1e-5)
    with pytest.raises(dt.MergeError, match="ensure_weight_tying=True"):
        model.merge_adapter()


@pytest.mark.parametrize("tying", [True, False])
def test_tied_lora_files_match_peft_both_ways(tying: bool, tmp_path) -> None:
    ours = dt.get_delta_model(_tied(), _lora(tying))
    expected = _logits(ours)
    ours.save_pretrained(tmp_path / "ours")
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["embed_tokens"], init_lora_weights=False,
                          ensure_weight_tying=tying)
    torch.manual_seed(3)
    made_by_peft = peft.get_peft_model(_tied(), cfg)
    peft_out = _logits(made_by_peft)
    made_by_peft.save_pretrained(tmp_path / "peft")
    our_keys = set(load_file(tmp_path / "ours" / "adapter_model.safetensors"))
    peft_keys = set(load_file(tmp_path / "peft" / "adapter_model.safetensors"))
    assert our_keys - {k for k in peft_keys if k.endswith("base_layer.weight")} == peft_keys - {
        k for k in peft_keys if k.endswith("base_layer.weight")}
    assert ("base_model.model.lm_head.lora_A.weight" in our_keys) == tying
    theirs = peft.PeftModel.from_pretrained(_tied(), tmp_path / "ours")
    torch.testing.assert_close(_logits(theirs), expected, atol=1e-5, rtol=1e-5)
    loaded = dt.DeltaModel.from_pretrained(_tied(), tmp_path / "peft")
    torch.testing.assert_close(_logits(loaded), peft_out, atol=1e-5, rtol=1e-5)


def test_modules_to_save_on_a_tied_embedding_matches_peft(tmp_path) -> None:
    model = dt.get_delta_model(_tied(), dt.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["embed_tokens"]))
    wrapper = model.base_model.model.model.embed_tokens
    with torch.no_grad():
        wrapper.modules_to_save["default"].weight.add_(0.5)
    base = wrapper.original_module.weight.detach().clone()
    out = _logits(model)
    # the trained copy feeds the input side; the head keeps the base embedding (HF peft's default)
    torch.testing.assert_close(out, _untied_reference(base + 0.5, base), atol=1e-5, rtol=1e-5)
    model.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(_tied(), tmp_path)
    torch.testing.assert_close(_logits(theirs), out, atol=1e-5, rtol=1e-5)
    loaded = dt.DeltaModel.from_pretrained(_tied(), tmp_path)
    torch.testing.assert_close(_logits(loaded), out, atol=1e-5, rtol=1e-5)
