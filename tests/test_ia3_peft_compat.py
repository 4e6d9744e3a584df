"""(IA)^3 files cross-checked against HF peft (installed as a test reference), both ways.

For tiny BERT, GPT-2, Llama (grouped-query attention) and T5: an adapter saved by one library loads
in the other and gives the same outputs (<= 1e-5), and both write the same tensor names and shapes.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

import deltatune as dt

peft = pytest.importorskip("peft")

# Explicit layouts (HF peft's default table differs from deltatune's for BERT, so name them).
LAYOUTS = {
    "bert": (["key", "value", "output.dense"], ["output.dense"]),
    "gpt2_lm": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "llama_lm": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "t5": (["k", "v", "wo"], ["wo"]),
}


def randomize(model: torch.nn.Module) -> None:
    """Non-trivial vectors, seeded, whichever library built the model."""
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "ia3_l" in name:
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))


def peft_from_pretrained(base: torch.nn.Module, folder) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(base, str(folder)).eval()


@pytest.mark.parametrize("kind", sorted(LAYOUTS))
def test_peft_to_deltatune(make_model, output_of, tmp_path, kind: str) -> None:
    targets, ff = LAYOUTS[kind]
    theirs = peft.get_peft_model(make_model(kind), peft.IA3Config(target_modules=targets, feedforward_modules=ff))
    randomize(theirs)
    theirs.eval()
    theirs.save_pretrained(tmp_path)
    ours = dt.DeltaModel.from_pretrained(make_model(kind), tmp_path)
    inputs = make_model.inputs(kind)
    assert (output_of(ours, inputs) - output_of(theirs, inputs)).abs().max() <= 1e-5
    assert not torch.allclose(output_of(ours, inputs), output_of(make_model(kind), inputs), atol=1e-4)
    ours.save_pretrained(tmp_path / "ours")
    mine, their_file = load_file(tmp_path / "ours" / "adapter_model.safetensors"), load_file(tmp_path / "adapter_model.safetensors")
    assert {k: v.shape for k, v in mine.items()} == {k: v.shape for k, v in their_file.items()}
    assert all(torch.equal(mine[k], their_file[k]) for k in mine)


@pytest.mark.parametrize("kind", sorted(LAYOUTS))
def test_deltatune_to_peft(make_model, output_of, tmp_path, kind: str) -> None:
    targets, ff = LAYOUTS[kind]
    ours = dt.get_delta_model(make_model(kind), dt.IA3Config(target_modules=targets, feedforward_modules=ff))
    randomize(ours)
    ours.save_pretrained(tmp_path)
    theirs = peft_from_pretrained(make_model(kind), tmp_path)
    inputs = make_model.inputs(kind)
    assert (output_of(theirs, inputs) - output_of(ours, inputs)).abs().max() <= 1e-5
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert keys == set(peft.get_peft_model_state_dict(theirs))
    assert all(k.startswith("base_model.model.") and k.endswith(".ia3_l") for k in keys)


@pytest.mark.parametrize("kind", ["bert", "llama_lm"])
def test_deltatune_defaults_load_in_peft(make_model, output_of, tmp_path, kind: str) -> None:
    """``IA3Config()`` resolves its defaults into the saved config, so peft rebuilds the same layout."""
    ours = dt.get_delta_model(make_model(kind), dt.IA3Config())
    randomize(ours)
    ours.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert isinstance(saved["target_modules"], str) and isinstance(saved["feedforward_modules"], str)
    theirs = peft_from_pretrained(make_model(kind), tmp_path)
    inputs = make_model.inputs(kind)
    assert (output_of(theirs, inputs) - output_of(ours, inputs)).abs().max() <= 1e-5


def test_merged_weights_match_peft(make_model) -> None:
    """Both libraries fold the vectors into the same weights."""
    targets, ff = LAYOUTS["gpt2_lm"]
    ours = dt.get_delta_model(make_model("gpt2_lm"), dt.IA3Config(target_modules=targets, feedforward_modules=ff))
    theirs = peft.get_peft_model(make_model("gpt2_lm"), peft.IA3Config(target_modules=targets, feedforward_modules=ff))
    randomize(ours)
    randomize(theirs)
    mine = ours.merge_and_unload().state_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        other = theirs.merge_and_unload().state_dict()
    assert mine.keys() == other.keys()
    assert max((mine[k] - other[k]).abs().max().item() for k in mine) <= 1e-6
