"""LoHa and LoKr against HF peft (installed as the reference), both ways, from non-zero weights.

* peft builds and trains an adapter, saves it; deltatune loads it with the same outputs and re-saves
  exactly peft's tensors; and the reverse, with peft loading deltatune's file.
* Merging folds in the same weights as peft's ``merge_and_unload``; unmerging restores the base.
* The delta is checked against the formula written here (Hadamard / Kronecker product of the factors).
"""

from __future__ import annotations

import pytest
import torch
from _peft_files import assert_same_files, quietly

import deltatune as dt

peft = pytest.importorskip("peft")

CASES = {
    "loha-llama": ("llama_lm", "LoHaConfig", {"r": 3, "alpha": 6, "target_modules": ["q_proj", "v_proj", "down_proj"]}),
    "loha-bert-patterns": ("bert_seq_cls", "LoHaConfig", {"r": 2, "alpha": 4, "target_modules": ["query", "value"],
                                                          "rank_pattern": {"value": 4}, "alpha_pattern": {"query": 3.0},
                                                          "task_type": "SEQ_CLS"}),
    "lokr-llama": ("llama_lm", "LoKrConfig", {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "up_proj"]}),
    "lokr-llama-decomposed": ("llama_lm", "LoKrConfig", {"r": 2, "alpha": 2, "target_modules": ["q_proj", "down_proj"],
                                                         "decompose_both": True, "decompose_factor": 4}),
    "lokr-bert": ("bert_seq_cls", "LoKrConfig", {"r": 16, "target_modules": ["query", "intermediate.dense"],
                                                 "task_type": "SEQ_CLS"}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_to_deltatune(case, make_model, output_of, train, tmp_path) -> None:
    kind, cls, options = CASES[case]
    inputs = make_model.inputs(kind)
    theirs = peft.get_peft_model(make_model(kind), getattr(peft, cls)(init_weights=False, **options))
    train(theirs, inputs, steps=2, lr=0.01)
    theirs.eval()
    expected = output_of(theirs, inputs)
    assert not torch.allclose(expected, output_of(make_model(kind), inputs), atol=1e-4)
    quietly(theirs.save_pretrained, tmp_path / "peft")
    ours = dt.DeltaModel.from_pretrained(make_model(kind), tmp_path / "peft")
    torch.testing.assert_close(output_of(ours, inputs), expected, atol=1e-5, rtol=0)
    ours.save_pretrained(tmp_path / "dt")
    assert_same_files(tmp_path / "dt", tmp_path / "peft")


@pytest.mark.parametrize("case", sorted(CASES))
def test_deltatune_to_peft(case, make_model, output_of, train, tmp_path) -> None:
    kind, cls, options = CASES[case]
    inputs = make_model.inputs(kind)
    ours = dt.get_delta_model(make_model(kind), getattr(dt, cls)(init_weights=False, **options))
    train(ours, inputs, steps=2, lr=0.01)
    ours.eval()
    expected = output_of(ours, inputs)
    ours.save_pretrained(tmp_path / "dt")
    theirs = quietly(peft.PeftModel.from_pretrained, make_model(kind), str(tmp_path / "dt")).eval()
    torch.testing.assert_close(output_of(theirs, inputs), expected, atol=1e-5, rtol=0)
    quietly(theirs.save_pretrained, tmp_path / "peft")
    assert_same_files(tmp_path / "dt", tmp_path / "peft")


@pytest.mark.parametrize("cls", ["LoHaConfig", "LoKrConfig"])
def test_merge_matches_peft_and_unmerge_restores(cls, make_model, output_of) -> None:
    kind, options = "llama_lm", {"r": 2, "alpha": 4, "target_modules": ["q_proj", "o_proj", "gate_proj"]}
    inputs = make_model.inputs(kind)
    ours = dt.get_delta_model(make_model(kind), getattr(dt, cls)(init_weights=False, **options))
    torch.manual_seed(0)
    theirs = peft.get_peft_model(make_model(kind), getattr(peft, cls)(init_weights=False, **options))
    with torch.no_grad():  # the same factors in both
        mine = dict(ours.named_parameters())
        for name, p in theirs.named_parameters():
            if p.requires_grad:
                p.copy_(mine[name.replace("base_model.model.", "base_model.", 1)])
    expected = output_of(ours, inputs)
    torch.testing.assert_close(output_of(theirs, inputs), expected, atol=1e-5, rtol=0)
    ours.merge_adapter()
    torch.testing.assert_close(output_of(ours, inputs), expected, atol=1e-5, rtol=0)
    ours.unmerge_adapter()
    torch.testing.assert_close(ours.base_model.state_dict()["model.layers.0.self_attn.q_proj.base_layer.weight"],
                               make_model(kind).state_dict()["model.layers.0.self_attn.q_proj.weight"], atol=1e-6, rtol=0)
    their_merged = quietly(theirs.merge_and_unload, ).state_dict()
    our_merged = ours.merge_and_unload().state_dict()
    assert our_merged.keys() == their_merged.keys()
    assert max((our_merged[k] - their_merged[k]).abs().max().item() for k in our_merged) <= 1e-6


def test_delta_formulas(make_model) -> None:
    """The deltas equal the products written out here."""
    loha = dt.get_delta_model(make_model("llama_lm"), dt.LoHaConfig(r=3, alpha=6, init_weights=False,
                                                                     target_modules=["q_proj"]))
    layer = loha.base_model.model.model.layers[0].self_attn.q_proj
    f = {k: layer.__getattr__(k)["default"].detach() for k in layer.adapter_attr_names if "default" in layer.__getattr__(k)}
    assert set(f) == {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}  # no CP cores on a linear layer
    expected = 2.0 * (f["hada_w1_a"] @ f["hada_w1_b"]) * (f["hada_w2_a"] @ f["hada_w2_b"])
    torch.testing.assert_close(layer.delta_weight("default"), expected)
    lokr = dt.get_delta_model(make_model("llama_lm"), dt.LoKrConfig(r=1, alpha=3, init_weights=False,
                                                                     target_modules=["gate_proj"]))
    layer = lokr.base_model.model.model.layers[0].mlp.gate_proj  # (40, 32): 40 = 5 * 8, 32 = 4 * 8
    w1, w2 = layer.lokr_w1["default"].detach(), (layer.lokr_w2_a["default"] @ layer.lokr_w2_b["default"]).detach()
    assert w1.shape == (5, 4) and w2.shape == (8, 8)
    expected = torch.stack([torch.stack([3.0 * w1[i, k] * w2 for k in range(4)], 1) for i in range(5)]).reshape(40, 32)
    torch.testing.assert_close(layer.delta_weight("default"), expected)


def test_loha_delta_keeps_only_the_factors_for_backward() -> None:
    """LoHa's delta recomputes the two products in backward: the same gradients as plain autograd (float64),
    and the graph holds the four factors only, no (out, in) product."""
    from deltatune.methods.loha.layer import HadamardDelta

    g = torch.Generator().manual_seed(0)
    factors = [torch.randn(shape, dtype=torch.float64, generator=g, requires_grad=True)
               for shape in ((7, 3), (3, 5), (7, 3), (3, 5))]
    upstream = torch.randn(7, 5, dtype=torch.float64, generator=g)
    w1a, w1b, w2a, w2b = factors
    plain = torch.autograd.grad(((w1a @ w1b) * (w2a @ w2b) * 1.5 * upstream).sum(), factors)
    ours = torch.autograd.grad((HadamardDelta.apply(*factors, 1.5) * upstream).sum(), factors)
    for a, b in zip(ours, plain):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    assert torch.autograd.gradcheck(lambda *f: HadamardDelta.apply(*f, 0.7), factors)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        HadamardDelta.apply(*factors, 1.5)
    assert sorted(saved) == sorted(f.shape for f in factors)
