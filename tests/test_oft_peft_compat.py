"""OFT against HF peft 0.21 (the reference), both ways, from trained non-zero rotations.

Covers the Cayley-Neumann series (peft's default) and the exact Cayley map, ``r`` instead of a
block size, a shared block, COFT, and merging: the merged weight equals ``W R^T`` with ``R`` built
here from the saved upper triangles, and equals peft's merged weight.
"""

from __future__ import annotations

import pytest
import torch
from _peft_files import assert_same_files, quietly

import deltatune as dt

peft = pytest.importorskip("peft")

CASES = {
    "llama-neumann": ("llama_lm", {"oft_block_size": 4, "target_modules": ["q_proj", "v_proj", "down_proj"]}),
    "llama-exact": ("llama_lm", {"oft_block_size": 8, "target_modules": ["q_proj", "o_proj"], "use_cayley_neumann": False}),
    "bert-r": ("bert_seq_cls", {"r": 4, "oft_block_size": 0, "target_modules": ["query", "value"], "task_type": "SEQ_CLS"}),
    "llama-shared-coft": ("llama_lm", {"oft_block_size": 4, "target_modules": ["k_proj"], "block_share": True,
                                       "coft": True, "eps": 0.5}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_to_deltatune(case, make_model, output_of, train, tmp_path) -> None:
    kind, options = CASES[case]
    inputs = make_model.inputs(kind)
    theirs = quietly(peft.get_peft_model, make_model(kind), peft.OFTConfig(init_weights=False, **options))
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
    ours = dt.get_delta_model(make_model(kind), dt.OFTConfig(init_weights=False, **options))
    train(ours, inputs, steps=2, lr=0.01)
    ours.eval()
    expected = output_of(ours, inputs)
    ours.save_pretrained(tmp_path / "dt")
    theirs = quietly(peft.PeftModel.from_pretrained, make_model(kind), str(tmp_path / "dt")).eval()
    torch.testing.assert_close(output_of(theirs, inputs), expected, atol=1e-5, rtol=0)
    quietly(theirs.save_pretrained, tmp_path / "peft")
    assert_same_files(tmp_path / "dt", tmp_path / "peft")


@pytest.mark.parametrize("neumann", [True, False])
def test_merge_is_w_rt_and_matches_peft(neumann, make_model, output_of) -> None:
    kind, options = "llama_lm", {"oft_block_size": 4, "target_modules": ["q_proj", "gate_proj"], "use_cayley_neumann": neumann}
    inputs = make_model.inputs(kind)
    ours = dt.get_delta_model(make_model(kind), dt.OFTConfig(init_weights=False, **options))
    theirs = quietly(peft.get_peft_model, make_model(kind), peft.OFTConfig(init_weights=False, **options))
    mine = dict(ours.named_parameters())
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if p.requires_grad:
                p.copy_(mine[name.replace("base_model.model.", "base_model.", 1)])
    expected = output_of(ours, inputs)
    torch.testing.assert_close(output_of(theirs, inputs), expected, atol=1e-5, rtol=0)
    # R by hand from the 6 upper-triangle entries of each 4 x 4 block.
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj
    vec = layer.oft_R["default"].weight.detach()  # (8, 6)
    blocks = []
    for v in vec:
        s = torch.zeros(4, 4)
        s[torch.triu_indices(4, 4, 1).unbind()] = v
        q = s - s.T
        eye = torch.eye(4)
        blocks.append(eye + 2 * q + 2 * q @ q + 2 * q @ q @ q + q @ q @ q @ q if neumann
                      else (eye - q) @ torch.linalg.inv(eye + q))
    rot = torch.block_diag(*blocks)
    original = layer.get_base_layer().weight.detach().clone()
    ours.merge_adapter()
    torch.testing.assert_close(layer.get_base_layer().weight, original @ rot.T, atol=1e-5, rtol=0)
    torch.testing.assert_close(output_of(ours, inputs), expected, atol=1e-5, rtol=0)
    ours.unmerge_adapter()
    torch.testing.assert_close(layer.get_base_layer().weight, original, atol=1e-5, rtol=0)
    their_merged = quietly(theirs.merge_and_unload).state_dict()
    our_merged = ours.merge_and_unload().state_dict()
    assert max((our_merged[k] - their_merged[k]).abs().max().item() for k in our_merged) <= 1e-5


def test_gpt2_conv1d_rotates_the_input(make_model, output_of) -> None:
    """peft's OFT does not wrap ``Conv1D``; deltatune does, and merges it as ``W <- R W`` (weight ``(in, out)``)."""
    inputs = make_model.inputs("gpt2_lm")
    model = dt.get_delta_model(make_model("gpt2_lm"), dt.OFTConfig(oft_block_size=8, init_weights=False,
                                                                  target_modules=["c_attn", "c_fc"]))
    expected = output_of(model, inputs)
    assert not torch.allclose(expected, output_of(make_model("gpt2_lm"), inputs), atol=1e-4)
    model.merge_adapter()
    torch.testing.assert_close(output_of(model, inputs), expected, atol=1e-5, rtol=0)
