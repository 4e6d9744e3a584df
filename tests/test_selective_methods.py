"""BitFit and LayerNorm tuning: the selective family.

* BitFit's output equals the base model with ``b + db`` written into its biases (the formula), merges
  into the biases and unmerges bit-exactly, and refuses models without biases clearly.
* LayerNorm tuning's files are HF peft's ``LN_TUNING`` format, tested both ways against the installed
  peft with non-zero (perturbed) norm parameters.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

import deltatune as dt

peft = pytest.importorskip("peft")

LN_TARGETS = {
    "bert": ["LayerNorm"],
    "gpt2_lm": ["ln_1", "ln_2", "ln_f"],
    "llama_lm": ["input_layernorm", "post_attention_layernorm", "norm"],
    "t5": ["layer_norm", "final_layer_norm"],
}


def perturb(model: torch.nn.Module, marker: str, seed: int = 5) -> None:
    """Seeded noise on every parameter whose name holds ``marker``, whichever library built the model."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if marker in name:
                p.add_(0.3 * torch.randn(p.shape, generator=gen))


def test_bitfit_equals_base_with_shifted_biases(make_model, output_of) -> None:
    kind = "bert_seq_cls"
    inputs = make_model.inputs(kind)
    model = dt.get_delta_model(make_model(kind), dt.BitFitConfig(task_type="SEQ_CLS"))
    perturb(model, "bitfit_bias")
    # Reference: the same base with db written into its biases by hand (the head is the untouched copy).
    reference = make_model(kind)
    wrapped = 0
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bitfit_bias.default"):
                path = name.removeprefix("base_model.").removesuffix(".bitfit_bias.default")
                reference.get_submodule(path).bias.add_(param)
                wrapped += 1
    assert wrapped == len([m for m in reference.modules() if getattr(m, "bias", None) is not None]) - 1  # all but the head
    torch.testing.assert_close(output_of(model, inputs), output_of(reference, inputs), atol=1e-5, rtol=0)
    trainable, _ = model.trainable_parameters()
    head = sum(p.numel() for p in reference.classifier.parameters())
    assert trainable == sum(m.bias.numel() for m in reference.modules() if getattr(m, "bias", None) is not None) - \
        reference.classifier.bias.numel() + head


def test_bitfit_merge_is_exact_and_file_round_trips(make_model, output_of, tmp_path) -> None:
    kind = "gpt2_lm"
    inputs = make_model.inputs(kind)
    model = dt.get_delta_model(make_model(kind), dt.BitFitConfig())
    perturb(model, "bitfit_bias")
    expected = output_of(model, inputs)
    before = {k: v.clone() for k, v in model.base_model.state_dict().items() if k.endswith("bias")}
    model.merge_adapter()
    torch.testing.assert_close(output_of(model, inputs), expected, atol=1e-5, rtol=0)
    model.unmerge_adapter()
    after = {k: v for k, v in model.base_model.state_dict().items() if k in before}
    assert all(torch.allclose(before[k], after[k], atol=1e-7, rtol=0) for k in before)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "BITFIT"
    assert all(k.endswith(".bitfit_bias") for k in load_file(tmp_path / "adapter_model.safetensors"))
    loaded = dt.DeltaModel.from_pretrained(make_model(kind), tmp_path)
    torch.testing.assert_close(output_of(loaded, inputs), expected, atol=1e-6, rtol=0)


def test_bitfit_refuses_models_without_biases(make_model) -> None:
    base = make_model("llama_lm")
    with pytest.raises(dt.TargetError, match="has no bias"):
        dt.get_delta_model(base, dt.BitFitConfig())
    with pytest.raises(dt.TargetError, match="bias=False"):
        dt.get_delta_model(base, dt.BitFitConfig(target_modules=["q_proj"]))


@pytest.mark.parametrize("kind", sorted(LN_TARGETS))
def test_ln_tuning_peft_to_deltatune(make_model, output_of, tmp_path, kind: str) -> None:
    inputs = make_model.inputs(kind)
    theirs = peft.get_peft_model(make_model(kind), peft.LNTuningConfig(target_modules=LN_TARGETS[kind]))
    perturb(theirs, "ln_tuning_layers")
    theirs.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.save_pretrained(tmp_path / "peft")
    ours = dt.DeltaModel.from_pretrained(make_model(kind), tmp_path / "peft")
    torch.testing.assert_close(output_of(ours, inputs), output_of(theirs, inputs), atol=1e-5, rtol=0)
    assert not torch.allclose(output_of(ours, inputs), output_of(make_model(kind), inputs), atol=1e-4)
    ours.save_pretrained(tmp_path / "ours")
    mine = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    their_file = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert mine.keys() == their_file.keys()
    assert all(torch.equal(mine[k], their_file[k]) for k in mine)


@pytest.mark.parametrize("kind", ["bert", "llama_lm"])
def test_ln_tuning_deltatune_to_peft_with_resolved_defaults(make_model, output_of, tmp_path, kind: str) -> None:
    inputs = make_model.inputs(kind)
    ours = dt.get_delta_model(make_model(kind), dt.LNTuningConfig())
    perturb(ours, "ln_tuning_layers")
    ours.save_pretrained(tmp_path)
    assert isinstance(json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"], str)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(make_model(kind), str(tmp_path)).eval()
    torch.testing.assert_close(output_of(theirs, inputs), output_of(ours, inputs), atol=1e-5, rtol=0)
    assert set(load_file(tmp_path / "adapter_model.safetensors")) == set(peft.get_peft_model_state_dict(theirs))


def test_ln_tuning_merge_restores_originals_exactly(make_model, output_of) -> None:
    kind = "llama_lm"
    inputs = make_model.inputs(kind)
    model = dt.get_delta_model(make_model(kind), dt.LNTuningConfig())
    perturb(model, "ln_tuning_layers")
    expected = output_of(model, inputs)
    before = {k: v.clone() for k, v in make_model(kind).state_dict().items()}
    model.merge_adapter()
    torch.testing.assert_close(output_of(model, inputs), expected, atol=1e-6, rtol=0)
    model.unmerge_adapter()
    with model.disable_adapter():
        torch.testing.assert_close(output_of(model, inputs), output_of(make_model(kind), inputs), atol=0, rtol=0)
    merged = model.merge_and_unload().state_dict()
    changed = [k for k in before if not torch.equal(before[k], merged[k])]
    assert changed and all("norm" in k for k in changed)


def test_ln_tuning_one_adapter_at_a_time(make_model) -> None:
    model = dt.get_delta_model(make_model("llama_lm"), dt.LNTuningConfig())
    model.add_adapter("other", dt.LNTuningConfig())
    model.set_adapter(["default", "other"])
    with pytest.raises(dt.ConfigError, match="one adapter at a time"):
        model(**{k: v for k, v in make_model.inputs("llama_lm").items()})
