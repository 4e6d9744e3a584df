"""``without_peft_identity()``: DeltaModels built inside keep their own class (no peft import for them);
outside, they are ``peft.PeftModel`` instances again (what transformers' Trainer and TRL test for)."""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from deltatune.integrations.peft_identity import without_peft_identity

peft = pytest.importorskip("peft")


def test_models_built_inside_are_plain_and_behave_the_same(make_model) -> None:
    config = dt.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)
    with without_peft_identity():
        torch.manual_seed(0)
        plain = dt.get_delta_model(make_model("llama_lm"), config)
    torch.manual_seed(0)
    recognised = dt.get_delta_model(make_model("llama_lm"), config)
    assert type(plain) is dt.DeltaModel and not isinstance(plain, peft.PeftModel)
    assert isinstance(recognised, peft.PeftModel) and isinstance(recognised, dt.DeltaModel)
    inputs = make_model.inputs("llama_lm")
    with torch.no_grad():
        torch.testing.assert_close(plain(**inputs).logits, recognised(**inputs).logits, atol=0, rtol=0)


def test_the_scope_is_restored_after_an_error(make_model) -> None:
    with pytest.raises(RuntimeError), without_peft_identity():
        raise RuntimeError("boom")
    assert isinstance(dt.get_delta_model(make_model("mlp"), dt.LoraConfig(r=2, target_modules=["fc1"])), peft.PeftModel)
