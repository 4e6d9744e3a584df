"""Tests for deltatune.train.data.encoding: token ids, label masks and padding, checked by hand.

The unit tests use a word-level toy tokenizer built here, so every expected id is written out by hand.
The integration tests use the bundled MiniLM and SmolLM2 tokenizers (SmolLM2 has a chat template).
"""

from __future__ import annotations

import os

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from deltatune.train.data.builtin import DataError, label_names, load_builtin
from deltatune.train.data.encoding import (
    IGNORE_INDEX,
    encode_causal_lm,
    encode_classification,
    encode_instruction,
    encode_seq2seq,
    make_collator,
    pad_collate,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

WORDS = ["<pad>", "<s>", "</s>", "<unk>", "Question", "Answer", ":", "?", "+", "2", "4", "hello", "world"]
V = {w: i for i, w in enumerate(WORDS)}
M = IGNORE_INDEX


def toy_tokenizer(*, bos: bool = False, pad: bool = True) -> PreTrainedTokenizerFast:
    """Whitespace/punctuation word tokenizer over WORDS; optionally prepends <s> like Llama."""
    core = Tokenizer(models.WordLevel(V, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos:
        core.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", V["<s>"])]
        )
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="</s>", unk_token="<unk>", bos_token="<s>")
    if pad:
        tok.pad_token = "<pad>"
    return tok


def test_instruction_plain_format_masks_exactly_the_prompt() -> None:
    tok = toy_tokenizer()
    (features,) = encode_instruction([{"prompt": "2 + 2 ?", "response": "4"}], tok)
    # "Question: 2 + 2 ?\nAnswer:" then " 4" then EOS, written out by hand
    prompt = [V["Question"], V[":"], V["2"], V["+"], V["2"], V["?"], V["Answer"], V[":"]]
    assert features["input_ids"] == prompt + [V["4"], V["</s>"]]
    assert features["labels"] == [M] * 8 + [V["4"], V["</s>"]]
    assert features["attention_mask"] == [1] * 10


def test_instruction_keeps_the_tokenizers_bos() -> None:
    (features,) = encode_instruction([{"prompt": "hello", "response": "world"}], toy_tokenizer(bos=True))
    expected = [V["<s>"], V["Question"], V[":"], V["hello"], V["Answer"], V[":"], V["world"], V["</s>"]]
    assert features["input_ids"] == expected
    assert features["labels"] == [M] * 6 + [V["world"], V["</s>"]]


def test_instruction_truncation_keeps_the_answer_and_the_end_of_the_prompt() -> None:
    row = {"prompt": " ".join(["hello"] * 20), "response": " ".join(["world"] * 10)}
    (features,) = encode_instruction([row], toy_tokenizer(), max_length=12)
    # 23 prompt tokens + 11 response tokens > 12: the response keeps max(12 - 23, 12 // 2) = 6 tokens
    assert len(features["input_ids"]) == 12
    # ... and the prompt keeps its last 6 tokens, i.e. the "Answer:" header right before the response
    assert features["input_ids"][:6] == [V["hello"]] * 4 + [V["Answer"], V[":"]]
    assert features["labels"] == [M] * 6 + [V["world"]] * 6
    (short,) = encode_instruction([{"prompt": "hello", "response": "world"}], toy_tokenizer(), max_length=12)
    assert short["labels"][-1] == V["</s>"], "examples that fit keep their EOS"


def test_causal_lm_and_classification_by_hand() -> None:
    tok = toy_tokenizer(bos=True)
    (lm,) = encode_causal_lm([{"text": "hello world"}], tok)
    assert lm["input_ids"] == lm["labels"] == [V["<s>"], V["hello"], V["world"], V["</s>"]]
    assert encode_causal_lm([{"text": "hello world"}], tok, max_length=2)[0]["input_ids"] == [
        V["<s>"],
        V["hello"],
    ]
    rows = [{"text": "hello", "label": "b"}, {"text": "world ?", "label": "a"}]
    enc = encode_classification(rows, tok, ["a", "b"])
    assert [e["labels"] for e in enc] == [1, 0]
    assert enc[1]["input_ids"] == [V["<s>"], V["world"], V["?"]]
    with pytest.raises(DataError, match="not one of"):
        encode_classification([{"text": "x", "label": "c"}], tok, ["a", "b"])


def test_collate_pads_right_and_left_and_keeps_a_real_eos_that_equals_pad() -> None:
    tok = toy_tokenizer(pad=False)  # no pad token: pads with EOS, like GPT-2 / SmolLM2
    feats = encode_instruction(
        [{"prompt": "2", "response": "4"}, {"prompt": "2 + 2 ?", "response": "4"}], tok
    )
    batch = make_collator(tok)(feats)
    eos = V["</s>"]
    short = [V["Question"], V[":"], V["2"], V["Answer"], V[":"], V["4"], eos]
    assert batch["input_ids"][0].tolist() == short + [eos] * 3
    assert batch["attention_mask"][0].tolist() == [1] * 7 + [0] * 3
    assert batch["labels"][0].tolist() == [M] * 5 + [V["4"], eos] + [M] * 3
    assert batch["labels"].dtype == torch.long and batch["labels"].shape == (2, 10)
    left = make_collator(tok, padding_side="left", pad_to_multiple_of=8)(feats)
    assert left["input_ids"].shape == (2, 16)
    assert left["attention_mask"][0].tolist() == [0] * 9 + [1] * 7
    assert left["labels"][0, -2:].tolist() == [V["4"], eos]


def test_collate_classification_and_seq2seq_label_widths() -> None:
    tok = toy_tokenizer()
    cls = pad_collate([{"input_ids": [5, 6], "labels": 1}, {"input_ids": [5], "labels": 0}], pad_token_id=0)
    assert cls["labels"].tolist() == [1, 0] and cls["input_ids"].tolist() == [[5, 6], [5, 0]]
    s2s = encode_seq2seq(
        [{"prompt": "hello world ?", "response": "4"}, {"prompt": "hello", "response": "2 + 2"}], tok
    )
    batch = make_collator(tok)(s2s)
    assert batch["input_ids"].shape == (2, 3) and batch["labels"].shape == (2, 3)
    assert batch["labels"][0].tolist() == [V["4"], M, M]
    with pytest.raises(DataError, match="padding_side"):
        pad_collate(s2s, pad_token_id=0, padding_side="middle")


@pytest.mark.integration
def test_smollm2_chat_template_masks_the_templated_prompt() -> None:
    from transformers import AutoTokenizer

    from deltatune.bundled import bundled_model_path

    tok = AutoTokenizer.from_pretrained(bundled_model_path("smollm2"))
    rows = load_builtin("chatterbot", "train", max_examples=20)
    for row, feats in zip(rows, encode_instruction(rows, tok, max_length=512)):
        user = [{"role": "user", "content": row["prompt"]}]
        prompt_text = tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        assert prompt_text.endswith("<|im_start|>assistant\n")
        n_prompt = len(tok(prompt_text, add_special_tokens=False)["input_ids"])
        labels = feats["labels"]
        assert labels[:n_prompt] == [M] * n_prompt and M not in labels[n_prompt:]
        assert tok.decode(labels[n_prompt:]) == row["response"] + "<|im_end|>"
        # the ids are those of the whole conversation as the template writes it, tokenised in one go
        both = user + [{"role": "assistant", "content": row["response"]}]
        full = tok(tok.apply_chat_template(both, tokenize=False), add_special_tokens=False)["input_ids"]
        assert full[: len(feats["input_ids"])] == feats["input_ids"]


@pytest.mark.integration
def test_encoded_batches_run_through_the_bundled_models() -> None:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from deltatune.bundled import bundled_model_path

    names = label_names("trec")
    path = bundled_model_path("minilm")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(names))
    batch = make_collator(tok)(
        encode_classification(load_builtin("trec", "train", max_examples=4), tok, names)
    )
    assert batch["input_ids"][:, 0].eq(tok.cls_token_id).all()
    with torch.no_grad():
        assert torch.isfinite(model(**batch).loss)

    path = bundled_model_path("smollm2")
    tok = AutoTokenizer.from_pretrained(path)
    lm = AutoModelForCausalLM.from_pretrained(path)
    batch = make_collator(tok)(encode_instruction(load_builtin("chatterbot", "train", max_examples=4), tok))
    with torch.no_grad():
        out = lm(**batch)
    # reference loss: mean cross-entropy over the response tokens only, computed here by hand
    logits, labels = out.logits[:, :-1], batch["labels"][:, 1:]
    keep = labels != M
    reference = torch.nn.functional.cross_entropy(logits[keep], labels[keep])
    assert torch.allclose(out.loss, reference, atol=1e-4)
