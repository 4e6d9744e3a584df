"""Prefix tuning (Li & Liang, arXiv 2101.00190): key/value prefixes in every attention layer.

The central reference: a prefix equal to the keys/values the frozen model itself caches for real
tokens ``x`` must make the model compute, on input ``y``, exactly what it computes on ``[x ; y]``
(forward and greedy generation). For bidirectional encoders (BERT) the layer-0 attention is checked
against the attention formula written out here. HF peft cross-checks: test_input_methods_peft_compat.py.
"""

from __future__ import annotations

import pytest
import torch
from _input_methods import TASK, check_save_load, check_training_step, greedy, main_output, reference_greedy
from conftest import tiny_inputs, tiny_model
from safetensors.torch import load_file

import deltatune as dt

P = 3
FAMILIES = ("bert_seq_cls", "roberta_seq_cls", "gpt2_lm", "llama_lm", "t5", "bart")


def prefix_model(kind: str, **options: object) -> dt.DeltaModel:
    config = dt.PrefixTuningConfig(task_type=TASK[kind], num_virtual_tokens=P, **options)
    return dt.get_delta_model(tiny_model(kind), config).eval()


def delta_of(model: dt.DeltaModel) -> torch.nn.Module:
    return model.input_deltas["default"]


def flat_prefix(cache: object) -> torch.Tensor:
    """A cache's keys/values of batch row 0 in HF peft's flat layout: ``(P, [L0 keys, L0 values, L1 keys, ...])``."""
    cache = getattr(cache, "self_attention_cache", cache)
    parts = []
    for layer in cache.layers:
        for tensor in (layer.keys[0], layer.values[0]):  # (H, P, Dh)
            parts.append(tensor.permute(1, 0, 2).reshape(tensor.shape[1], -1))  # (P, H * Dh)
    return torch.cat(parts, dim=-1)


def set_prefix(model: dt.DeltaModel, prefix: torch.Tensor) -> None:
    with torch.no_grad():
        delta_of(model).table.embedding.weight.copy_(prefix)


X = torch.tensor([[11, 42, 7]])  # the "real tokens" whose cache becomes the prefix


@pytest.mark.parametrize("kind", ["gpt2_lm", "llama_lm"])
def test_prefix_of_real_token_cache_equals_concatenated_input(kind: str) -> None:
    base = tiny_model(kind)
    with torch.no_grad():
        prefix = flat_prefix(base(input_ids=X, use_cache=True).cache)
    model = prefix_model(kind)
    assert delta_of(model).table.embedding.weight.shape == prefix.shape
    set_prefix(model, prefix)
    inputs = tiny_inputs(kind)
    inputs["attention_mask"][1, :2] = 0  # left padding sits between x and y in the concatenation
    concat = {"input_ids": torch.cat([X.expand(2, -1), inputs["input_ids"]], dim=1),
              "attention_mask": torch.cat([torch.ones(2, P, dtype=torch.long), inputs["attention_mask"]], dim=1)}
    torch.testing.assert_close(main_output(model, inputs), main_output(base, concat)[:, P:], atol=2e-6, rtol=0)
    # generate keeps the prefix at every step: the same new tokens as the base model after x
    ours, theirs = greedy(model, inputs, new=5), greedy(base, concat, new=5)
    assert torch.equal(ours[:, 7:], theirs[:, P + 7:]) and torch.equal(ours[:, :7], inputs["input_ids"])
    beams = greedy(model, inputs, new=3, num_beams=2, num_return_sequences=2)  # cache rows = beams x batch
    assert torch.equal(beams, greedy(base, concat, new=3, num_beams=2, num_return_sequences=2)[:, P:])


@pytest.mark.parametrize("kind", ["t5", "bart"])
def test_decoder_prefix_of_real_token_cache_equals_longer_decoder_input(kind: str) -> None:
    base = tiny_model(kind)
    enc = tiny_inputs(kind, batch=1)["input_ids"]
    with torch.no_grad():
        prefix = flat_prefix(base(input_ids=enc, decoder_input_ids=X, use_cache=True).cache)
    model = prefix_model(kind, num_transformer_submodules=1)  # each decoder layer its own prefix
    set_prefix(model, prefix)
    dec = torch.tensor([[5, 9, 31, 2]])
    expected = main_output(base, {"input_ids": enc, "decoder_input_ids": torch.cat([X, dec], dim=1)})[:, P:]
    torch.testing.assert_close(main_output(model, {"input_ids": enc, "decoder_input_ids": dec}), expected,
                               atol=2e-6, rtol=0)


@pytest.mark.parametrize(("kind", "submodules"), [("t5", 1), ("t5", None), ("bart", None)])
def test_seq2seq_generate_equals_stepwise_forward(kind: str, submodules: int | None) -> None:
    model = prefix_model(kind, num_transformer_submodules=submodules)
    ids = tiny_inputs(kind)["input_ids"]
    assert torch.equal(greedy(model, {"input_ids": ids}, new=5), reference_greedy(model, ids, True, new=5))


def test_generate_without_cache_request_still_keeps_the_prefix() -> None:
    model = prefix_model("llama_lm")
    ids = tiny_inputs("llama_lm")["input_ids"]
    assert torch.equal(greedy(model, {"input_ids": ids}, use_cache=False), reference_greedy(model, ids, False))


def test_peft_two_submodule_layout_ties_decoder_layers() -> None:
    """HF peft's SEQ_2_SEQ_LM default (2 submodules) feeds decoder layer l block 2l mod L: block 1 is unread."""
    model = prefix_model("t5")
    assert model.peft_config["default"].num_transformer_submodules == 2
    assert delta_of(model).blocks == [0, 0]
    model.train()
    model(**tiny_inputs("t5")).logits.sum().backward()
    grad = delta_of(model).table.embedding.weight.grad.view(P, 2, 2, -1)  # (P, layer block, k/v, D)
    assert grad[:, 0].abs().sum() > 0 and grad[:, 1].abs().sum() == 0


def test_bert_layer0_attention_matches_the_formula_with_prefix() -> None:
    """softmax(q [P_k ; W_k h]^T / sqrt(d) + mask) [P_v ; W_v h]: prefix columns visible, pad columns not."""
    model = prefix_model("bert_seq_cls")
    attention = model.base_model.bert.encoder.layer[0].attention.self
    seen: dict[str, torch.Tensor] = {}
    attention.register_forward_pre_hook(lambda m, a, k: seen.update(h=(a[0] if a else k["hidden_states"])),
                                        with_kwargs=True)
    attention.register_forward_hook(lambda m, a, k, out: seen.update(out=out[0]), with_kwargs=True)
    inputs = tiny_inputs("bert_seq_cls")
    inputs["attention_mask"][1, -3:] = 0
    main_output(model, inputs)

    h, heads, dh = seen["h"], 4, 8
    def split(x: torch.Tensor) -> torch.Tensor:  # (B, T, H * Dh) -> (B, H, T, Dh)
        return x.view(x.shape[0], -1, heads, dh).transpose(1, 2)
    kv = delta_of(model).table.embedding.weight.detach().view(P, 4, heads, dh)  # (P, [k0, v0, k1, v1], H, Dh)
    pk, pv = (kv[:, i].transpose(0, 1).expand(2, -1, -1, -1) for i in (0, 1))  # (B, H, P, Dh)
    q = split(attention.query(h))
    k = torch.cat([pk, split(attention.key(h))], dim=2)
    v = torch.cat([pv, split(attention.value(h))], dim=2)
    visible = torch.cat([torch.ones(2, P), inputs["attention_mask"].float()], dim=1)  # (B, P + S)
    scores = q @ k.transpose(-1, -2) / dh**0.5 + (1 - visible)[:, None, None, :] * torch.finfo(torch.float32).min
    expected = (scores.softmax(-1) @ v).transpose(1, 2).reshape(h.shape)
    torch.testing.assert_close(seen["out"], expected, atol=1e-5, rtol=0)


def test_grouped_query_prefix_follows_key_value_heads(tmp_path) -> None:
    model = prefix_model("llama_lm")  # 4 query heads, 2 key/value heads, head size 8
    config = model.peft_config["default"]
    assert (config.num_attention_heads, config.token_dim, config.num_layers) == (2, 16, 2)
    model.save_pretrained(tmp_path)
    assert load_file(str(tmp_path / "adapter_model.safetensors"))["prompt_embeddings"].shape == (P, 2 * 2 * 16)


@pytest.mark.parametrize("kind", ["mlp"])  # DistilBERT: through the attention interface (test_prefix_interface.py)
def test_models_without_a_kv_cache_get_a_clear_error(kind: str) -> None:
    with pytest.raises(dt.TargetError, match="takes no key/value cache") as info:
        dt.get_delta_model(tiny_model(kind), dt.PrefixTuningConfig(num_virtual_tokens=P))
    assert "prompt tuning" in str(info.value)


def test_projection_trains_an_mlp_and_saves_its_output(tmp_path) -> None:
    model = prefix_model("gpt2_lm", prefix_projection=True, encoder_hidden_size=12)
    table = delta_of(model).table
    assert table.embedding.weight.shape == (P, 32) and table.head[0].out_features == 12
    inputs = tiny_inputs("gpt2_lm")
    check_training_step(model, "gpt2_lm", inputs)
    assert table.head[0].weight.grad is not None
    expected = main_output(model, inputs)
    model.save_pretrained(tmp_path)
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))["prompt_embeddings"]
    torch.testing.assert_close(saved, table().detach())  # (P, L * 2 * D): no MLP needed to use it
    for trainable in (False, True):
        loaded = dt.DeltaModel.from_pretrained(tiny_model("gpt2_lm"), tmp_path, is_trainable=trainable)
        assert delta_of(loaded).table.head is None
        torch.testing.assert_close(main_output(loaded, inputs), expected, atol=1e-6, rtol=0)
    assert loaded.trainable_parameters()[0] == P * 2 * 2 * 32


def test_zero_init_gives_zero_prefixes() -> None:
    for projection in (False, True):
        model = prefix_model("gpt2_lm", prefix_projection=projection, init_weights="zero")
        assert torch.count_nonzero(delta_of(model).table()) == 0


@pytest.mark.parametrize("kind", FAMILIES)
def test_family_trains_only_the_prefix_and_reloads(kind: str, tmp_path) -> None:
    model = prefix_model(kind)
    check_training_step(model, kind, tiny_inputs(kind))
    inputs = tiny_inputs(kind)
    inputs["attention_mask"][1, :2] = 0
    check_save_load(model, tiny_model(kind), inputs, tmp_path)


def test_merge_and_user_cache_are_refused() -> None:
    model = prefix_model("llama_lm")
    with pytest.raises(dt.MergeError, match="prefix_tuning"):
        model.merge_adapter()
    from transformers import DynamicCache

    with pytest.raises(dt.ConfigError, match="use generate"):
        model(**tiny_inputs("llama_lm"), past_key_values=DynamicCache())


def test_gradient_checkpointing_is_refused_in_training_only() -> None:
    base = tiny_model("gpt2_lm")
    model = dt.get_delta_model(base, dt.PrefixTuningConfig(num_virtual_tokens=P))
    base.gradient_checkpointing_enable()
    model.train()
    with pytest.raises(dt.ConfigError, match="gradient_checkpointing_disable"):
        model(**tiny_inputs("gpt2_lm"))
    model.eval()
    assert main_output(model, tiny_inputs("gpt2_lm")).shape == (2, 7, 100)


def test_a_config_for_another_layout_is_refused() -> None:
    with pytest.raises(dt.ConfigError, match="does not fit"):
        dt.get_delta_model(tiny_model("llama_lm"), dt.PrefixTuningConfig(num_layers=2, num_attention_heads=4,
                                                                          token_dim=32))
    with pytest.raises(dt.ConfigError, match="init_weights"):
        dt.PrefixTuningConfig(init_weights="ones")


@pytest.mark.integration
def test_bundled_smollm2_generates_with_every_input_method() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deltatune.bundled import bundled_model_path

    path = bundled_model_path("smollm2")
    tokenizer = AutoTokenizer.from_pretrained(path)
    base = AutoModelForCausalLM.from_pretrained(path)
    inputs = dict(tokenizer(["The capital of France is"], return_tensors="pt"))
    kw = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": tokenizer.eos_token_id}
    configs = [dt.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
               dt.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, prompt_tuning_init="SAMPLE_VOCAB"),
               dt.PTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=64)]
    for config in configs:
        torch.manual_seed(0)
        model = dt.get_delta_model(base, config)
        if isinstance(config, dt.PrefixTuningConfig):  # GQA: 9 query heads, 3 key/value heads of 64
            saved = model.peft_config["default"]
            assert (saved.num_attention_heads, saved.token_dim) == (base.config.num_key_value_heads,
                                                                    base.config.num_key_value_heads * 64)
        model.train()
        loss = model(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        assert all(p.grad is None for p in base.parameters())
        model.eval()
        with torch.no_grad():
            out = model.generate(**inputs, **kw)
            steps = reference_greedy(model, inputs["input_ids"], False, new=4, suppress=False)
        assert torch.equal(out, steps)
        model.unload()
