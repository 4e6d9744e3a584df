"""A tiny Llama causal LM saved as a local transformers folder, with a word-level tokenizer: what the
Trainer/TRL/AutoPeftModel tests load by path (so ``name_or_path`` is a real local folder)."""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = ["the", "a", "cat", "dog", "sat", "on", "mat", "ran", "to", "park", "big", "small", "red", "blue"]
TEXTS = ["the cat sat on the mat", "a dog ran to the park", "the big red dog sat", "a small blue cat ran"]


def save_tiny_lm(folder: Path, seed: int = 0) -> Path:
    """Write a random-init 2-layer Llama (vocab = WORDS + 3 specials) and its tokenizer to ``folder``."""
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = tf.PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>",
                                           unk_token="<unk>")
    config = tf.LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, eos_token_id=1,
                            bos_token_id=1, tie_word_embeddings=False)
    torch.manual_seed(seed)
    tf.LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
