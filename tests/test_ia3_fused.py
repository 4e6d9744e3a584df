"""(IA)^3 on a fused query/key/value projection: only the key and value rows are rescaled.

Reference: GPT-2 / GPT-NeoX with the fused projection's key and value output rows multiplied by the
vector by hand (rows from model_interface.fused_qkv_rows, which tests/test_roles.py checks against the cache).
"""

from __future__ import annotations

import peft
import pytest
import torch
from _zoo import tiny_inputs, tiny_model

import deltatune as dt
from deltatune import model_interface as mi


def _logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox"])
def test_ia3_scales_only_key_and_value_rows(family: str, tmp_path) -> None:
    inputs = {"input_ids": tiny_inputs(family)["input_ids"]}
    model = dt.get_delta_model(tiny_model(family), dt.IA3Config(init_ia3_weights=False))
    path = mi.role_paths(model.base_model, "qkv")[0]
    layer = model.base_model.get_submodule(path)
    rows = mi.fused_qkv_rows(model.base_model, path)
    vec = layer.vector("default").detach().flatten()
    assert torch.equal(vec[rows["q"]], torch.ones(len(rows["q"])))
    assert not torch.equal(vec[rows["k"]], torch.ones(len(rows["k"])))
    out = _logits(model, inputs)
    # reference: every fused projection's k/v rows (weight and bias) scaled by hand, down projections by their vector
    reference = tiny_model(family)
    with torch.no_grad():
        for p, wrapper in model.base_model.named_modules():
            if not isinstance(wrapper, dt.layer.DeltaLayer):
                continue
            target, v = reference.get_submodule(p), wrapper.vector("default").detach().flatten()
            transposed = not isinstance(target, torch.nn.Linear)
            if wrapper.feedforward["default"]:
                target.weight.mul_(v.view(-1, 1) if transposed else v.view(1, -1))
            else:
                target.weight.mul_(v.view(1, -1) if transposed else v.view(-1, 1))
                if target.bias is not None:
                    target.bias.mul_(v)
    torch.testing.assert_close(out, _logits(reference, inputs), atol=1e-5, rtol=1e-5)
    # training leaves the query rows at 1 (no gradient, weight decay or not)
    model.train()
    model(**inputs).logits.pow(2).mean().backward()
    grad = layer.ia3_l["default"].grad.flatten()
    assert torch.equal(grad[rows["q"]], torch.zeros(len(rows["q"])))
    # the file holds 1 in the query rows: HF peft (which scales the whole output) reads it with the same result
    model.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_model(family), tmp_path)
    torch.testing.assert_close(_logits(theirs.eval(), inputs), out, atol=1e-5, rtol=1e-5)


def test_a_peft_file_scaling_the_whole_fused_output_is_read_as_such(tmp_path) -> None:
    inputs = {"input_ids": tiny_inputs("gpt2")["input_ids"]}
    torch.manual_seed(0)
    cfg = peft.IA3Config(target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"],
                         init_ia3_weights=False)
    made_by_peft = peft.get_peft_model(tiny_model("gpt2"), cfg)
    expected = _logits(made_by_peft.eval(), inputs)
    made_by_peft.save_pretrained(tmp_path)
    loaded = dt.DeltaModel.from_pretrained(tiny_model("gpt2"), tmp_path)
    torch.testing.assert_close(_logits(loaded, inputs), expected, atol=1e-5, rtol=1e-5)
