"""The four tasks: which transformers class loads the model, how rows become token ids, and the loss.

===========  ============================  ===========================================================
task         model class                   loss (summed, with the count it is averaged over)
===========  ============================  ===========================================================
seq_cls      AutoModelForSequenceClass.    cross-entropy of the label, per example
instruct     AutoModelForCausalLM          next-token cross-entropy on the *response* tokens only
causal_lm    AutoModelForCausalLM          next-token cross-entropy on every token
seq2seq      AutoModelForSeq2SeqLM         cross-entropy of the target tokens (teacher forcing)
===========  ============================  ===========================================================

Losses are returned as ``(sum, count)`` so gradient accumulation and evaluation average over tokens
exactly (a padded short batch weighs no more than its real tokens).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .data import encoding

IGNORE = encoding.IGNORE_INDEX
Features = dict[str, Any]
Batch = dict[str, torch.Tensor]

AUTO_CLASS = {
    "seq_cls": "AutoModelForSequenceClassification",
    "instruct": "AutoModelForCausalLM",
    "causal_lm": "AutoModelForCausalLM",
    "seq2seq": "AutoModelForSeq2SeqLM",
}


def load_base_model(task: str, path: str, labels: list[str] | None = None, quantize: str | None = None,
                    device: torch.device | str = "cpu", for_training: bool = False,
                    quantize_embeddings: bool = False) -> nn.Module:
    """The transformers model for ``task`` from a local folder (a classification head is added if missing).

    With ``quantize`` (``nf4``, ``fp4``, ``int8``, ``torchao-int8``) its linear layers are loaded quantized
    on ``device`` (see :mod:`deltatune.quant.load`); heads stay in float, and the token embedding too unless
    ``quantize_embeddings`` (then it, and an LM head tied to it, are stored quantized the same way). ``for_training`` readies a
    quantized base for adapter training (:func:`deltatune.quant.prepare_for_kbit_training`, checkpointing
    left to ``--gradient-checkpointing``), so the evaluations a run makes between its steps cannot change
    how the frozen weights are stored and thereby the gradients of the steps after them.
    """
    import transformers

    cls = getattr(transformers, AUTO_CLASS[task])
    kwargs: dict[str, Any] = {}
    if task == "seq_cls":
        assert labels, "classification needs label names"
        kwargs = {
            "num_labels": len(labels),
            "id2label": dict(enumerate(labels)),
            "label2id": {name: i for i, name in enumerate(labels)},
        }
    from ..quant.load import check_quantize_options

    check_quantize_options(quantize, quantize_embeddings)
    if quantize:
        from ..quant.load import from_pretrained_quantized

        model = from_pretrained_quantized(cls, path, quantize, device, embeddings=quantize_embeddings, **kwargs)
        if for_training:
            from ..quant import prepare_for_kbit_training

            prepare_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        model = cls.from_pretrained(path, dtype=torch.float32, **kwargs)
    if task in ("instruct", "causal_lm") and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = model.config.eos_token_id
    return model


def load_tokenizer(path: str) -> Any:
    """The tokenizer in the model folder, with a padding token (the EOS token where none is set)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


@dataclass
class Encoder:
    """Turns rows into token ids for one task, through :mod:`deltatune.train.data.encoding`.

    Attributes:
        task: one of ``seq_cls``, ``instruct``, ``causal_lm``, ``seq2seq``.
        tokenizer: a transformers tokenizer.
        max_length: longest sequence (prompt + response for ``instruct``; each side for ``seq2seq``).
        labels: label names for ``seq_cls`` (id = position).
        chat: format ``instruct`` prompts with the tokenizer's chat template (else ``Question: ...\nAnswer:``).
    """

    task: str
    tokenizer: Any
    max_length: int
    labels: list[str] | None = None
    chat: bool = False

    def encode_rows(self, rows: Sequence[dict[str, str]]) -> list[Features]:
        tok, n = self.tokenizer, self.max_length
        if self.task == "seq_cls":
            return encoding.encode_classification(rows, tok, self.labels or [], max_length=n)
        if self.task == "instruct":
            return encoding.encode_instruction(rows, tok, max_length=n, use_chat_template=self.chat)
        if self.task == "causal_lm":
            return encoding.encode_causal_lm(rows, tok, max_length=n)
        return encoding.encode_seq2seq(rows, tok, max_source_length=n, max_target_length=n)

    def encode(self, row: dict[str, str]) -> Features:
        return self.encode_rows([row])[0]

    def encode_texts(self, texts: Sequence[str]) -> list[Features]:
        """Classification inputs without labels (for prediction)."""
        placeholder = (self.labels or [""])[0]  # encode_classification wants a label; it is dropped again
        features = self.encode_rows([{"text": t, "label": placeholder} for t in texts])
        return [{k: v for k, v in f.items() if k != "labels"} for f in features]

    def prompt_ids(self, prompt: str) -> list[int]:
        """Token ids the model continues: the training prompt for ``instruct``, the raw text for ``causal_lm``."""
        if self.task == "causal_lm":
            return encoding.encode_causal_lm([{"text": prompt}], self.tokenizer, max_length=10**9)[0]["input_ids"][:-1]
        return encoding.instruction_prompt_ids(self.tokenizer, prompt, use_chat_template=self.chat)


def collate(features: Sequence[Features], pad_id: int) -> Batch:
    """Right-pad encoded rows into tensors: ``input_ids``/``attention_mask`` ``(B, T)``, ``labels``."""
    return encoding.pad_collate(features, pad_token_id=pad_id)


def pick_device(name: str = "auto") -> torch.device:
    """``auto``: CUDA, then Apple MPS, then CPU; otherwise the named device."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps" if mps is not None and mps.is_available() else "cpu")
    return torch.device(name)


def forward(model: nn.Module, task: str, batch: Batch) -> torch.Tensor:
    """Logits: ``(B, C)`` for seq_cls, ``(B, T, V)`` for the language-model tasks (on the model's device)."""
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    if task == "seq2seq":
        base = getattr(model, "base_model", model)
        inputs["decoder_input_ids"] = base.prepare_decoder_input_ids_from_labels(labels=batch["labels"].to(device))
    if task != "seq_cls":
        inputs["use_cache"] = False
    return model(**inputs).logits


def loss_sum(task: str, logits: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, int]:
    """(summed cross-entropy, number of terms) for one batch."""
    labels = batch["labels"].to(logits.device)
    if task == "seq_cls":
        return F.cross_entropy(logits.float(), labels, reduction="sum"), int(labels.numel())
    extra = logits.shape[1] - labels.shape[1]
    if extra > 0:  # an input method prepended virtual positions; the last T logits belong to the real tokens
        logits = logits[:, extra:]
    if task in ("instruct", "causal_lm"):  # position t predicts token t + 1
        logits, labels = logits[:, :-1], labels[:, 1:]
    flat = logits.reshape(-1, logits.shape[-1]).float()  # (B * T, V)
    total = F.cross_entropy(flat, labels.reshape(-1), ignore_index=IGNORE, reduction="sum")
    return total, int((labels != IGNORE).sum())


def count_terms(task: str, batch: Batch) -> int:
    """How many loss terms ``batch`` has (known before the forward pass)."""
    if task == "seq_cls":
        return int(batch["labels"].numel())
    labels = batch["labels"][:, 1:] if task in ("instruct", "causal_lm") else batch["labels"]
    return int((labels != IGNORE).sum())


def uses_chat(tokenizer: Any, prompt_format: str) -> bool:
    """Whether ``instruct`` prompts use the chat template (``auto``: when the tokenizer has one)."""
    if prompt_format == "plain":
        return False
    has = bool(getattr(tokenizer, "chat_template", None))
    if prompt_format == "chat" and not has:
        from ..errors import ConfigError

        raise ConfigError("prompt_format='chat' but this tokenizer has no chat template; use 'plain' or 'auto'.")
    return has
