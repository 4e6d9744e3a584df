"""Bottleneck adapters: identity start, placement per variant, the formula, sizing, files, errors.

References are written here: ``h + s * (W_up f(W_down h + b_d) + b_u)`` by hand, and for parallel
adapters the wrapped block's own sub-modules recombined by hand.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import deltatune as dt
from deltatune.methods.bottleneck import BottleneckLayer

KINDS = ["bert_seq_cls", "distilbert_seq_cls", "gpt2_lm", "llama_lm", "t5", "bart"]

# (variant, kind) -> (module-path suffixes that must be wrapped, how many modules), written out per architecture.
PLACEMENT = {
    ("houlsby", "bert_seq_cls"): ({"attention.output.dense", "0.output.dense", "1.output.dense"}, 4),
    ("pfeiffer", "bert_seq_cls"): ({"0.output.dense", "1.output.dense"}, 2),
    ("parallel", "bert_seq_cls"): ({"layer.0.output", "layer.1.output"}, 2),
    ("houlsby", "llama_lm"): ({"self_attn.o_proj", "mlp.down_proj"}, 4),
    ("pfeiffer", "llama_lm"): ({"mlp.down_proj"}, 2),
    ("parallel", "llama_lm"): ({"mlp"}, 2),
    ("houlsby", "gpt2_lm"): ({"attn.c_proj", "mlp.c_proj"}, 4),
    ("parallel", "gpt2_lm"): ({"mlp"}, 2),
    # encoder blocks: self-attention + FFN; decoder blocks: + cross-attention -> 2 * 2 + 2 * 3
    ("houlsby", "t5"): ({"SelfAttention.o", "EncDecAttention.o", "DenseReluDense.wo"}, 10),
    ("parallel", "t5"): ({"DenseReluDense"}, 4),
    ("houlsby", "bart"): ({"self_attn.out_proj", "encoder_attn.out_proj", "fc2"}, 10),
    ("pfeiffer", "distilbert_seq_cls"): ({"ffn.lin2"}, 2),
    ("parallel", "distilbert_seq_cls"): ({"ffn"}, 2),
}
# parallel on BART has no default placement: test_parallel_on_bart_explains_and_accepts_explicit_targets
IDENTITY_CELLS = [(k, v) for k in KINDS for v in ("houlsby", "pfeiffer", "parallel") if (v, k) != ("parallel", "bart")]


def layers_of(model: dt.DeltaModel) -> dict[str, BottleneckLayer]:
    return {p: m for p, m in model.base_model.named_modules() if isinstance(m, BottleneckLayer)}


@pytest.mark.parametrize(("kind", "variant"), IDENTITY_CELLS)
def test_starts_exactly_equal_to_base(make_model, output_of, kind: str, variant: str) -> None:
    base = make_model(kind)
    inputs = make_model.inputs(kind)
    expected = output_of(base, inputs)
    model = dt.get_delta_model(base, dt.BottleneckConfig(variant=variant, bottleneck_size=4))
    assert torch.equal(output_of(model, inputs), expected)
    for layer in layers_of(model).values():  # it is the zero up-projection, not a no-op, that makes it so
        assert torch.count_nonzero(layer.adapter_up["default"].weight) == 0
        assert torch.count_nonzero(layer.adapter_down["default"].weight) > 0


@pytest.mark.parametrize(("variant", "kind"), sorted(PLACEMENT))
def test_default_placement(make_model, variant: str, kind: str) -> None:
    model = dt.get_delta_model(make_model(kind), dt.BottleneckConfig(variant=variant))
    paths = list(layers_of(model))
    wanted, count = PLACEMENT[(variant, kind)]
    matched = {p: [s for s in wanted if p.endswith("." + s)] for p in paths}
    assert all(matched.values()), f"unexpected: {[p for p, m in matched.items() if not m]}"
    assert set().union(*matched.values()) == wanted
    assert len(paths) == count


def _adapter(layer: BottleneckLayer, h: torch.Tensor, act, s: float) -> torch.Tensor:
    down, up = layer.adapter_down["default"], layer.adapter_up["default"]
    return s * (act(h @ down.weight.T + down.bias) @ up.weight.T + up.bias)


@pytest.mark.parametrize(("name", "act"), [("relu", F.relu), ("gelu", F.gelu), ("swish", F.silu), ("tanh", torch.tanh)])
def test_sequential_formula(name: str, act) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5))
    x = torch.randn(4, 6)
    base_out = model[2](model[1](model[0](x))).detach()
    cfg = dt.BottleneckConfig(target_modules=["2"], bottleneck_size=3, non_linearity=name, scaling=0.7, init_weights=False)
    delta = dt.get_delta_model(model, cfg)
    layer = layers_of(delta)["2"]
    assert layer.adapter_down["default"].weight.shape == (3, 5)
    want = base_out + _adapter(layer, base_out, act, 0.7)
    assert torch.allclose(delta(x), want, atol=1e-6)


def test_parallel_formula_beside_llama_mlp(make_model) -> None:
    model = dt.get_delta_model(make_model("llama_lm"), dt.BottleneckConfig(variant="parallel", scaling=4.0,
                                                                           bottleneck_size=5, init_weights=False))
    layer = layers_of(model)["model.layers.0.mlp"]
    mlp = layer.base_layer
    x = torch.randn(2, 3, 32)
    ffn = mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x))  # LlamaMLP written out
    assert torch.allclose(layer(x), ffn + _adapter(layer, x, F.relu, 4.0), atol=1e-6)


def test_parallel_formula_beside_bert_ffn(make_model) -> None:
    """BERT's ``BertOutput(h, r) = LN(dense(h) + r)``: the adapter reads ``r`` (the block input) and joins before LN."""
    model = dt.get_delta_model(make_model("bert"), dt.BottleneckConfig(variant="parallel", init_weights=False))
    layer = layers_of(model)["encoder.layer.0.output"]
    out_block = layer.base_layer
    h, r = torch.randn(2, 3, 37), torch.randn(2, 3, 32)
    a = _adapter(layer, r, F.relu, 1.0)
    ln = out_block.LayerNorm
    want = F.layer_norm(out_block.dense(h) + r + a, ln.normalized_shape, ln.weight, ln.bias, ln.eps)
    assert torch.allclose(layer(h, r), want, atol=1e-6)
    assert layer.adapter_down["default"].weight.shape == (2, 32)  # 32 / 16


def test_sizes(make_model) -> None:
    def width(**kw) -> int:
        model = dt.get_delta_model(make_model("llama_lm"), dt.BottleneckConfig(variant="pfeiffer", **kw))
        return layers_of(model)["model.layers.0.mlp.down_proj"].adapter_down["default"].out_features

    assert width() == 2 and width(reduction_factor=4) == 8 and width(bottleneck_size=5) == 5
    with pytest.raises(dt.ConfigError, match="not both"):
        dt.BottleneckConfig(bottleneck_size=4, reduction_factor=2)


@pytest.mark.parametrize("bad", [
    {"variant": "serial"}, {"non_linearity": "sigmoid"}, {"bottleneck_size": 0}, {"bottleneck_size": 2.5},
    {"reduction_factor": -1}, {"scaling": float("nan")}, {"adapter_dropout": 1.0}, {"init_weights": "zero"},
])
def test_config_rejects_bad_values(bad: dict) -> None:
    with pytest.raises(dt.ConfigError):
        dt.BottleneckConfig(**bad)


def test_not_mergeable(make_model) -> None:
    model = dt.get_delta_model(make_model("gpt2_lm"), dt.BottleneckConfig(init_weights=False))
    for call in (model.merge_adapter, model.merge_and_unload):
        with pytest.raises(dt.MergeError, match="bottleneck"):
            call()
    assert layers_of(model)  # nothing was unloaded


def test_parallel_beside_an_inline_feed_forward(make_model, output_of, tmp_path) -> None:
    """BART computes fc2(act(fc1(x))) inline: the default parallel adapter wraps fc2 and reads fc1's input x.
    Reference: the plain base model with torch hooks adding a(x) (formula written here) to every fc2 output."""
    inputs = make_model.inputs("bart")
    model = dt.get_delta_model(make_model("bart"), dt.BottleneckConfig(variant="parallel", scaling=2.0,
                                                                       init_weights=False))
    layers = layers_of(model)
    assert sorted(layers) == sorted(f"model.{side}.layers.{i}.fc2" for side in ("encoder", "decoder") for i in (0, 1))
    assert model.peft_config["default"].parallel_inputs["model.encoder.layers.0.fc2"] == "model.encoder.layers.0.fc1"
    reference = make_model("bart")
    handles, seen = [], {}
    for path, layer in layers.items():
        fc1, fc2 = reference.get_submodule(path[:-1] + "1"), reference.get_submodule(path)
        handles.append(fc1.register_forward_pre_hook(lambda m, a, p=path: seen.__setitem__(p, a[0])))
        handles.append(fc2.register_forward_hook(
            lambda m, a, out, p=path, lay=layer: out + _adapter(lay, seen[p], F.relu, 2.0)))
    expected = output_of(reference, inputs)
    for handle in handles:
        handle.remove()
    out = output_of(model, inputs)
    assert torch.allclose(out, expected, atol=1e-5)
    assert not torch.allclose(out, output_of(make_model("bart"), inputs), atol=1e-4)
    model.save_pretrained(tmp_path)
    loaded = dt.DeltaModel.from_pretrained(make_model("bart"), tmp_path)
    assert torch.allclose(output_of(loaded, inputs), out, atol=1e-6)
    # explicit targets keep their meaning: beside fc2, reading fc2's own input
    model = dt.get_delta_model(make_model("bart"), dt.BottleneckConfig(variant="parallel", target_modules=["fc2"],
                                                                       init_weights=False))
    layer = layers_of(model)["model.encoder.layers.0.fc2"]
    h = torch.randn(2, 40)
    assert torch.allclose(layer(h), layer.base_layer(h) + _adapter(layer, h, F.relu, 1.0), atol=1e-6)


def test_module_without_linear_or_tensor_output_is_refused(make_model) -> None:
    with pytest.raises(dt.TargetError, match="no linear layer"):
        dt.get_delta_model(make_model("mlp"), dt.BottleneckConfig(target_modules=["act"]))
    model = dt.get_delta_model(make_model("bert"), dt.BottleneckConfig(target_modules=["0.attention"]))
    with pytest.raises(dt.TargetError, match="return one tensor"):
        model(**make_model.inputs("bert"))


def test_two_adapters_stack_and_disable(make_model, output_of) -> None:
    base = make_model("llama_lm")
    inputs = make_model.inputs("llama_lm")
    expected = output_of(base, inputs)
    model = dt.get_delta_model(base, dt.BottleneckConfig(variant="pfeiffer", init_weights=False))
    model.add_adapter("b", dt.BottleneckConfig(variant="pfeiffer", init_weights=False))
    layer = layers_of(model)["model.layers.0.mlp.down_proj"]
    model.set_adapter(["default", "b"])
    h = torch.randn(3, 40)
    y = layer.base_layer(h)
    y = y + _adapter(layer, y, F.relu, 1.0)
    down, up = layer.adapter_down["b"], layer.adapter_up["b"]
    y = y + F.relu(y @ down.weight.T + down.bias) @ up.weight.T + up.bias
    assert torch.allclose(layer(h), y, atol=1e-6)
    with model.disable_adapter():
        assert torch.equal(output_of(model, inputs), expected)


def test_files(make_model, output_of, tmp_path) -> None:
    model = dt.get_delta_model(make_model("t5"), dt.BottleneckConfig(variant="houlsby", init_weights=False))
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "BOTTLENECK" and config["variant"] == "houlsby"
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.encoder.block.0.layer.0.SelfAttention.o.adapter_down.weight" in keys
    assert {k.rsplit(".", 2)[-2] + "." + k.rsplit(".", 1)[-1] for k in keys} == {
        "adapter_down.weight", "adapter_down.bias", "adapter_up.weight", "adapter_up.bias"}
    loaded = dt.DeltaModel.from_pretrained(make_model("t5"), tmp_path)
    inputs = make_model.inputs("t5")
    assert torch.equal(output_of(loaded, inputs), output_of(model, inputs))
