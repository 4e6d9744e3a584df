"""LoRA layers checked against formulas written here (Hu et al., arXiv 2106.09685).

    Linear:     h = W x + b + s B A x                  s = alpha / r  (rsLoRA: alpha / sqrt(r))
    Conv1D:     h = x W + b + s x A^T B^T               W stored (in, out), GPT-2 style
    Embedding:  h = E[i] + s A^T[i] B^T                 A: (r, vocab), B: (dim, r)
    Conv:       h = conv(x, W) + b + s conv1x1(conv(x, A), B)
    DoRA:       h = m * (W + s B A) / ||W + s B A||_row x + b     (Liu et al., arXiv 2402.09353)
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deltatune as dt


class Holder(nn.Module):
    """One module under test, reachable as ``layer``."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def wrap(module: nn.Module, **cfg) -> tuple[dt.DeltaModel, nn.Module]:
    """DeltaModel around ``module`` and the original module (an untouched copy for reference)."""
    torch.manual_seed(0)
    reference = copy.deepcopy(module)
    model = dt.get_delta_model(Holder(module), dt.LoraConfig(target_modules=["layer"], **cfg))
    return model.eval(), reference


def ab(model: dt.DeltaModel, prefix: str = "lora") -> tuple[torch.Tensor, torch.Tensor]:
    layer = model.base_model.layer
    if prefix == "lora_embedding":
        return layer.lora_embedding_A["default"].detach(), layer.lora_embedding_B["default"].detach()
    return layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()


def check_merge_roundtrip(model: dt.DeltaModel, x: torch.Tensor) -> None:
    """Merged output equals unmerged (<= 1e-5); unmerge restores the base weight (<= 1e-6)."""
    base = model.base_model.layer.get_base_layer()
    before = base.weight.detach().clone()
    expected = model(x).detach()
    model.merge_adapter()
    assert (base.weight - before).abs().max() > 1e-3
    torch.testing.assert_close(model(x).detach(), expected, atol=1e-5, rtol=0)
    model.unmerge_adapter()
    assert (base.weight - before).abs().max() <= 1e-6
    torch.testing.assert_close(model(x).detach(), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("rslora", [False, True])
def test_linear_formula_and_merge(rslora) -> None:
    model, ref = wrap(nn.Linear(12, 7), r=4, lora_alpha=6, use_rslora=rslora, init_lora_weights=False)
    a, b = ab(model)
    s = 6 / math.sqrt(4) if rslora else 6 / 4
    x = torch.randn(5, 3, 12)
    expected = x @ ref.weight.T + ref.bias + s * (x @ a.T @ b.T)
    torch.testing.assert_close(model(x), expected, atol=1e-6, rtol=0)
    check_merge_roundtrip(model, x)


def test_linear_gradients_match_the_formula() -> None:
    model, ref = wrap(nn.Linear(12, 7), r=4, lora_alpha=6, init_lora_weights=False)
    layer = model.base_model.layer
    a = layer.lora_A["default"].weight.detach().clone().requires_grad_(True)
    b = layer.lora_B["default"].weight.detach().clone().requires_grad_(True)
    x = torch.randn(5, 3, 12)
    g = torch.randn(5, 3, 7)
    ((x @ ref.weight.T + ref.bias + 1.5 * (x @ a.T @ b.T)) * g).sum().backward()
    (model(x) * g).sum().backward()
    torch.testing.assert_close(layer.lora_A["default"].weight.grad, a.grad, atol=1e-5, rtol=0)
    torch.testing.assert_close(layer.lora_B["default"].weight.grad, b.grad, atol=1e-5, rtol=0)


def test_linear_under_bf16_autocast_follows_the_formula_and_trains_a_and_b() -> None:
    model, ref = wrap(nn.Linear(64, 32), r=4, lora_alpha=8, init_lora_weights=False)
    model.train()
    a, b = ab(model)
    x = torch.randn(6, 5, 64)
    expected = x @ ref.weight.T + ref.bias + 2.0 * (x @ a.T @ b.T)  # float32 reference
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, atol=0.05 * expected.abs().max().item(), rtol=0)
    out.float().sum().backward()
    layer = model.base_model.layer
    for weight in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
        assert weight.dtype == torch.float32 and weight.grad is not None and weight.grad.abs().sum() > 0
    assert layer.get_base_layer().weight.grad is None


def test_conv1d_transformers_gpt2_style() -> None:
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(1)
    conv = Conv1D(9, 12)  # nx=12 inputs, nf=9 outputs; weight (12, 9)
    nn.init.normal_(conv.bias)
    model, ref = wrap(conv, r=3, lora_alpha=5, init_lora_weights=False)
    a, b = ab(model)
    assert a.shape == (3, 12) and b.shape == (9, 3)
    x = torch.randn(4, 12)
    expected = x @ ref.weight + ref.bias + (5 / 3) * (x @ a.T @ b.T)
    torch.testing.assert_close(model(x), expected, atol=1e-6, rtol=0)
    check_merge_roundtrip(model, x)


def test_embedding_formula_and_merge() -> None:
    model, ref = wrap(nn.Embedding(20, 6, padding_idx=0), r=3, lora_alpha=9, init_lora_weights=False)
    a, b = ab(model, "lora_embedding")
    assert a.shape == (3, 20) and b.shape == (6, 3)
    ids = torch.tensor([[0, 3, 19], [7, 7, 1]])
    expected = ref.weight[ids] + 3 * (a.T[ids] @ b.T)
    torch.testing.assert_close(model(ids), expected, atol=1e-6, rtol=0)
    check_merge_roundtrip(model, ids)


@pytest.mark.parametrize("dims", [1, 2])
def test_conv_formula_and_merge(dims) -> None:
    conv_cls = nn.Conv1d if dims == 1 else nn.Conv2d
    conv = conv_cls(4, 5, kernel_size=3, stride=2, padding=1)
    model, ref = wrap(conv, r=2, lora_alpha=4, init_lora_weights=False)
    a, b = ab(model)
    assert a.shape == (2, 4, *(3,) * dims) and b.shape == (5, 2, *(1,) * dims)
    x = torch.randn(2, 4, *(9,) * dims)
    op = F.conv1d if dims == 1 else F.conv2d
    low = op(x, a, stride=2, padding=1)  # (B, r, ...)
    expected = op(x, ref.weight, ref.bias, stride=2, padding=1) + 2 * op(low, b)
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=0)
    check_merge_roundtrip(model, x)


def test_dropout_applies_to_the_adapter_input_only() -> None:
    model, ref = wrap(nn.Linear(10, 10), r=4, lora_alpha=4, lora_dropout=0.5, init_lora_weights=False)
    a, b = ab(model)
    x = torch.randn(6, 10)
    # Eval: no dropout.
    torch.testing.assert_close(model(x), ref(x) + x @ a.T @ b.T, atol=1e-6, rtol=0)
    model.train()
    torch.manual_seed(7)
    out = model(x)
    torch.manual_seed(7)
    dropped = F.dropout(x, 0.5, training=True)  # the same mask, scaled by 1 / (1 - p)
    assert not torch.equal(dropped, x)
    torch.testing.assert_close(out, ref(x) + dropped @ a.T @ b.T, atol=1e-6, rtol=0)


def test_dora_formula_merge_and_magnitude_init() -> None:
    torch.manual_seed(3)
    model, ref = wrap(nn.Linear(8, 6), r=2, lora_alpha=4, use_dora=True, init_lora_weights=False)
    layer = model.base_model.layer
    a, b = ab(model)
    s = 4 / 2
    adapted = ref.weight + s * b @ a  # (out, in)
    norm = adapted.norm(p=2, dim=1)  # one per output row
    m = layer.lora_magnitude_vector["default"]
    torch.testing.assert_close(m.detach(), norm, atol=1e-6, rtol=0)  # m starts at ||W + sBA||
    x = torch.randn(5, 8)
    torch.testing.assert_close(model(x), x @ adapted.T + ref.bias, atol=1e-5, rtol=0)
    with torch.no_grad():
        m.mul_(torch.linspace(0.5, 2.0, 6))  # a trained magnitude
    w_dora = m.detach()[:, None] * adapted / norm[:, None]
    torch.testing.assert_close(model(x), x @ w_dora.T + ref.bias, atol=1e-5, rtol=0)
    check_merge_roundtrip(model, x)
    # DoRA trains A, B and m.
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "base_model.layer.lora_A.default.weight", "base_model.layer.lora_B.default.weight",
        "base_model.layer.lora_magnitude_vector.default",
    }


def test_dora_and_pissa_refuse_non_linear_layers() -> None:
    with pytest.raises(dt.TargetError, match="use_dora"):
        wrap(nn.Embedding(5, 4), r=2, use_dora=True)
    with pytest.raises(dt.TargetError, match="pissa"):
        wrap(nn.Conv2d(2, 2, 3), r=2, init_lora_weights="pissa")


def test_init_default_and_gaussian() -> None:
    model, _ = wrap(nn.Linear(64, 16), r=8)
    a, b = ab(model)
    assert torch.count_nonzero(b) == 0 and torch.count_nonzero(a) == a.numel()
    assert a.abs().max() <= 1 / math.sqrt(64)  # Kaiming-uniform with a = sqrt(5): bound 1/sqrt(fan_in)
    model, _ = wrap(nn.Linear(256, 16), r=8, init_lora_weights="gaussian")
    a, b = ab(model)
    assert torch.count_nonzero(b) == 0
    assert abs(a.std().item() - 1 / 8) < 0.02  # N(0, 1/r): std 1/r = 0.125 over 2048 samples
    model, _ = wrap(nn.Embedding(30, 8), r=4)
    a, b = ab(model, "lora_embedding")
    assert torch.count_nonzero(a) == 0 and torch.count_nonzero(b) == b.numel()


def test_pissa_keeps_output_and_holds_top_singular_vectors() -> None:
    torch.manual_seed(5)
    linear = nn.Linear(10, 8)
    r, alpha = 3, 6
    u, sv, vh = torch.linalg.svd(linear.weight.detach(), full_matrices=False)
    model, ref = wrap(linear, r=r, lora_alpha=alpha, init_lora_weights="pissa")
    a, b = ab(model)
    s = alpha / r
    x = torch.randn(4, 10)
    torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=0)  # unchanged at init
    root = (sv[:r] / s).sqrt()
    # Rows of A / columns of B are the top singular vectors (up to the sign SVD picks), scaled by sqrt(S/s).
    for i in range(r):
        sign = torch.sign((a[i] * vh[i]).sum())
        torch.testing.assert_close(a[i], sign * root[i] * vh[i], atol=1e-5, rtol=0)
        torch.testing.assert_close(b[:, i], sign * root[i] * u[:, i], atol=1e-5, rtol=0)
    torch.testing.assert_close(s * b @ a, u[:, :r] @ torch.diag(sv[:r]) @ vh[:r], atol=1e-5, rtol=0)
    residual = model.base_model.layer.base_layer.weight
    torch.testing.assert_close(residual, ref.weight - s * b @ a, atol=1e-5, rtol=0)


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_bias_options_train_and_save_biases(bias, make_model, train, tmp_path, output_of) -> None:
    from safetensors.torch import load_file

    inputs = make_model.inputs("mlp")
    model = dt.get_delta_model(make_model("mlp"), dt.LoraConfig(r=2, target_modules=["fc1"], bias=bias))
    trainable = {n.removeprefix("base_model.") for n, p in model.named_parameters() if p.requires_grad}
    lora = {"fc1.lora_A.default.weight", "fc1.lora_B.default.weight"}
    expected_bias = {"none": set(), "lora_only": {"fc1.base_layer.bias"},
                     "all": {"fc1.base_layer.bias", "fc2.bias", "head.bias"}}[bias]
    assert trainable == lora | expected_bias
    train(model, inputs, steps=2)
    model.eval()
    model.save_pretrained(tmp_path)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert keys == {f"base_model.model.{k.replace('.default', '')}" for k in lora | expected_bias}
    expected = output_of(model, inputs)
    loaded = dt.DeltaModel.from_pretrained(make_model("mlp"), tmp_path)
    torch.testing.assert_close(output_of(loaded, inputs), expected, atol=1e-6, rtol=0)


def test_olora_matches_peft_and_keeps_the_output() -> None:
    """OLoRA (arXiv 2406.01775): A = R_r, B = Q_r of W = Q R, base replaced by W - s B A; the same tensors as
    HF peft's ``init_lora_weights="olora"``, and an orthonormal B."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(6)
    linear = nn.Linear(10, 8)
    r, alpha = 3, 6
    model, ref = wrap(linear, r=r, lora_alpha=alpha, init_lora_weights="olora")
    a, b = ab(model)
    x = torch.randn(4, 10)
    torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=0)  # unchanged at init
    torch.testing.assert_close(b.T @ b, torch.eye(r), atol=1e-5, rtol=0)
    q, upper = torch.linalg.qr(ref.weight.detach())
    torch.testing.assert_close(a, upper[:r], atol=1e-5, rtol=0)
    torch.testing.assert_close(b, q[:, :r], atol=1e-5, rtol=0)
    theirs = peft.get_peft_model(nn.Sequential(copy.deepcopy(ref)), peft.LoraConfig(
        r=r, lora_alpha=alpha, target_modules=["0"], init_lora_weights="olora"))
    layer = theirs.base_model.model[0]
    torch.testing.assert_close(layer.lora_A["default"].weight, a, atol=1e-6, rtol=0)
    torch.testing.assert_close(layer.base_layer.weight, model.base_model.layer.base_layer.weight, atol=1e-6, rtol=0)
