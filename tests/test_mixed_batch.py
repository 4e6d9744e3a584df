"""Mixed-adapter batches (``adapter_names=[...]``) for layer methods, task heads and ``generate``.

Reference: the same examples run one at a time with their adapter alone (``set_adapter``) or with
adapters disabled for ``"__base__"``; HF peft's own ``adapter_names`` for LoRA. Every adapter starts
from non-zero weights and is checked to change the output, so an adapter that was skipped would fail.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from _mixed_checks import (
    BASE,
    assert_generate_mixed_equals_solo,
    assert_mixed_equals_solo,
    assert_row_gradient_is_its_adapters,
    build,
    lora,
    perturbed,
)

import deltatune as dt
from deltatune.errors import AdapterNotFoundError, ConfigError, MergeError

# Explicit targets: default targets are inferred from the model's structure, which a first adapter's
# wrappers hide from a second one's inference.
IA3_TARGETS = {"llama_lm": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
               "bert_seq_cls": (["key", "value", "output.dense"], ["output.dense"]),
               "gpt2_lm": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]), "t5": (["k", "v", "wo"], ["wo"])}
OUT_PROJ = {"llama_lm": ["o_proj", "down_proj"], "bert_seq_cls": ["output.dense"], "t5": ["o", "wo"]}


def ia3(kind: str) -> dt.IA3Config:
    targets, feedforward = IA3_TARGETS[kind]
    return dt.IA3Config(target_modules=targets, feedforward_modules=feedforward, init_ia3_weights=False)


@pytest.mark.parametrize("kind", ["llama_lm", "gpt2_lm", "bert_seq_cls", "t5"])
def test_lora_ranks_alphas_dora_rslora(make_model: Any, kind: str) -> None:
    configs = {"a": lora(4, 8), "b": lora(2, 3, use_rslora=True), "c": lora(6, 5, use_dora=True), "d": lora(1, 16)}
    model = build(make_model, kind, configs)
    names = ["a", BASE, "c", "b", "a", "d", "c"]
    assert_mixed_equals_solo(model, make_model.inputs(kind, batch=len(names)), names)


def test_lora_on_embeddings(make_model: Any) -> None:
    def emb(r: int) -> dt.LoraConfig:
        return dt.LoraConfig(r=r, target_modules=["word_embeddings", "query"], init_lora_weights=False)

    model = perturbed(build(make_model, "bert", {"a": emb(2), "b": emb(5)}))
    inputs = make_model.inputs("bert", batch=4)
    inputs["input_ids"][0, -2:] = 0  # padding ids too
    with torch.no_grad():
        mixed = model(**inputs, adapter_names=["b", "a", BASE, "b"]).last_hidden_state
        for i, name in enumerate(["b", "a"]):
            model.set_adapter(name)
            ref = model(**{k: v[i : i + 1] for k, v in inputs.items()}).last_hidden_state
            torch.testing.assert_close(mixed[i : i + 1], ref, atol=1e-5, rtol=1e-5)
    model.set_adapter(["a", "b"])  # gradients: the padding id gets none, as in nn.Embedding
    model(**inputs, adapter_names=["b", "a", BASE, "b"]).last_hidden_state[0].sum().backward()
    mixed_grads = [p.grad.clone() for p in model.adapter_parameters("b")]
    model.zero_grad()
    model.set_adapter("b")
    model(**{k: v[:1] for k, v in inputs.items()}).last_hidden_state.sum().backward()
    for got, want in zip(mixed_grads, [p.grad for p in model.adapter_parameters("b")]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["llama_lm", "bert_seq_cls", "gpt2_lm"])
def test_ia3_and_lora_in_one_batch(make_model: Any, kind: str) -> None:
    configs = {"i": ia3(kind), "l": lora(4, 8), "i2": ia3(kind)}
    model = build(make_model, kind, configs)
    names = ["i", "l", BASE, "i2", "i"]
    assert_mixed_equals_solo(model, make_model.inputs(kind, batch=len(names)), names)


@pytest.mark.parametrize("kind", ["llama_lm", "bert_seq_cls", "t5"])
def test_bottleneck_variants_sizes_activations(make_model: Any, kind: str) -> None:
    def bottleneck(variant: str, size: int, act: str) -> dt.BottleneckConfig:
        return dt.BottleneckConfig(variant=variant, bottleneck_size=size, non_linearity=act, init_weights=False,
                                   target_modules=OUT_PROJ[kind])

    model = build(make_model, kind, {"h": bottleneck("houlsby", 4, "relu"), "p": bottleneck("parallel", 6, "tanh"),
                                     "h2": bottleneck("houlsby", 3, "gelu")})
    names = ["h", "p", BASE, "h2", "p"]
    assert_mixed_equals_solo(model, make_model.inputs(kind, batch=len(names)), names)
    model = build(make_model, kind, {"h": bottleneck("houlsby", 4, "relu"), "f": bottleneck("pfeiffer", 2, "swish")})
    assert_mixed_equals_solo(model, make_model.inputs(kind, batch=4), ["f", "h", BASE, "f"])


def test_each_example_uses_its_adapters_head(make_model: Any) -> None:
    config = {"target_modules": ["query", "value"], "task_type": "SEQ_CLS", "init_lora_weights": False}
    model = build(make_model, "bert_seq_cls", {"a": dt.LoraConfig(r=2, **config), "b": dt.LoraConfig(r=4, **config)})
    with torch.no_grad():  # heads that differ from each other and from the original
        for name in ("a", "b"):
            for p in model.base_model.classifier.modules_to_save[name].parameters():
                p.add_(torch.randn_like(p))
    names = ["b", "a", BASE, "a", "b"]
    assert_mixed_equals_solo(model, make_model.inputs("bert_seq_cls", batch=len(names)), names)


def test_gradients_reach_only_each_examples_adapter(make_model: Any) -> None:
    configs = {"a": lora(2, 4), "b": lora(4, 4), "i": ia3("llama_lm")}
    model = build(make_model, "llama_lm", configs)
    model.set_adapter(["a", "b", "i"])  # all trainable
    model.train()
    inputs = make_model.inputs("llama_lm", batch=3)
    assert_row_gradient_is_its_adapters(model, inputs, ["a", BASE, "i"], 0, list(configs))


def test_generate_greedy_beams_and_returned_sequences(make_model: Any) -> None:
    model = build(make_model, "llama_lm", {"a": lora(4, 16), "b": lora(2, 16, use_dora=True)})
    ids = make_model.inputs("llama_lm", batch=3, seq=5)["input_ids"]
    names = ["b", BASE, "a"]
    for kw in ({}, {"num_beams": 3, "num_return_sequences": 2}, {"num_beams": 2}):
        gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, **kw)
        assert_generate_mixed_equals_solo(model, ids, names, gen)


def test_generate_encoder_decoder(make_model: Any) -> None:
    model = build(make_model, "t5", {"a": lora(4, 16), "b": ia3("t5")})
    ids = make_model.inputs("t5", batch=3)["input_ids"]
    names = ["a", "b", BASE]
    gen = {"max_new_tokens": 5, "do_sample": False, "num_beams": 2}
    assert_generate_mixed_equals_solo(model, ids, names, gen)


def test_same_as_peft_adapter_names(make_model: Any, tmp_path: Any) -> None:
    peft = pytest.importorskip("peft")
    configs = {"a": lora(4, 8), "b": lora(2, 5, use_rslora=True), "c": lora(3, 6)}
    model = build(make_model, "llama_lm", configs)
    model.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(make_model("llama_lm"), tmp_path / "a", adapter_name="a")
    for name in ("b", "c"):
        theirs.load_adapter(tmp_path / name, adapter_name=name)
    theirs.eval()
    names = ["c", "a", BASE, "b", "c", "a"]
    inputs = make_model.inputs("llama_lm", batch=len(names))
    with torch.no_grad():
        want = theirs(**inputs, adapter_names=names).logits
        got = model(**inputs, adapter_names=names).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_bad_input_is_refused_before_work(make_model: Any) -> None:
    model = build(make_model, "llama_lm", {"a": lora(2, 4), "b": lora(2, 4)})
    inputs = make_model.inputs("llama_lm", batch=2)
    with pytest.raises(AdapterNotFoundError, match=r"\['typo'\].*\['a', 'b'\]"):
        model(**inputs, adapter_names=["a", "typo"])
    with pytest.raises(ConfigError, match="3 names but the batch has 2"):
        model(**inputs, adapter_names=["a", "b", "a"])
    with pytest.raises(ConfigError, match="one adapter name per example"):
        model(**inputs, adapter_names="a")
    model.merge_adapter(["b"])
    with pytest.raises(MergeError, match="unmerge_adapter"):
        model(**inputs, adapter_names=["a", "b"])
    model.unmerge_adapter()
    model.base_model.gradient_checkpointing_enable()
    model.train()
    with pytest.raises(ConfigError, match="gradient checkpointing"):
        model(**inputs, adapter_names=["a", "b"])


def test_layers_that_do_not_route_are_refused(make_model: Any, monkeypatch: Any) -> None:
    """A layer class that overrides ``forward`` without routing rows is refused before any work."""
    from deltatune.methods.oft.layer import OFTLinear

    monkeypatch.setattr(OFTLinear, "routes_rows", False)
    model = build(make_model, "llama_lm", {"a": dt.OFTConfig(r=4, oft_block_size=0, target_modules=["q_proj"]),
                                           "l": lora(2, 4)})
    with pytest.raises(ConfigError, match=r"\['oft'\] adapters cannot share a mixed-adapter batch"):
        model(**make_model.inputs("llama_lm", batch=2), adapter_names=["a", "l"])


def prompt_configs(kind: str) -> dict[str, Any]:
    task = {"task_type": "SEQ_CLS"} if kind == "bert_seq_cls" else {}
    return {"p3": dt.PromptTuningConfig(num_virtual_tokens=3, **task), "p5": dt.PromptTuningConfig(num_virtual_tokens=5, **task),
            "pt": dt.PTuningConfig(num_virtual_tokens=2, **task), "l": lora(2, 4, **task)}


@pytest.mark.parametrize("kind", ["llama_lm", "gpt2_lm", "bert_seq_cls", "t5"])
def test_prompt_and_p_tuning_with_different_token_counts(make_model: Any, kind: str) -> None:
    model = build(make_model, kind, prompt_configs(kind))
    names = ["p3", "l", BASE, "p5", "pt", "p3"]
    assert_mixed_equals_solo(model, make_model.inputs(kind, batch=len(names)), names)


def test_prompt_labels_loss_per_row(make_model: Any) -> None:
    """Decoder-only labels: -100 on every virtual/padding column, so each row's token losses are its solo ones."""
    model = build(make_model, "llama_lm", prompt_configs("llama_lm"))
    names = ["p5", "l", "p3"]
    inputs = make_model.inputs("llama_lm", batch=3)
    with torch.no_grad():
        out = model(**inputs, labels=inputs["input_ids"], adapter_names=names)
        total, tokens = 0.0, 0
        for i, name in enumerate(names):
            model.set_adapter(name)
            one = {k: v[i : i + 1] for k, v in inputs.items()}
            count = one["input_ids"].shape[1] - (name == "l")  # alone, a LoRA row cannot predict its first token
            total, tokens = total + model(**one, labels=one["input_ids"]).loss * count, tokens + count
    torch.testing.assert_close(out.loss, total / tokens, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["llama_lm", "t5"])
def test_prompt_generate_with_beams(make_model: Any, kind: str) -> None:
    model = build(make_model, kind, prompt_configs(kind))
    ids = make_model.inputs(kind, batch=4, seq=5)["input_ids"]
    names = ["p5", BASE, "l", "p3"]
    gen = {"max_new_tokens": 5, "do_sample": False, "num_beams": 2, "num_return_sequences": 2, "pad_token_id": 0}
    assert_generate_mixed_equals_solo(model, ids, names, gen)


@pytest.mark.parametrize("kind", ["llama_lm", "gpt2_lm", "bert_seq_cls"])
def test_prefix_tuning_with_different_lengths(make_model: Any, kind: str) -> None:
    task = {"task_type": "SEQ_CLS"} if kind == "bert_seq_cls" else {}
    configs = {"x2": dt.PrefixTuningConfig(num_virtual_tokens=2, **task),
               "x4": dt.PrefixTuningConfig(num_virtual_tokens=4, **task), "l": lora(2, 4, **task)}
    model = build(make_model, kind, configs)
    names = ["x4", "l", BASE, "x2", "x4"]
    assert_mixed_equals_solo(model, make_model.inputs(kind, batch=len(names)), names)
    if kind == "llama_lm":
        ids = make_model.inputs(kind, batch=len(names), seq=5)["input_ids"]
        gen = {"max_new_tokens": 5, "do_sample": False, "num_beams": 2, "pad_token_id": 0}
        assert_generate_mixed_equals_solo(model, ids, names, gen)


def test_cached_stacks_follow_weight_changes_and_new_adapters(make_model: Any) -> None:
    """Under no_grad the stacks are cached; an in-place update (optimizer step, load) or a new adapter rebuilds them."""
    model = build(make_model, "llama_lm", {"a": lora(2, 4), "b": lora(4, 4)})
    inputs = make_model.inputs("llama_lm", batch=3)
    names = ["a", "b", BASE]
    assert_mixed_equals_solo(model, inputs, names)
    with torch.no_grad():
        for p in model.adapter_parameters("b"):
            p.mul_(-2.0)
    assert_mixed_equals_solo(model, inputs, names)
    model.add_adapter("c", lora(3, 2))
    assert_mixed_equals_solo(model, inputs, ["c", "b", "a"])
    model.delete_adapter("a")
    assert_mixed_equals_solo(model, inputs, ["c", "b", BASE])


def test_a_hook_on_the_base_layer_keeps_the_base_output(make_model: Any) -> None:
    """Without gradients LoRA adds into the base layer's output in place, except where a hook may hold it."""
    model = build(make_model, "llama_lm", {"a": lora(2, 4), "b": lora(4, 4)})
    inputs = make_model.inputs("llama_lm", batch=2)
    wrapper = model.base_model.model.model.layers[0].self_attn.q_proj
    held: list[tuple[torch.Tensor, torch.Tensor]] = []
    handle = wrapper.base_layer.register_forward_hook(lambda m, args, out: held.append((out, out.clone())))
    try:
        model.set_adapter("a")
        with torch.no_grad():
            model(**inputs, adapter_names=["a", "b"])  # mixed path
            model(**inputs)  # single-adapter path
    finally:
        handle.remove()
    assert len(held) == 2
    for out, at_hook_time in held:
        assert torch.equal(out, at_hook_time)
