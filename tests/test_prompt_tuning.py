"""Prompt tuning (Lester et al., arXiv 2104.08691): virtual tokens prepended to the input embeddings.

References are written here by hand: the base model called with ``inputs_embeds = [prompt ; embed(ids)]``
and an extended attention mask, a hand-computed causal LM loss, and greedy decoding done step by
step without a cache. HF peft cross-checks live in test_input_methods_peft_compat.py.
"""

from __future__ import annotations

import pytest
import torch
from _input_methods import (
    GENERATIVE,
    TASK,
    check_save_load,
    check_training_step,
    greedy,
    main_output,
    special_ids,
)
from conftest import tiny_inputs, tiny_model

import deltatune as dt

P = 4
FAMILIES = ("bert_seq_cls", "roberta_seq_cls", "distilbert_seq_cls", "gpt2_lm", "llama_lm", "t5", "bart")


def prompt_model(kind: str, **options: object) -> dt.DeltaModel:
    config = dt.PromptTuningConfig(task_type=TASK[kind], num_virtual_tokens=P, **options)
    return dt.get_delta_model(tiny_model(kind), config).eval()


def table(model: dt.DeltaModel) -> torch.Tensor:
    return model.input_deltas["default"].table.embedding.weight.detach()


def padded_inputs(kind: str) -> dict[str, torch.Tensor]:
    inputs = tiny_inputs(kind)
    inputs["attention_mask"][1, :2] = 0  # left padding on the second row
    return inputs


def prepended(base: torch.nn.Module, prompt: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> dict:
    """The reference call: the prompt rows in front of the token embeddings, P ones in front of the mask."""
    batch = ids.shape[0]
    embeds = torch.cat([prompt.expand(batch, -1, -1), base.get_input_embeddings()(ids)], dim=1)
    return {"inputs_embeds": embeds, "attention_mask": torch.cat([torch.ones(batch, P, dtype=mask.dtype), mask], 1)}


@pytest.mark.parametrize("kind", ["bert_seq_cls", "gpt2_lm", "llama_lm", "t5", "bart"])
def test_forward_equals_base_model_on_prepended_embeddings(kind: str) -> None:
    model = prompt_model(kind)
    inputs = padded_inputs(kind)
    reference_model = tiny_model(kind)  # same seed: the same weights as the frozen base
    call = prepended(reference_model, table(model), inputs["input_ids"], inputs["attention_mask"])
    if "decoder_input_ids" in inputs:
        call["decoder_input_ids"] = inputs["decoder_input_ids"]
    expected = main_output(reference_model, call)
    got = main_output(model, inputs)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    plain = main_output(reference_model, inputs)
    assert not torch.allclose(got[:, -plain.shape[1]:] if got.dim() == 3 else got, plain, atol=1e-4)


def test_token_type_ids_get_zeros_and_positional_call_works() -> None:
    model = prompt_model("bert_seq_cls")
    inputs = tiny_inputs("bert_seq_cls")
    types = torch.ones_like(inputs["input_ids"])
    reference_model = tiny_model("bert_seq_cls")
    call = prepended(reference_model, table(model), inputs["input_ids"], inputs["attention_mask"])
    call["token_type_ids"] = torch.cat([torch.zeros(2, P, dtype=types.dtype), types], dim=1)
    expected = main_output(reference_model, call)
    with torch.no_grad():
        got = model(inputs["input_ids"], inputs["attention_mask"], token_type_ids=types).logits
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_explicit_position_ids_mean_what_the_default_means() -> None:
    model = prompt_model("gpt2_lm")
    inputs = tiny_inputs("gpt2_lm")
    positions = torch.arange(inputs["input_ids"].shape[1]).expand(2, -1)
    torch.testing.assert_close(main_output(model, dict(inputs, position_ids=positions)), main_output(model, inputs))


@pytest.mark.parametrize("kind", ["gpt2_lm", "llama_lm"])
def test_causal_labels_get_minus_100_for_virtual_positions(kind: str) -> None:
    model = prompt_model(kind)
    ids = tiny_inputs(kind)["input_ids"]
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
    assert out.logits.shape[:2] == (2, P + ids.shape[1])
    # Loss by hand: position t predicts token t+1; the first real token is predicted from the last virtual one,
    # and no virtual position is a target.
    logits = out.logits[:, P - 1 : -1].reshape(-1, out.logits.shape[-1])
    expected = torch.nn.functional.cross_entropy(logits, ids.reshape(-1))
    torch.testing.assert_close(out.loss, expected, atol=1e-6, rtol=1e-6)


def manual_prompted_greedy(base: torch.nn.Module, prompt: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                           new: int = 4) -> torch.Tensor:
    """Greedy decoding by hand, no cache: at every step the whole prompted sequence, positions from the mask."""
    seq = ids
    with torch.no_grad():
        for _ in range(new):
            call = prepended(base, prompt, seq, mask)
            positions = (call["attention_mask"].cumsum(-1) - 1).clamp(min=0)  # HF's left-padding positions
            logits = base(**call, position_ids=positions).logits[:, -1]
            logits[:, special_ids(base)] = float("-inf")
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return seq


@pytest.mark.parametrize("kind", ["gpt2_lm", "llama_lm"])
def test_generate_with_cache_equals_manual_loop_and_ignores_padding(kind: str) -> None:
    model = prompt_model(kind)
    inputs = padded_inputs(kind)
    generated = greedy(model, inputs, new=5)
    expected = manual_prompted_greedy(tiny_model(kind), table(model), inputs["input_ids"], inputs["attention_mask"], 5)
    assert torch.equal(generated, expected)
    alone = greedy(model, {"input_ids": inputs["input_ids"][1:, 2:]}, new=5)  # the padded row, unpadded
    assert torch.equal(generated[1:, 7:], alone[:, 5:])


@pytest.mark.parametrize("kind", ["t5", "bart"])
def test_seq2seq_generate_reads_prompted_encoder_input(kind: str) -> None:
    model = prompt_model(kind)
    inputs = padded_inputs(kind)
    base = tiny_model(kind)
    call = prepended(base, table(model), inputs["input_ids"], inputs["attention_mask"])
    seq = torch.full((2, 1), base.config.decoder_start_token_id)
    with torch.no_grad():
        for _ in range(4):
            logits = base(**call, decoder_input_ids=seq).logits[:, -1]
            logits[:, special_ids(base)] = float("-inf")
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(greedy(model, inputs), seq)


@pytest.mark.parametrize("kind", FAMILIES)
def test_family_trains_only_the_prompt_and_reloads(kind: str, tmp_path) -> None:
    model = prompt_model(kind)
    check_training_step(model, kind, tiny_inputs(kind))
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "input_deltas.default.table.embedding.weight" in trained
    assert all("modules_to_save" in n for n in trained - {"input_deltas.default.table.embedding.weight"})
    check_save_load(model, tiny_model(kind), padded_inputs(kind), tmp_path)
    if kind in GENERATIVE:
        assert greedy(model, tiny_inputs(kind)).shape[1] in (5, 7 + 4)


def test_merge_is_refused_naming_the_method() -> None:
    model = prompt_model("gpt2_lm")
    with pytest.raises(dt.MergeError, match="prompt_tuning"):
        model.merge_adapter()
    with pytest.raises(dt.MergeError, match="PROMPT_TUNING"):
        model.merge_and_unload()


# -- initialisation ---------------------------------------------------------------------------------------
WORDS = ["[UNK]"] + [f"w{i}" for i in range(1, 40)]


def word_tokenizer() -> object:
    """An offline word-level tokenizer over the tiny vocabulary: "w5 w7" -> [5, 7]."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]")


def words_of(model: dt.DeltaModel, ids: list[int]) -> torch.Tensor:
    return model.base_model.get_input_embeddings().weight[ids].detach()


@pytest.mark.parametrize(("tokens", "expected"), [(4, [5, 7, 3, 5]), (2, [5, 7])])
def test_text_init_repeats_or_cuts_the_text_tokens(tokens: int, expected: list[int], tmp_path) -> None:
    tokenizer = word_tokenizer()
    config = dt.PromptTuningConfig(num_virtual_tokens=tokens, prompt_tuning_init="TEXT",
                                   prompt_tuning_init_text="w5 w7 w3", tokenizer_name_or_path=tokenizer)
    model = dt.get_delta_model(tiny_model("gpt2_lm"), config)
    assert torch.equal(table(model), words_of(model, expected))
    tokenizer.save_pretrained(tmp_path / "tok")  # the same from a local folder, recorded in the config
    config = dt.PromptTuningConfig(num_virtual_tokens=tokens, prompt_tuning_init="TEXT",
                                   prompt_tuning_init_text="w5 w7 w3", tokenizer_name_or_path=tmp_path / "tok")
    by_path = dt.get_delta_model(tiny_model("gpt2_lm"), config)
    assert torch.equal(table(by_path), words_of(by_path, expected))
    assert by_path.peft_config["default"].to_dict()["tokenizer_name_or_path"] == str(tmp_path / "tok")


def test_sample_vocab_and_random_init() -> None:
    torch.manual_seed(0)
    sampled = prompt_model("llama_lm", prompt_tuning_init="SAMPLE_VOCAB")
    vocab = sampled.base_model.get_input_embeddings().weight.detach()
    same = (table(sampled)[:, None, :] == vocab[None, :, :]).all(dim=-1)  # (P, V): row i is token j's embedding
    assert torch.all(same.any(dim=1))
    assert len({int(i) for i in same.float().argmax(dim=1)}) > 1
    rand = prompt_model("llama_lm")
    assert torch.cdist(table(rand), vocab).min() > 0.1
    assert 0.5 < table(rand).std() < 1.5  # N(0, 1), HF peft's default


def test_bad_configs_say_what_is_wrong(tmp_path) -> None:
    with pytest.raises(dt.ConfigError, match="prompt_tuning_init_text"):
        dt.PromptTuningConfig(prompt_tuning_init="TEXT")
    with pytest.raises(dt.ConfigError, match="not one of"):
        dt.PromptTuningConfig(prompt_tuning_init="WORDS")
    with pytest.raises(dt.ConfigError, match="num_virtual_tokens"):
        dt.PromptTuningConfig(num_virtual_tokens=0)
    with pytest.raises(dt.ConfigError, match="tokenizer_kwargs"):
        dt.PromptTuningConfig(tokenizer_kwargs={"use_fast": True})
    no_tokenizer = dt.PromptTuningConfig(prompt_tuning_init="TEXT", prompt_tuning_init_text="w1")
    with pytest.raises(dt.ConfigError, match="needs a tokenizer"):
        dt.get_delta_model(tiny_model("gpt2_lm"), no_tokenizer)
    missing = dt.PromptTuningConfig(prompt_tuning_init="TEXT", prompt_tuning_init_text="w1",
                                    tokenizer_name_or_path=str(tmp_path / "nowhere"))
    with pytest.raises(dt.ConfigError, match="could not load a tokenizer"):
        dt.get_delta_model(tiny_model("gpt2_lm"), missing)
    with pytest.raises(dt.ConfigError, match="token_dim=16"):
        dt.get_delta_model(tiny_model("gpt2_lm"), dt.PromptTuningConfig(token_dim=16))


def test_config_round_trip_keeps_peft_field_names() -> None:
    model = prompt_model("t5")
    saved = model.peft_config["default"].to_dict()
    assert saved["peft_type"] == "PROMPT_TUNING"
    assert (saved["token_dim"], saved["num_layers"], saved["num_attention_heads"]) == (32, 2, 4)
    assert saved["num_transformer_submodules"] == 1  # peft's 2 for seq2seq keeps a second, unread block
    assert dt.PromptTuningConfig.from_dict(saved) == model.peft_config["default"]


@pytest.mark.integration
def test_bundled_minilm_classification_with_all_input_methods(tmp_path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from deltatune.bundled import bundled_model_path

    path = bundled_model_path("minilm")
    tokenizer = AutoTokenizer.from_pretrained(path)
    inputs = dict(tokenizer(["a fine film", "dull and far too long"], padding=True, return_tensors="pt"))
    inputs.pop("token_type_ids")
    configs = [
        dt.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4, prompt_tuning_init="TEXT",
                              prompt_tuning_init_text="classify the sentiment", tokenizer_name_or_path=str(path)),
        dt.PTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4, encoder_hidden_size=32),
        dt.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4),
    ]
    for i, config in enumerate(configs):
        torch.manual_seed(0)
        model = dt.get_delta_model(AutoModelForSequenceClassification.from_pretrained(path, num_labels=3), config)
        if i == 0:  # TEXT init read the real tokenizer from the model folder
            ids = tokenizer("classify the sentiment")["input_ids"]
            assert torch.equal(table(model), words_of(model, (ids * 4)[:4]))
        check_training_step(model, "bert_seq_cls", inputs)
        model.save_pretrained(tmp_path / str(i))
        fresh = AutoModelForSequenceClassification.from_pretrained(path, num_labels=3)
        loaded = dt.DeltaModel.from_pretrained(fresh, tmp_path / str(i))
        torch.testing.assert_close(main_output(loaded, inputs), main_output(model, inputs), atol=1e-5, rtol=0)
