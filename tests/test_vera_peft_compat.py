"""VeRA against HF peft (the reference), both ways, from trained non-zero scaling vectors.

Covers layers of different shapes sharing one pair of projections (Llama's q/v/down projections with
grouped-query attention), GPT-2's transposed ``Conv1D``, ``save_projection`` on and off (then the
projections are regenerated from ``projection_prng_key``, which must match peft's draw bit for bit),
and merging against the formula ``W + diag(b) B diag(d) A``.
"""

from __future__ import annotations

import pytest
import torch
from _peft_files import assert_same_files, quietly
from safetensors.torch import load_file

import deltatune as dt

peft = pytest.importorskip("peft")

CASES = {
    "llama": ("llama_lm", {"target_modules": ["q_proj", "v_proj", "down_proj"]}),
    "llama-no-projection": ("llama_lm", {"target_modules": ["q_proj", "up_proj"], "save_projection": False}),
    "gpt2": ("gpt2_lm", {"target_modules": ["c_attn", "mlp.c_proj"], "projection_prng_key": 7}),
    "bert-head": ("bert_seq_cls", {"target_modules": ["query", "value"], "task_type": "SEQ_CLS"}),
}


def load_peft(kind_model: torch.nn.Module, folder) -> torch.nn.Module:
    return quietly(peft.PeftModel.from_pretrained, kind_model, str(folder)).eval()


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_to_deltatune(case, make_model, output_of, train, tmp_path) -> None:
    kind, options = CASES[case]
    inputs = make_model.inputs(kind)
    theirs = quietly(peft.get_peft_model, make_model(kind), peft.VeraConfig(r=6, init_weights=False, **options))
    train(theirs, inputs, steps=2, lr=0.01)
    theirs.eval()
    expected = output_of(theirs, inputs)
    assert not torch.allclose(expected, output_of(make_model(kind), inputs), atol=1e-4)
    quietly(theirs.save_pretrained, tmp_path / "peft")
    ours = quietly(dt.DeltaModel.from_pretrained, make_model(kind), tmp_path / "peft")
    torch.testing.assert_close(output_of(ours, inputs), expected, atol=1e-5, rtol=0)
    ours.save_pretrained(tmp_path / "dt")
    assert_same_files(tmp_path / "dt", tmp_path / "peft")


@pytest.mark.parametrize("case", sorted(CASES))
def test_deltatune_to_peft(case, make_model, output_of, train, tmp_path) -> None:
    kind, options = CASES[case]
    inputs = make_model.inputs(kind)
    ours = dt.get_delta_model(make_model(kind), dt.VeraConfig(r=6, init_weights=False, **options))
    train(ours, inputs, steps=2, lr=0.01)
    ours.eval()
    expected = output_of(ours, inputs)
    ours.save_pretrained(tmp_path / "dt")
    saved = load_file(tmp_path / "dt" / "adapter_model.safetensors")
    assert ("base_model.vera_A" in saved) == options.get("save_projection", True)
    theirs = load_peft(make_model(kind), tmp_path / "dt")
    torch.testing.assert_close(output_of(theirs, inputs), expected, atol=1e-5, rtol=0)
    quietly(theirs.save_pretrained, tmp_path / "peft")
    assert_same_files(tmp_path / "dt", tmp_path / "peft")


def test_merge_is_the_formula_and_unmerges(make_model, output_of) -> None:
    kind = "llama_lm"
    inputs = make_model.inputs(kind)
    model = dt.get_delta_model(make_model(kind), dt.VeraConfig(r=5, init_weights=False, target_modules=["v_proj"]))
    layer = model.base_model.model.model.layers[1].self_attn.v_proj  # (16, 32): grouped-query keys/values
    a, b = layer.vera_projections["default"].A, layer.vera_projections["default"].B
    lam_b, lam_d = layer.vera_lambda_b["default"].detach(), layer.vera_lambda_d["default"].detach()
    expected_delta = torch.diag(lam_b) @ b[:16] @ torch.diag(lam_d) @ a[:, :32]
    torch.testing.assert_close(layer.delta_weight("default"), expected_delta, atol=1e-6, rtol=1e-5)
    expected = output_of(model, inputs)
    original = layer.get_base_layer().weight.detach().clone()
    model.merge_adapter()
    torch.testing.assert_close(layer.get_base_layer().weight, original + expected_delta, atol=1e-6, rtol=0)
    torch.testing.assert_close(output_of(model, inputs), expected, atol=1e-5, rtol=0)
    model.unmerge_adapter()
    torch.testing.assert_close(layer.get_base_layer().weight, original, atol=1e-6, rtol=0)


def test_projections_are_shared_and_frozen(make_model) -> None:
    model = dt.get_delta_model(make_model("llama_lm"), dt.VeraConfig(r=4, target_modules=["q_proj", "down_proj"]))
    layers = [m for m in model.modules() if isinstance(m, dt.methods.vera.VeraLinear)]
    assert len(layers) == 4
    assert len({m.vera_projections["default"].A.data_ptr() for m in layers}) == 1
    assert all(not any("vera_projections" in n for n, _ in m.named_parameters()) for m in layers)
    trainable, _ = model.trainable_parameters()
    assert trainable == 2 * (32 + 4) + 2 * (32 + 4)  # b (out) + d (r) per layer
