"""Shared fixtures: tiny random-init models of every architecture the tests touch.

Nothing here reaches a model hub. Every factory builds a model from a config with a fixed seed, so
two calls with the same seed give identical weights (the base model of an adapter can be rebuilt
for a load test) and different seeds give different weights (a "different base model").

Use the ``make_model`` fixture::

    def test_x(make_model):
        model = make_model("bert_seq_cls", seed=0)   # eval mode, fp32
        inputs = make_model.inputs("bert_seq_cls")    # matching keyword inputs

Kinds: ``bert``, ``bert_seq_cls``, ``roberta_seq_cls``, ``distilbert_seq_cls``, ``gpt2_lm``,
``gpt2_seq_cls``, ``llama_lm`` (grouped-query attention: 4 heads, 2 key/value heads),
``llama_seq_cls``, ``t5`` (encoder-decoder LM), ``bart`` (encoder-decoder LM), ``mlp``, ``cnn``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

# Set before transformers is first imported: nothing may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch
from torch import nn

# Tiny models on a shared 2-core CI box: intra-op threads only add contention (a tiny BART forward
# takes ~300 ms with 2 threads on a busy machine, ~5 ms with one).
torch.set_num_threads(1)

VOCAB = 100
HIDDEN = 32


class TinyMLP(nn.Module):
    """A plain two-layer MLP classifier (no transformers): ``x (B, 16) -> logits (B, 3)``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 24)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(24, 24)
        self.head = nn.Linear(24, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.fc2(self.act(self.fc1(x)))))


class TinyCNN(nn.Module):
    """A plain CNN: ``x (B, 3, 8, 8) -> logits (B, 4)`` through Conv2d, Conv1d and Linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.conv2d = nn.Conv2d(3, 6, kernel_size=3, stride=1, padding=1)
        self.conv1d = nn.Conv1d(6, 5, kernel_size=3, stride=2, padding=1)
        self.fc = nn.Linear(5 * 32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv2d(x))  # (B, 6, 8, 8)
        h = torch.relu(self.conv1d(h.flatten(2)))  # (B, 5, 32)
        return self.fc(h.flatten(1))  # (B, 4)


def _bert_config(**kw: Any) -> Any:
    from transformers import BertConfig

    return BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=37, max_position_embeddings=64, num_labels=3, **kw)


def _build(kind: str) -> nn.Module:
    import transformers as tf

    if kind == "bert":
        return tf.BertModel(_bert_config())
    if kind == "bert_seq_cls":
        return tf.BertForSequenceClassification(_bert_config())
    if kind == "roberta_seq_cls":
        cfg = tf.RobertaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=37, max_position_embeddings=70, num_labels=3)
        return tf.RobertaForSequenceClassification(cfg)
    if kind == "distilbert_seq_cls":
        cfg = tf.DistilBertConfig(vocab_size=VOCAB, dim=HIDDEN, n_layers=2, n_heads=4, hidden_dim=37,
                                  max_position_embeddings=64, num_labels=3)
        return tf.DistilBertForSequenceClassification(cfg)
    if kind in ("gpt2_lm", "gpt2_seq_cls"):
        cfg = tf.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=64, num_labels=3,
                            pad_token_id=0)
        return tf.GPT2LMHeadModel(cfg) if kind == "gpt2_lm" else tf.GPT2ForSequenceClassification(cfg)
    if kind in ("llama_lm", "llama_seq_cls"):
        cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=40, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                             tie_word_embeddings=False, num_labels=3, pad_token_id=0)
        return tf.LlamaForCausalLM(cfg) if kind == "llama_lm" else tf.LlamaForSequenceClassification(cfg)
    if kind == "t5":
        cfg = tf.T5Config(vocab_size=VOCAB, d_model=HIDDEN, d_kv=8, d_ff=40, num_layers=2, num_decoder_layers=2,
                          num_heads=4, decoder_start_token_id=0, pad_token_id=0)
        return tf.T5ForConditionalGeneration(cfg)
    if kind == "bart":
        cfg = tf.BartConfig(vocab_size=VOCAB, d_model=HIDDEN, encoder_layers=2, decoder_layers=2,
                            encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=40,
                            decoder_ffn_dim=40, max_position_embeddings=64)
        return tf.BartForConditionalGeneration(cfg)
    if kind == "mlp":
        return TinyMLP()
    if kind == "cnn":
        return TinyCNN()
    raise ValueError(f"unknown tiny model kind {kind!r}")


KINDS = ("bert", "bert_seq_cls", "roberta_seq_cls", "distilbert_seq_cls", "gpt2_lm", "gpt2_seq_cls", "llama_lm",
         "llama_seq_cls", "t5", "bart", "mlp", "cnn")


def tiny_model(kind: str, seed: int = 0) -> nn.Module:
    """A tiny random-init model of ``kind`` with weights fixed by ``seed``, in eval mode."""
    torch.manual_seed(seed)
    model = _build(kind)
    return model.eval()


def tiny_inputs(kind: str, batch: int = 2, seq: int = 7, seed: int = 123) -> dict[str, torch.Tensor]:
    """Keyword inputs for a model of ``kind`` (token ids avoid the pad id 0)."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "mlp":
        return {"x": torch.randn(batch, 16, generator=gen)}
    if kind == "cnn":
        return {"x": torch.randn(batch, 3, 8, 8, generator=gen)}
    ids = torch.randint(1, VOCAB, (batch, seq), generator=gen)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if kind in ("t5", "bart"):
        inputs["decoder_input_ids"] = torch.randint(1, VOCAB, (batch, 5), generator=gen)
    return inputs


def model_output(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The main output tensor (logits, last hidden state, or the tensor a plain module returns)."""
    with torch.no_grad():
        out = model(**inputs)
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state"):
        value = getattr(out, key, None)
        if value is not None:
            return value
    raise TypeError(f"no main output in {type(out).__name__}")


class ModelFactory:
    """Callable fixture object: ``make_model(kind, seed=0)``; also ``.inputs`` and ``.output``."""

    kinds = KINDS

    def __call__(self, kind: str, seed: int = 0) -> nn.Module:
        return tiny_model(kind, seed)

    inputs = staticmethod(tiny_inputs)
    output = staticmethod(model_output)


@pytest.fixture
def make_model() -> ModelFactory:
    """Factory of tiny random-init models; see the module docstring."""
    return ModelFactory()


@pytest.fixture
def output_of() -> Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]:
    """``output_of(model, inputs)``: the model's main output tensor, computed without gradients."""
    return model_output


def train_steps(model: nn.Module, inputs: dict[str, torch.Tensor], steps: int = 3, lr: float = 0.05) -> None:
    """A few Adam steps on whatever is trainable, so adapter tensors move away from their initial values."""
    params = [p for p in model.parameters() if p.requires_grad]
    assert params, "nothing to train"
    optimizer = torch.optim.Adam(params, lr=lr)
    was_training = model.training
    model.train()
    for _ in range(steps):
        out = model(**inputs)
        logits = out if isinstance(out, torch.Tensor) else (out.logits if hasattr(out, "logits") else out[0])
        loss = logits.float().pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.train(was_training)


@pytest.fixture
def train() -> Callable[..., None]:
    """``train(model, inputs, steps=3, lr=0.05)``: a few optimiser steps on the trainable parameters."""
    return train_steps
