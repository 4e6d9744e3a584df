"""The public API: wrapping, counting, several adapters, disabling, merging and unloading.

Every numeric check compares against a reference computed in the test: the untouched base model,
or a copy of it whose weights were changed by the LoRA formula ``W + (alpha / r) B A`` written here.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.layer import DeltaLayer
from deltatune.modules_to_save import ModulesToSaveWrapper


def lora_ab(model: nn.Module, path: str, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of adapter ``name`` at module ``path``, read from the parameter names (HF peft's naming)."""
    params = dict(getattr(model, "base_model", model).named_parameters())
    return params[f"{path}.lora_A.{name}.weight"].detach(), params[f"{path}.lora_B.{name}.weight"].detach()


def no_wrappers(model: nn.Module) -> bool:
    return not any(isinstance(m, (DeltaLayer, ModulesToSaveWrapper)) for m in model.modules())


def test_get_delta_model_freezes_base_and_counts_parameters(make_model, capsys) -> None:
    base = make_model("bert_seq_cls")
    total_before = sum(p.numel() for p in base.parameters())
    cfg = dt.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS")
    model = dt.get_delta_model(base, cfg)
    assert isinstance(model, dt.DeltaModel)
    trainable, total = model.trainable_parameters()
    # 2 layers x (query, value), each A (4, 32) + B (32, 4); plus the classifier copy (32*3 + 3).
    expected_lora = 2 * 2 * (4 * 32 + 32 * 4)
    head = 32 * 3 + 3
    assert trainable == expected_lora + head
    assert total == total_before + expected_lora + head  # the head's trained copy is a new tensor
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(".lora_A." in n or ".lora_B." in n or ".modules_to_save." in n for n in names)
    model.print_trainable_parameters()
    printed = capsys.readouterr().out
    assert f"trainable params: {trainable:,}" in printed and f"all params: {total:,}" in printed


def test_default_init_starts_equal_to_base(make_model, output_of) -> None:
    base = make_model("bert")
    inputs = make_model.inputs("bert")
    expected = output_of(base, inputs)
    model = dt.get_delta_model(base, dt.LoraConfig(r=4, target_modules=["query", "value"]))
    assert torch.equal(output_of(model, inputs), expected)


def test_config_rejects_bad_values() -> None:
    for bad in ({"r": 0}, {"r": -2}, {"rank_pattern": {"query": 0}}, {"lora_dropout": 1.5}, {"bias": "some"},
                {"init_lora_weights": "svd"}, {"task_type": "CLASSIFY"}):
        with pytest.raises(dt.ConfigError) as info:
            dt.LoraConfig(target_modules=["query"], **bad)
        assert str(next(iter(bad.values()))) in str(info.value) or "task_type" in str(info.value)


def test_multiple_active_adapters_add_their_deltas(make_model, output_of) -> None:
    """With adapters a and b active: h = W x + s_a B_a A_a x + s_b B_b A_b x (checked on a whole MLP)."""
    base = make_model("mlp")
    reference = copy.deepcopy(base)
    inputs = make_model.inputs("mlp")
    model = dt.get_delta_model(base, dt.LoraConfig(r=2, lora_alpha=3, target_modules=["fc1"], init_lora_weights=False))
    model.add_adapter("b", dt.LoraConfig(r=3, lora_alpha=5, target_modules=["fc1", "fc2"], init_lora_weights=False))
    model.set_adapter(["default", "b"])
    assert model.active_adapters == ["default", "b"]

    a_a, b_a = lora_ab(model, "fc1", "default")
    a_b1, b_b1 = lora_ab(model, "fc1", "b")
    a_b2, b_b2 = lora_ab(model, "fc2", "b")
    with torch.no_grad():
        reference.fc1.weight += (3 / 2) * b_a @ a_a + (5 / 3) * b_b1 @ a_b1
        reference.fc2.weight += (5 / 3) * b_b2 @ a_b2
    torch.testing.assert_close(output_of(model, inputs), output_of(reference, inputs), atol=1e-6, rtol=0)

    # Only the active adapters train.
    model.set_adapter("b")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".b." in n for n in trainable)


def test_set_delete_adapter_and_unknown_names(make_model, output_of) -> None:
    base = make_model("mlp")
    inputs = make_model.inputs("mlp")
    expected = output_of(base, inputs)
    model = dt.get_delta_model(base, dt.LoraConfig(r=2, target_modules=["fc1"], init_lora_weights=False))
    model.add_adapter("b", dt.LoraConfig(r=2, target_modules=["fc2"], init_lora_weights=False))
    with pytest.raises(dt.ConfigError, match="exists already"):
        model.add_adapter("b", dt.LoraConfig(r=2, target_modules=["fc2"]))
    with pytest.raises(dt.AdapterNotFoundError, match="'nope'.*default"):
        model.set_adapter("nope")
    model.set_adapter("b")
    out_b = output_of(model, inputs)
    model.delete_adapter("default")
    assert list(model.peft_config) == ["b"] and model.active_adapters == ["b"]
    assert isinstance(model.base_model.fc1, nn.Linear)  # wrapper gone once it holds no adapter
    torch.testing.assert_close(output_of(model, inputs), out_b, atol=0, rtol=0)
    model.delete_adapter("b")
    assert no_wrappers(model.base_model)
    torch.testing.assert_close(output_of(model.base_model, inputs), expected, atol=0, rtol=0)


def test_disable_adapter_gives_exact_base_outputs(make_model, output_of) -> None:
    base = make_model("bert_seq_cls")
    inputs = make_model.inputs("bert_seq_cls")
    expected = output_of(base, inputs)
    cfg = dt.LoraConfig(r=4, target_modules=["query", "value", "dense"], task_type="SEQ_CLS", init_lora_weights=False)
    model = dt.get_delta_model(base, cfg)
    with torch.no_grad():
        model.base_model.classifier.modules_to_save["default"].weight.add_(1.0)  # a trained head
    adapted = output_of(model, inputs)
    assert (adapted - expected).abs().max() > 1e-3
    with model.disable_adapter():
        assert torch.equal(output_of(model, inputs), expected)
    torch.testing.assert_close(output_of(model, inputs), adapted, atol=0, rtol=0)

    model.merge_adapter()
    with model.disable_adapter():
        torch.testing.assert_close(output_of(model, inputs), expected, atol=1e-5, rtol=0)
    # Leaving the context restores the merged state.
    assert all(w.merged_adapters == ["default"] for w in model.modules() if isinstance(w, DeltaLayer))
    torch.testing.assert_close(output_of(model, inputs), adapted, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["bert", "gpt2_lm", "llama_lm"])
def test_merge_unmerge_restores_base_weights(kind, make_model, output_of) -> None:
    base = make_model(kind)
    inputs = make_model.inputs(kind)
    cfg = dt.LoraConfig(r=4, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
    model = dt.get_delta_model(base, cfg)
    model.add_adapter("second", dt.LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False))
    model.set_adapter(["default", "second"])
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    unmerged = output_of(model, inputs)

    model.merge_adapter()
    changed = max((dict(model.named_parameters())[n] - w).abs().max().item() for n, w in before.items())
    assert changed > 1e-2  # non-zero adapters really changed the weights
    torch.testing.assert_close(output_of(model, inputs), unmerged, atol=1e-5, rtol=0)

    model.unmerge_adapter()
    params = dict(model.named_parameters())
    assert max((params[n] - w).abs().max().item() for n, w in before.items()) <= 1e-6
    torch.testing.assert_close(output_of(model, inputs), unmerged, atol=1e-5, rtol=0)


def test_delete_merged_adapter_is_refused(make_model) -> None:
    model = dt.get_delta_model(make_model("mlp"), dt.LoraConfig(r=2, target_modules=["fc1"], init_lora_weights=False))
    model.merge_adapter()
    merged_weight = model.base_model.fc1.base_layer.weight.detach().clone()
    with pytest.raises(dt.MergeError, match="unmerge_adapter"):
        model.delete_adapter("default")
    assert "default" in model.peft_config
    assert torch.equal(model.base_model.fc1.base_layer.weight, merged_weight)
    model.unmerge_adapter()
    model.delete_adapter("default")
    assert isinstance(model.base_model.fc1, nn.Linear)


def test_merge_and_unload_returns_plain_model(make_model, output_of) -> None:
    base = make_model("llama_lm")
    inputs = make_model.inputs("llama_lm")
    model = dt.get_delta_model(base, dt.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    expected = output_of(model, inputs)
    plain = model.merge_and_unload()
    assert type(plain).__name__ == "LlamaForCausalLM" and no_wrappers(plain)
    torch.testing.assert_close(output_of(plain, inputs), expected, atol=1e-5, rtol=0)


def test_merge_and_unload_seq_cls_round_trips_through_transformers(make_model, output_of, train, tmp_path) -> None:
    from transformers import AutoModelForSequenceClassification

    inputs = make_model.inputs("bert_seq_cls")
    cfg = dt.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS")
    model = dt.get_delta_model(make_model("bert_seq_cls"), cfg)
    train(model, inputs, steps=3)
    model.eval()
    expected = output_of(model, inputs)
    with model.disable_adapter():
        assert (output_of(model, inputs) - expected).abs().max() > 1e-4  # the adapter (and head) did change

    plain = model.merge_and_unload()
    assert type(plain).__name__ == "BertForSequenceClassification" and no_wrappers(plain)
    plain.save_pretrained(tmp_path)
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert no_wrappers(reloaded)
    torch.testing.assert_close(output_of(reloaded, inputs), expected, atol=1e-5, rtol=0)


def test_unload_restores_original_model(make_model, output_of) -> None:
    base = make_model("gpt2_lm")
    inputs = make_model.inputs("gpt2_lm")
    expected = output_of(base, inputs)
    model = dt.get_delta_model(base, dt.LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights=False))
    model.merge_adapter()
    plain = model.unload()
    assert no_wrappers(plain)
    torch.testing.assert_close(output_of(plain, inputs), expected, atol=1e-6, rtol=0)


class LinearThenEmbedding(nn.Module):
    """A linear layer met before an embedding, so a per-target failure comes after a first success."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(6, 6)
        self.emb = nn.Embedding(10, 6)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.proj(self.emb(ids))


def test_failed_add_adapter_leaves_model_unchanged(make_model, output_of) -> None:
    """PiSSA rewrites the base weight of every linear target; it cannot wrap the embedding met later.

    The whole adapter is refused before ``proj`` is touched, and the first adapter is unaffected.
    """
    torch.manual_seed(0)
    model = dt.get_delta_model(LinearThenEmbedding(), dt.LoraConfig(r=2, target_modules=["proj"]))
    structure = [n for n, _ in model.named_modules()]
    weight = model.base_model.proj.base_layer.weight.detach().clone()
    ids = torch.tensor([[1, 2, 3]])
    expected = output_of(model, {"ids": ids})
    bad = dt.LoraConfig(r=2, target_modules=["proj", "emb"], init_lora_weights="pissa")
    with pytest.raises(dt.TargetError, match=r"emb: .*pissa"):
        model.add_adapter("bad", bad)
    assert list(model.peft_config) == ["default"]
    assert [n for n, _ in model.named_modules()] == structure
    assert torch.equal(model.base_model.proj.base_layer.weight, weight)
    torch.testing.assert_close(output_of(model, {"ids": ids}), expected, atol=0, rtol=0)


def test_failure_while_wrapping_rolls_back(make_model, monkeypatch) -> None:
    """An error in the middle of wrapping (after some modules were wrapped) removes the half-added adapter."""
    from deltatune.methods.lora import layer as lora_layer

    model = dt.get_delta_model(make_model("bert"), dt.LoraConfig(r=2, target_modules=["query"]))
    structure = [n for n, _ in model.named_modules()]
    calls = {"n": 0}
    real_add = lora_layer.LoraLinear.add

    def flaky_add(self, name, config, path=""):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated failure")
        real_add(self, name, config, path)

    monkeypatch.setattr(lora_layer.LoraLinear, "add", flaky_add)
    with pytest.raises(RuntimeError, match="simulated"):
        model.add_adapter("b", dt.LoraConfig(r=2, target_modules=["query", "value"]))
    assert calls["n"] == 3 and list(model.peft_config) == ["default"]
    assert [n for n, _ in model.named_modules()] == structure


def test_merge_into_tied_weights_is_refused(make_model, output_of) -> None:
    """GPT-2 ties wte to lm_head: merging an embedding LoRA would change the output head too."""
    base = make_model("gpt2_lm")
    assert base.lm_head.weight is base.transformer.wte.weight
    inputs = make_model.inputs("gpt2_lm")
    model = dt.get_delta_model(base, dt.LoraConfig(r=2, target_modules=["wte", "c_attn"], init_lora_weights=False))
    expected = output_of(model, inputs)
    weight = base.lm_head.weight.detach().clone()
    with pytest.raises(dt.MergeError, match=r"transformer\.wte is shared with \['lm_head.weight'\]"):
        model.merge_adapter()
    assert torch.equal(base.lm_head.weight, weight)
    assert not any(w.merged_adapters for w in model.modules() if isinstance(w, DeltaLayer))
    torch.testing.assert_close(output_of(model, inputs), expected, atol=0, rtol=0)


def test_safe_merge_failure_leaves_every_layer_unmerged(make_model) -> None:
    model = dt.get_delta_model(make_model("bert"), dt.LoraConfig(r=2, target_modules=["query"], init_lora_weights=False))
    layers = [m for m in model.modules() if isinstance(m, DeltaLayer)]
    weights = [m.base_layer.weight.detach().clone() for m in layers]
    with torch.no_grad():
        layers[-1].lora_B["default"].weight[0, 0] = float("inf")  # only the last layer goes bad
    with pytest.raises(dt.MergeError, match="NaN/inf"):
        model.merge_adapter(safe_merge=True)
    assert all(not m.merged_adapters for m in layers)
    assert max((m.base_layer.weight - w).abs().max().item() for m, w in zip(layers, weights)) <= 1e-6


def test_switching_away_from_a_merged_adapter_unmerges_it(make_model, output_of) -> None:
    base = make_model("mlp")
    inputs = make_model.inputs("mlp")
    model = dt.get_delta_model(base, dt.LoraConfig(r=2, target_modules=["fc1"], init_lora_weights=False))
    model.add_adapter("b", dt.LoraConfig(r=2, target_modules=["fc1"], init_lora_weights=False))
    model.set_adapter("b")
    only_b = output_of(model, inputs)
    model.set_adapter("default")
    model.merge_adapter()
    with pytest.warns(UserWarning, match="unmerged"):
        model.set_adapter("b")
    assert not model.base_model.fc1.merged_adapters
    torch.testing.assert_close(output_of(model, inputs), only_b, atol=1e-6, rtol=0)


def test_bad_target_spec_types_are_refused(make_model) -> None:
    with pytest.raises(dt.ConfigError, match="target_modules=5"):
        dt.LoraConfig(target_modules=5)
    with pytest.raises(dt.ConfigError, match="exclude_modules"):
        dt.LoraConfig(target_modules=["q"], exclude_modules=[1, 2])
    base = make_model("bert")
    flags = [p.requires_grad for p in base.parameters()]
    with pytest.raises(dt.TargetError):
        dt.get_delta_model(base, dt.LoraConfig(target_modules=["nothing_here"]))
    assert [p.requires_grad for p in base.parameters()] == flags  # a failed wrap hands the model back as it was


@pytest.mark.parametrize("name", ["", "a.b", "x/y", "..\\\\up"])
def test_bad_adapter_names(name, make_model) -> None:
    model = dt.get_delta_model(make_model("mlp"), dt.LoraConfig(r=2, target_modules=["fc1"]))
    with pytest.raises(dt.ConfigError, match="must be non-empty and contain no"):
        model.add_adapter(name, dt.LoraConfig(r=2, target_modules=["fc2"]))
