"""(IA)^3: placement, the rescaling formula, multiplicative merge/unmerge, files, errors.

References are written here: ``l * (W x + b)`` / ``W (l * x) + b`` by hand, and a copy of the base model
whose weights were rescaled by hand (the merged model must equal it).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

import deltatune as dt
from deltatune.methods.ia3 import IA3Layer

# Module-path suffixes each architecture's default IA3Config() must wrap; (feed-forward ones second).
EXPECTED = {
    "bert_seq_cls": ({"attention.self.key", "attention.self.value"}, {"0.output.dense", "1.output.dense"}),
    "roberta_seq_cls": ({"attention.self.key", "attention.self.value"}, {"0.output.dense", "1.output.dense"}),
    "distilbert_seq_cls": ({"attention.k_lin", "attention.v_lin"}, {"ffn.lin2"}),
    "gpt2_lm": ({"attn.c_attn"}, {"mlp.c_proj"}),
    "llama_lm": ({"self_attn.k_proj", "self_attn.v_proj"}, {"mlp.down_proj"}),
    "t5": ({"SelfAttention.k", "SelfAttention.v", "EncDecAttention.k", "EncDecAttention.v"}, {"DenseReluDense.wo"}),
    "bart": ({"self_attn.k_proj", "self_attn.v_proj", "encoder_attn.k_proj", "encoder_attn.v_proj"}, {"fc2"}),
}


def ia3_layers(model: nn.Module) -> dict[str, IA3Layer]:
    return {path: m for path, m in model.base_model.named_modules() if isinstance(m, IA3Layer)}


def set_vectors(model: nn.Module, zero_one: bool = False) -> None:
    """Deterministic vectors != 1 (a ramp 0.5 .. 1.5 per layer); ``zero_one`` puts one exact zero in each."""
    with torch.no_grad():
        for layer in ia3_layers(model).values():
            for name, vec in layer.ia3_l.items():
                vec.copy_(torch.linspace(0.5, 1.5, vec.numel()).view(vec.shape))
                if zero_one:
                    vec.view(-1)[1] = 0.0
                if name in layer.fixed_rows:  # the query rows of a fused q/k/v projection act as 1 (test_ia3_fused.py)
                    vec[layer.fixed_rows[name]] = 1.0


def hand_rescaled(base: nn.Module, model: dt.DeltaModel) -> nn.Module:
    """A copy of ``base`` with every wrapped weight rescaled by the formula (no deltatune code involved)."""
    ref = copy.deepcopy(base)
    modules = dict(ref.named_modules())
    for path, layer in ia3_layers(model).items():
        (name,) = layer.ia3_l.keys()
        vec = layer.ia3_l[name].detach().flatten()
        target = modules[path]
        ff = layer.feedforward[name]
        with torch.no_grad():
            if isinstance(target, Conv1D):  # weight (in, out): rows are inputs
                target.weight.mul_(vec[:, None] if ff else vec[None, :])
            else:  # nn.Linear weight (out, in)
                target.weight.mul_(vec[None, :] if ff else vec[:, None])
            if not ff and target.bias is not None:
                target.bias.mul_(vec)
    return ref


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_default_targets_and_identity_start(make_model, output_of, kind: str) -> None:
    base = make_model(kind)
    inputs = make_model.inputs(kind)
    expected = output_of(base, inputs)
    model = dt.get_delta_model(base, dt.IA3Config())
    layers = ia3_layers(model)
    scaled, ff = EXPECTED[kind]
    suffix = {p: next((s for s in scaled | ff if p.endswith(s)), None) for p in layers}
    assert None not in suffix.values(), f"unexpected targets: {[p for p, s in suffix.items() if s is None]}"
    assert set(suffix.values()) == scaled | ff
    for path, layer in layers.items():
        assert layer.feedforward["default"] == (suffix[path] in ff), path
        shape = layer.ia3_l["default"].shape
        assert shape == ((1, layer.in_features) if suffix[path] in ff else (layer.out_features, 1))
    assert torch.equal(output_of(model, inputs), expected)  # vectors start at ones


@pytest.mark.parametrize("kind", ["llama_lm", "gpt2_lm", "bert"])
def test_outputs_equal_hand_rescaled_model_and_merge_is_exact(make_model, output_of, kind: str) -> None:
    base = make_model(kind)
    originals = {k: v.clone() for k, v in base.state_dict().items()}
    inputs = make_model.inputs(kind)
    model = dt.get_delta_model(base, dt.IA3Config())
    set_vectors(model)
    reference = output_of(hand_rescaled(make_model(kind), model), inputs)
    unmerged = output_of(model, inputs)
    assert (unmerged - reference).abs().max() <= 1e-5
    assert not torch.allclose(unmerged, output_of(make_model(kind), inputs), atol=1e-4)  # the vectors matter
    model.merge_adapter()
    assert (output_of(model, inputs) - unmerged).abs().max() <= 1e-5
    model.unmerge_adapter()
    restored = {k.replace(".base_layer", ""): v for k, v in base.state_dict().items() if "ia3_l" not in k}
    assert restored.keys() == originals.keys()
    assert max((restored[k] - originals[k]).abs().max().item() for k in originals) <= 1e-6
    assert (output_of(model, inputs) - unmerged).abs().max() <= 1e-6


def test_zero_entries_unmerge_exactly(make_model, output_of) -> None:
    """A zero in the vector cannot be divided out; the weights kept at merge time come back bit-exact."""
    base = make_model("llama_lm")
    originals = {k: v.clone() for k, v in base.state_dict().items()}
    inputs = make_model.inputs("llama_lm")
    model = dt.get_delta_model(base, dt.IA3Config())
    set_vectors(model, zero_one=True)
    before = output_of(model, inputs)
    model.merge_adapter()
    assert (output_of(model, inputs) - before).abs().max() <= 1e-5
    model.unmerge_adapter()
    restored = {k.replace(".base_layer", ""): v for k, v in base.state_dict().items() if "ia3_l" not in k}
    assert all(torch.equal(restored[k], originals[k]) for k in originals)


def test_merge_and_unload_gives_plain_model(make_model, output_of) -> None:
    model = dt.get_delta_model(make_model("gpt2_lm"), dt.IA3Config())
    set_vectors(model)
    inputs = make_model.inputs("gpt2_lm")
    expected = output_of(model, inputs)
    plain = model.merge_and_unload()
    assert not any(isinstance(m, IA3Layer) for m in plain.modules())
    assert (output_of(plain, inputs) - expected).abs().max() <= 1e-5


def _wrap(module: nn.Module, ff: bool, init: bool = False) -> IA3Layer:
    cfg = dt.IA3Config(target_modules=["m"], feedforward_modules=["m"] if ff else [], init_ia3_weights=init)
    layer = IA3Layer(module)
    layer.add("a", cfg, "m")
    layer.set_active(["a"])
    return layer


@pytest.mark.parametrize("ff", [False, True])
def test_layer_formula_linear_and_conv1d(ff: bool) -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 5)
    lin = nn.Linear(5, 4)
    layer = _wrap(lin, ff)
    vec = layer.ia3_l["a"].detach().flatten()
    want = F.linear(x * vec, lin.weight, lin.bias) if ff else vec * F.linear(x, lin.weight, lin.bias)
    assert torch.allclose(layer(x), want, atol=1e-6)
    conv1d = Conv1D(4, 5)  # weight (in=5, out=4)
    nn.init.normal_(conv1d.bias)
    layer = _wrap(conv1d, ff)
    vec = layer.ia3_l["a"].detach().flatten()
    want = (x * vec) @ conv1d.weight + conv1d.bias if ff else vec * (x @ conv1d.weight + conv1d.bias)
    assert torch.allclose(layer(x), want, atol=1e-6)


def test_two_adapters_multiply_and_disable() -> None:
    torch.manual_seed(1)
    lin = nn.Linear(6, 6)
    x = torch.randn(2, 6)
    layer = _wrap(lin, ff=False)
    layer.add("b", dt.IA3Config(target_modules=["m"], feedforward_modules=["m"], init_ia3_weights=False), "m")
    layer.set_active(["a", "b"])
    la, lb = layer.ia3_l["a"].detach().flatten(), layer.ia3_l["b"].detach().flatten()
    weight, bias = lin.weight.detach().clone(), lin.bias.detach().clone()
    want = la * F.linear(x * lb, weight, bias)
    assert torch.allclose(layer(x), want, atol=1e-6)
    layer.merge(["b"])  # one merged, one live: same function
    assert torch.allclose(layer(x), want, atol=1e-5)
    layer.unmerge()
    assert (lin.weight - weight).abs().max() <= 1e-6
    layer.disabled = True
    assert torch.allclose(layer(x), F.linear(x, weight, bias), atol=1e-6)


def test_conv2d_rescales_channels_and_merges(make_model, output_of) -> None:
    base = make_model("cnn")
    inputs = make_model.inputs("cnn")
    model = dt.get_delta_model(base, dt.IA3Config(target_modules=["conv2d", "conv1d"], feedforward_modules=["conv1d"],
                                                  init_ia3_weights=False))
    layers = ia3_layers(model)
    assert layers["conv2d"].ia3_l["default"].shape == (1, 6, 1, 1)
    assert layers["conv1d"].ia3_l["default"].shape == (1, 6, 1)
    ref = copy.deepcopy(make_model("cnn"))
    with torch.no_grad():
        l2 = layers["conv2d"].ia3_l["default"].flatten()
        ref.conv2d.weight.mul_(l2.view(-1, 1, 1, 1))
        ref.conv2d.bias.mul_(l2)
        ref.conv1d.weight.mul_(layers["conv1d"].ia3_l["default"].flatten().view(1, -1, 1))
    out = output_of(model, inputs)
    assert (out - output_of(ref, inputs)).abs().max() <= 1e-5
    model.merge_adapter()
    assert (output_of(model, inputs) - out).abs().max() <= 1e-5


def test_save_load_records_resolved_targets(make_model, output_of, tmp_path) -> None:
    model = dt.get_delta_model(make_model("t5"), dt.IA3Config(task_type="SEQ_2_SEQ_LM"))
    set_vectors(model)
    inputs = make_model.inputs("t5")
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "IA3"
    assert "DenseReluDense" in saved["target_modules"] and "DenseReluDense" in saved["feedforward_modules"]
    loaded = dt.DeltaModel.from_pretrained(make_model("t5"), tmp_path)
    assert torch.equal(output_of(loaded, inputs), output_of(model, inputs))


def test_plain_module_needs_explicit_targets_and_supported_types(make_model, output_of) -> None:
    with pytest.raises(dt.ConfigError, match="target_modules"):
        dt.get_delta_model(make_model("mlp"), dt.IA3Config())
    with pytest.raises(dt.TargetError, match="ReLU is not a linear or convolution layer"):
        dt.get_delta_model(make_model("mlp"), dt.IA3Config(target_modules=["fc1", "act"]))
    model = dt.get_delta_model(make_model("mlp"), dt.IA3Config(target_modules=["fc1", "fc2"], feedforward_modules=["fc2"]))
    layers = ia3_layers(model)
    assert not layers["fc1"].feedforward["default"] and layers["fc2"].feedforward["default"]


@pytest.mark.parametrize("bad", [
    {"target_modules": ["k"], "feedforward_modules": ["wo"]},
    {"init_ia3_weights": "yes"},
])
def test_config_rejects_bad_values(bad: dict) -> None:
    with pytest.raises(dt.ConfigError):
        dt.IA3Config(**bad)
