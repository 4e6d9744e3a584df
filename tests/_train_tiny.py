"""Helpers for the training/CLI tests: tiny random-init model folders with a tiny offline tokenizer, and
small synthetic data files. Nothing reaches a model hub.

``save_tiny(kind, folder)`` writes a transformers folder (config, safetensors, tokenizer) that
``from_pretrained`` and the ``deltatune`` CLI load like any real model:

* ``bert``: ``BertModel`` weights (a classification head is added at load time, as for MiniLM)
* ``llama``: ``LlamaForCausalLM`` (grouped-query attention)
* ``t5``: ``T5ForConditionalGeneration``
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

WORDS = ["the", "a", "what", "who", "where", "when", "how", "why", "is", "are", "was", "city", "river", "film", "song", "team", "cat", "dog", "sun", "moon", "red", "blue", "green", "good", "bad", "great", "awful", "fine", "happy", "sad", "big", "small", "fast", "slow", "old", "new", "yes", "no", "hello", "thanks", "please", "name", "year", "many", "much", "one", "two", "three", "four", "five", "up", "down", "left", "right", "in", "on", "at", "to", "from", "of", "and", "or"]
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "[CLS]", "[SEP]"]
CLASSES = {"pos": ["good", "great", "happy", "fine"], "neg": ["bad", "awful", "sad", "slow"],
           "neu": ["city", "river", "year", "name"]}


def make_tokenizer() -> object:
    """A word-level fast tokenizer over :data:`WORDS` (pad 0, unk 1, bos 2, eos 3), built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", cls_token="[CLS]", sep_token="[SEP]")


VOCAB = len(SPECIALS) + len(WORDS)


def save_tiny(kind: str, folder: Path, seed: int = 0, dropout: float = 0.1) -> Path:
    """Write a tiny ``kind`` model (``bert``, ``llama``, ``t5``) and the tokenizer into ``folder``."""
    import transformers as tf

    torch.manual_seed(seed)
    if kind == "bert":
        cfg = tf.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=37, max_position_embeddings=64, hidden_dropout_prob=dropout,
                            attention_probs_dropout_prob=dropout, pad_token_id=0)
        model = tf.BertModel(cfg)
    elif kind == "llama":
        cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                             tie_word_embeddings=False, pad_token_id=0, bos_token_id=2, eos_token_id=3,
                             attention_dropout=dropout, initializer_range=0.3)
        model = tf.LlamaForCausalLM(cfg)
    elif kind == "t5":
        cfg = tf.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=40, num_layers=2, num_decoder_layers=2,
                          num_heads=4, decoder_start_token_id=0, pad_token_id=0, eos_token_id=3,
                          dropout_rate=dropout)
        model = tf.T5ForConditionalGeneration(cfg)
    else:
        raise ValueError(kind)
    model.save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


def save_quantizable_llama(folder: Path, tied: bool = False) -> Path:
    """A tiny Llama for the quantized-base CLI tests (every width a multiple of 64, as bitsandbytes' CPU
    kernels want; ``tied``: the LM head shares the token embedding) and the tokenizer, into ``folder``."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=tied, pad_token_id=0, bos_token_id=2, eos_token_id=3,
                         initializer_range=0.3)
    tf.LlamaForCausalLM(cfg).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


def _sentence(rng: random.Random, n: int = 6) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def write_classification(path: Path, n: int, seed: int = 0) -> Path:
    """JSONL rows ``{"text", "label"}``: the label is the class of a keyword placed in random filler."""
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as handle:
        for i in range(n):
            label = list(CLASSES)[i % len(CLASSES)]
            text = f"{_sentence(rng, 3)} {rng.choice(CLASSES[label])} {_sentence(rng, 3)}"
            handle.write(json.dumps({"text": text, "label": label}) + "\n")
    return path


def write_pairs(path: Path, n: int, seed: int = 0) -> Path:
    """JSONL rows ``{"prompt", "response"}``: the response is ``"yes"`` and the prompt's last word."""
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as handle:
        for _ in range(n):
            prompt = _sentence(rng, 5)
            handle.write(json.dumps({"prompt": prompt, "response": "yes " + prompt.split()[-1]}) + "\n")
    return path


def write_text(path: Path, n: int, seed: int = 0) -> Path:
    """Plain text, one example per line."""
    rng = random.Random(seed)
    path.write_text("".join(_sentence(rng, 8) + "\n" for _ in range(n)), encoding="utf-8")
    return path
