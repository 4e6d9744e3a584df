"""Which modules a layer method wraps: names, suffixes, regexes, all-linear, filters, patterns, heads."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.layer import DeltaLayer
from deltatune.modules_to_save import ModulesToSaveWrapper


def wrapped_paths(model: dt.DeltaModel) -> set[str]:
    """Module paths (in the base model) that carry a LoRA wrapper."""
    return {p for p, m in model.base_model.named_modules() if isinstance(m, DeltaLayer)}


def linear_paths(model: nn.Module) -> set[str]:
    return {p for p, m in model.named_modules() if isinstance(m, nn.Linear)}


def test_exact_names_and_suffixes(make_model) -> None:
    model = dt.get_delta_model(make_model("bert"), dt.LoraConfig(r=2, target_modules=["query", "layer.1.output.dense"]))
    assert wrapped_paths(model) == {
        "encoder.layer.0.attention.self.query", "encoder.layer.1.attention.self.query", "encoder.layer.1.output.dense",
    }
    # A suffix matches whole dotted components only: "uery" is not "query".
    with pytest.raises(dt.TargetError):
        dt.get_delta_model(make_model("bert"), dt.LoraConfig(r=2, target_modules=["uery"]))
    # An exact full path.
    model = dt.get_delta_model(make_model("bert"), dt.LoraConfig(r=2, target_modules=["pooler.dense"]))
    assert wrapped_paths(model) == {"pooler.dense"}


def test_regex_must_match_the_whole_path(make_model) -> None:
    model = dt.get_delta_model(make_model("bert"), dt.LoraConfig(r=2, target_modules=r".*layer\.0\.attention\.self\.(key|value)"))
    assert wrapped_paths(model) == {"encoder.layer.0.attention.self.key", "encoder.layer.0.attention.self.value"}
    # "query" alone as a regex string does not match "encoder.layer.0.attention.self.query" (full match).
    with pytest.raises(dt.TargetError):
        dt.get_delta_model(make_model("bert"), dt.LoraConfig(r=2, target_modules="query"))


@pytest.mark.parametrize("kind, head", [("gpt2_lm", "lm_head"), ("llama_lm", "lm_head"), ("t5", "lm_head")])
def test_all_linear_excludes_output_head(kind, head, make_model) -> None:
    base = make_model(kind)
    linear = {p for p, m in base.named_modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"}
    model = dt.get_delta_model(base, dt.LoraConfig(r=2, target_modules="all-linear"))
    assert head in linear
    assert wrapped_paths(model) == linear - {head}


def test_all_linear_on_seq_cls_leaves_the_head_to_modules_to_save(make_model) -> None:
    base = make_model("roberta_seq_cls")
    linear = linear_paths(base)
    model = dt.get_delta_model(base, dt.LoraConfig(r=2, target_modules="all-linear", task_type="SEQ_CLS"))
    head = {p for p in linear if p.startswith("classifier.")}
    assert head == {"classifier.dense", "classifier.out_proj"}
    assert wrapped_paths(model) == linear - head
    assert isinstance(model.base_model.classifier, ModulesToSaveWrapper)


def test_exclude_modules(make_model) -> None:
    base = make_model("llama_lm")
    cfg = dt.LoraConfig(r=2, target_modules="all-linear", exclude_modules=["o_proj", "mlp.down_proj"])
    model = dt.get_delta_model(base, cfg)
    paths = wrapped_paths(model)
    assert paths and not any(p.endswith(("o_proj", "down_proj")) for p in paths)
    assert any(p.endswith("up_proj") for p in paths)
    # A regex string works for exclude_modules as for target_modules.
    cfg = dt.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], exclude_modules=r".*\.1\.self_attn\.v_proj")
    model = dt.get_delta_model(make_model("llama_lm"), cfg)
    assert wrapped_paths(model) == {"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
                                    "model.layers.1.self_attn.q_proj"}


def test_layers_to_transform_and_layers_pattern(make_model) -> None:
    model = dt.get_delta_model(make_model("bert"), dt.LoraConfig(r=2, target_modules=["query"], layers_to_transform=1))
    assert wrapped_paths(model) == {"encoder.layer.1.attention.self.query"}
    # T5: "block.<i>" and "layer.<j>" both carry numbers; layers_pattern says which one is meant.
    cfg = dt.LoraConfig(r=2, target_modules=["wo"], layers_to_transform=[1], layers_pattern="block")
    model = dt.get_delta_model(make_model("t5"), cfg)
    assert wrapped_paths(model) == {"encoder.block.1.layer.1.DenseReluDense.wo", "decoder.block.1.layer.2.DenseReluDense.wo"}
    with pytest.raises(dt.ConfigError, match="layers_to_transform"):
        dt.LoraConfig(r=2, target_modules=["q"], layers_pattern="block")


def test_rank_and_alpha_patterns(make_model) -> None:
    cfg = dt.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], init_lora_weights=False,
                        rank_pattern={r"layer\.1\.attention\.self\.query": 2}, alpha_pattern={"value": 3})
    model = dt.get_delta_model(make_model("bert"), cfg)
    layers = {p: m for p, m in model.base_model.named_modules() if isinstance(m, DeltaLayer)}
    q1 = layers["encoder.layer.1.attention.self.query"]
    q0 = layers["encoder.layer.0.attention.self.query"]
    v0 = layers["encoder.layer.0.attention.self.value"]
    assert q1.lora_A["default"].weight.shape == (2, 32) and q1.lora_B["default"].weight.shape == (32, 2)
    assert q0.lora_A["default"].weight.shape == (4, 32)
    assert q1.scaling["default"] == 8 / 2 and q0.scaling["default"] == 8 / 4 and v0.scaling["default"] == 3 / 4
    x = torch.randn(3, 32)
    expected = v0.base_layer(x) + (3 / 4) * x @ v0.lora_A["default"].weight.T @ v0.lora_B["default"].weight.T
    torch.testing.assert_close(v0(x), expected)


def test_modules_to_save_and_seq_cls_head(make_model, output_of) -> None:
    base = make_model("bert_seq_cls")
    model = dt.get_delta_model(base, dt.LoraConfig(r=2, target_modules=["query"], task_type="SEQ_CLS"))
    head = model.base_model.classifier
    assert isinstance(head, ModulesToSaveWrapper)
    assert model.peft_config["default"].modules_to_save == ["classifier"]
    assert all(p.requires_grad for p in head.modules_to_save["default"].parameters())
    assert not any(p.requires_grad for p in head.original_module.parameters())
    # An explicit modules_to_save entry without a task type: the pooler is trained in full.
    model = dt.get_delta_model(make_model("bert"), dt.LoraConfig(r=2, target_modules=["query"], modules_to_save=["pooler"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "base_model.pooler.modules_to_save.default.dense.weight" in trainable
    assert not any(n.startswith("base_model.pooler.original_module") for n in trainable)
    # DistilBERT's SEQ_CLS head has two parts; both are saved.
    model = dt.get_delta_model(make_model("distilbert_seq_cls"), dt.LoraConfig(r=2, target_modules=["q_lin"], task_type="SEQ_CLS"))
    assert sorted(model.peft_config["default"].modules_to_save) == ["classifier", "pre_classifier"]


def test_target_matching_nothing_names_close_modules(make_model) -> None:
    with pytest.raises(dt.TargetError) as info:
        dt.get_delta_model(make_model("bert"), dt.LoraConfig(r=2, target_modules=["querry", "valeu"]))
    message = str(info.value)
    assert "querry" in message and "'query'" in message and "'value'" in message
    with pytest.raises(dt.TargetError, match="q_proj"):
        dt.get_delta_model(make_model("llama_lm"), dt.LoraConfig(r=2, target_modules=["q_projection"]))


def test_unsupported_module_type_is_refused(make_model) -> None:
    with pytest.raises(dt.TargetError, match="LayerNorm is not supported"):
        dt.get_delta_model(make_model("bert"), dt.LoraConfig(r=2, target_modules=["LayerNorm"]))


def test_default_targets_follow_the_architecture(make_model) -> None:
    model = dt.get_delta_model(make_model("llama_lm"), dt.LoraConfig(r=2))
    assert {p.rsplit(".", 1)[-1] for p in wrapped_paths(model)} == {"q_proj", "v_proj"}
    with pytest.raises(dt.ConfigError, match="target_modules"):
        dt.get_delta_model(make_model("mlp"), dt.LoraConfig(r=2))


def test_plain_mlp(make_model, output_of, train) -> None:
    base = make_model("mlp")
    inputs = make_model.inputs("mlp")
    expected = output_of(base, inputs)
    model = dt.get_delta_model(base, dt.LoraConfig(r=2, target_modules=["fc1", "fc2"], modules_to_save=["head"]))
    assert wrapped_paths(model) == {"fc1", "fc2"}
    torch.testing.assert_close(output_of(model, inputs), expected, atol=0, rtol=0)
    train(model, inputs, steps=2)
    model.eval()
    assert (output_of(model, inputs) - expected).abs().max() > 1e-4
    with model.disable_adapter():
        torch.testing.assert_close(output_of(model, inputs), expected, atol=0, rtol=0)


def test_plain_cnn_all_layer_types(make_model, output_of) -> None:
    base = make_model("cnn")
    inputs = make_model.inputs("cnn")
    model = dt.get_delta_model(base, dt.LoraConfig(r=2, target_modules=["conv2d", "conv1d", "fc"], init_lora_weights=False))
    assert wrapped_paths(model) == {"conv2d", "conv1d", "fc"}
    unmerged = output_of(model, inputs)
    model.merge_adapter()
    torch.testing.assert_close(output_of(model, inputs), unmerged, atol=1e-5, rtol=0)
    # all-linear on a plain module: only the Linear layer (a plain module has no output-head lookup).
    model = dt.get_delta_model(make_model("cnn"), dt.LoraConfig(r=2, target_modules="all-linear"))
    assert wrapped_paths(model) == {"fc"}


def test_second_adapter_never_wraps_a_trained_head(make_model) -> None:
    """The first adapter's modules_to_save head stays a head: "all-linear" for a second adapter skips it."""
    model = dt.get_delta_model(make_model("bert_seq_cls"), dt.LoraConfig(r=2, target_modules=["query"], task_type="SEQ_CLS"))
    model.add_adapter("b", dt.LoraConfig(r=2, target_modules="all-linear"))
    assert isinstance(model.base_model.classifier, ModulesToSaveWrapper)
    assert not any(p.startswith("classifier") for p in wrapped_paths(model))
    assert "bert.pooler.dense" in wrapped_paths(model)


def test_modules_inside_a_wrapped_block_stay_targetable(tmp_path) -> None:
    """A bottleneck adapter wraps a whole feed-forward block; later adapters still find the projections
    inside it under their original paths (they used to match nothing), and the result saves and reloads."""
    import transformers as tf

    from deltatune.inject import iter_wrappers

    def tiny() -> torch.nn.Module:
        torch.manual_seed(0)
        cfg = tf.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=1)
        return tf.LlamaForCausalLM(cfg)

    model = dt.get_delta_model(tiny(), dt.BottleneckConfig(variant="parallel"))
    block = [p for p, w in iter_wrappers(model.base_model) if "default" in getattr(w, "adapter_names", [])]
    model.add_adapter("pf", dt.BottleneckConfig(variant="pfeiffer"))
    model.add_adapter("lora", dt.LoraConfig(r=2, target_modules=["down_proj"], init_lora_weights=False))
    wrapped = {p for p, w in iter_wrappers(model.base_model) if "lora" in getattr(w, "adapter_names", [])}
    assert wrapped == {"model.layers.0.mlp.down_proj"} and all(not p.endswith("down_proj") for p in block)
    ids = torch.randint(0, 50, (2, 5))
    model.set_adapter(["default", "pf"])
    without = model(input_ids=ids).logits
    model.set_adapter(["default", "pf", "lora"])
    with_lora = model(input_ids=ids).logits
    assert not torch.allclose(without, with_lora)  # the LoRA inside the wrapped block acts
    model.save_pretrained(tmp_path, selected_adapters=["lora"])
    reloaded = dt.DeltaModel.from_pretrained(tiny(), tmp_path / "lora", adapter_name="lora")
    with model.disable_adapter():
        base = model(input_ids=ids).logits
    model.set_adapter("lora")
    assert torch.allclose(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-6)
    assert not torch.allclose(model(input_ids=ids).logits, base)
