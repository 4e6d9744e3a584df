"""``DeltaModel.base_model`` has HF peft's tuner shape, and module-tree names still resolve.

Checked against HF peft's own ``PeftModel`` built on the same tiny Llama: ``base_model.model`` is the wrapped
causal LM in both, ``base_model.model.model.layers[0]`` reaches the same layer, and calling ``base_model``
runs the wrapped model with its adapters. ``get_parameter`` / ``get_submodule`` / ``set_submodule`` take the
names ``named_parameters()`` / ``named_modules()`` give.
"""

from __future__ import annotations

import copy

import pytest
import torch

import deltatune as dt
from deltatune.base_model_view import BaseModelView

peft = pytest.importorskip("peft")
LORA = {"r": 2, "target_modules": ["q_proj"]}


def test_base_model_has_peft_shape(make_model) -> None:
    inner = make_model("llama_lm")
    ours = dt.get_delta_model(inner, dt.LoraConfig(init_lora_weights=False, **LORA))
    theirs = peft.get_peft_model(make_model("llama_lm"), peft.LoraConfig(**LORA))
    assert isinstance(ours.base_model, BaseModelView) and ours.base_model is ours.base_model
    assert ours.base_model.model is inner is ours.get_base_model()
    assert type(ours.base_model.model).__name__ == type(theirs.base_model.model).__name__ == "LlamaForCausalLM"
    assert ours.base_model.model.model.layers[0].self_attn.q_proj is inner.model.layers[0].self_attn.q_proj
    assert ours.base_model.config is inner.config  # other attributes are the wrapped model's
    ours.base_model.some_flag = 3
    assert inner.some_flag == 3
    inputs = make_model.inputs("llama_lm")
    with torch.no_grad():
        torch.testing.assert_close(ours.base_model(**inputs).logits, ours(**inputs).logits, atol=0, rtol=0)
        with ours.disable_adapter():
            plain = ours(**inputs).logits
        assert (ours.base_model(**inputs).logits - plain).abs().max() > 1e-4  # the adapter acts through the view


def test_module_tree_names_resolve(make_model) -> None:
    model = dt.get_delta_model(make_model("llama_lm"), dt.LoraConfig(**LORA))
    for name, param in model.named_parameters():
        assert model.get_parameter(name) is param
    for name, module in model.named_modules():
        assert model.get_submodule(name) is module
    path = "base_model.model.layers.1.mlp.down_proj"
    replacement = torch.nn.Linear(40, 32)
    model.set_submodule(path, replacement)
    assert model.get_base_model().model.layers[1].mlp.down_proj is replacement


def test_copies_view_their_own_wrapped_model(make_model) -> None:
    model = dt.get_delta_model(make_model("llama_lm"), dt.LoraConfig(**LORA))
    twin = copy.deepcopy(model)
    assert twin.base_model.model is twin.get_base_model() is not model.get_base_model()
    assert twin.get_base_model().__dict__["_deltatune_owner"] is twin  # it saves as the copy's adapter


def test_pickling_keeps_the_classes(make_model, tmp_path) -> None:
    """``torch.save`` of a DeltaModel (a peft subclass made at run time) and of its wrapped transformers model
    (a save-as-adapter subclass) reduce to the named classes and come back as they were."""
    import io

    model = dt.get_delta_model(make_model("llama_lm"), dt.LoraConfig(init_lora_weights=False, **LORA))
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    twin = torch.load(buffer, weights_only=False)  # our own bytes, just written
    assert isinstance(twin, peft.PeftModel) and type(twin).__name__ == "DeltaModel"
    inputs = make_model.inputs("llama_lm")
    with torch.no_grad():
        torch.testing.assert_close(twin(**inputs).logits, model(**inputs).logits, atol=0, rtol=0)
    inner = twin.get_base_model()
    assert inner.__dict__["_deltatune_owner"] is twin
    inner.save_pretrained(tmp_path / "adapter")  # still writes the adapter, not the full model
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "adapter" / "model.safetensors").exists()
