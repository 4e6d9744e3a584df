"""LoKr's delta applied to the activations (``vec(W1 X W2^T)``) against the dense ``kron(W1, W2)`` written here.

* :class:`KronApply`: output and gradients equal plain autograd through ``x @ kron(W1, W2)^T`` (float64),
  gradcheck, and the graph keeps ``x`` and the two factors only (no ``(out, in)`` matrix, no intermediate).
* A wrapped linear layer (``nn.Linear`` and GPT-2's transposed ``Conv1D``), training with rank dropout:
  output and factor gradients equal ``base(x) + x (dW * keep)^T`` built from the same random draw;
  under bf16 autocast the output is within bf16 rounding of the float32 dense product.
"""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from deltatune.methods.lokr.kron_apply import KronApply
from deltatune.methods.lokr.layer import LoKrLinear


def _factors(n: int, a: int, c: int, b: int, d: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(shape, dtype=torch.float64, generator=g, requires_grad=True)
            for shape in ((n, c * d), (a, c), (b, d))]


def test_kron_apply_equals_dense_product_and_its_gradients() -> None:
    x, w1, w2 = _factors(6, 5, 3, 2, 4)
    upstream = torch.randn(6, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    dense = x @ torch.kron(w1, w2).T
    ours = KronApply.apply(x, w1, w2)
    torch.testing.assert_close(ours, dense, atol=1e-12, rtol=0)
    plain = torch.autograd.grad((dense * upstream).sum(), [x, w1, w2])
    mine = torch.autograd.grad((ours * upstream).sum(), [x, w1, w2])
    for got, want in zip(mine, plain):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    assert torch.autograd.gradcheck(KronApply.apply, (x, w1, w2))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        KronApply.apply(x, w1, w2)
    assert sorted(saved) == sorted([x.shape, w1.shape, w2.shape])


def _layer_and_dense(make_model, kind: str, path: str, **options) -> tuple[LoKrLinear, torch.Tensor]:
    model = dt.get_delta_model(make_model(kind), dt.LoKrConfig(init_weights=False, **options))
    layer = model.base_model.model.get_submodule(path)
    assert isinstance(layer, LoKrLinear)
    w1 = layer.lokr_w1["default"] if "default" in layer.lokr_w1 else layer.lokr_w1_a["default"] @ layer.lokr_w1_b["default"]
    w2 = layer.lokr_w2["default"] if "default" in layer.lokr_w2 else layer.lokr_w2_a["default"] @ layer.lokr_w2_b["default"]
    return layer, torch.kron(w1, w2) * layer.scaling["default"]  # (out, in), written out here


@pytest.mark.parametrize("kind,path,options", [
    ("llama_lm", "model.layers.0.mlp.gate_proj",
     {"r": 1, "alpha": 3, "target_modules": ["gate_proj"], "rank_dropout": 0.5}),
    ("llama_lm", "model.layers.0.mlp.down_proj",
     {"r": 2, "alpha": 2, "target_modules": ["down_proj"], "decompose_both": True, "decompose_factor": 4,
      "rank_dropout": 0.3, "rank_dropout_scale": True}),
    ("gpt2_lm", "transformer.h.0.attn.c_attn",
     {"r": 2, "alpha": 4, "target_modules": ["c_attn"], "rank_dropout": 0.5}),
])
def test_layer_output_and_gradients_equal_the_dense_delta(make_model, kind, path, options) -> None:
    layer, dense = _layer_and_dense(make_model, kind, path, **options)
    layer.train()
    base = layer.get_base_layer()
    x = torch.randn(2, 3, layer.in_features, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(7)
    out = layer(x)
    torch.manual_seed(7)  # the same draw, by hand: each output row kept with probability 1 - p
    keep = (torch.rand(layer.out_features) > options["rank_dropout"]).float()
    if options.get("rank_dropout_scale"):
        keep = keep / keep.mean()
    assert 0 < keep.count_nonzero() < layer.out_features
    expected = base(x) + x @ (dense * keep[:, None]).T
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    params = [p for p in layer.parameters() if p.requires_grad]
    mine = torch.autograd.grad(out.square().sum(), params, retain_graph=True)
    theirs = torch.autograd.grad(expected.square().sum(), params)
    for got, want in zip(mine, theirs):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_layer_under_bf16_autocast(make_model) -> None:
    layer, dense = _layer_and_dense(make_model, "llama_lm", "model.layers.0.mlp.gate_proj",
                                    r=1, alpha=3, target_modules=["gate_proj"])
    x = torch.randn(4, layer.in_features, generator=torch.Generator().manual_seed(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    delta = (out.float() - layer.get_base_layer()(x)).detach()
    want = (x @ dense.T).detach()
    assert out.dtype == torch.bfloat16
    assert (delta - want).abs().max() <= 0.03 * want.abs().max()
