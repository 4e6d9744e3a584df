"""Turn rows into token ids for each training task, and pad them into batches. No model needed.

Every encoder returns one dict of plain Python lists per row, with the keys the model's ``forward``
takes: ``input_ids``, ``attention_mask`` and ``labels``. :func:`pad_collate` turns a list of them into
tensors; padded label positions are :data:`IGNORE_INDEX` (-100), which the loss skips.

Tasks:

* sequence classification: ``labels`` is the class id (an ``int``).
* causal-LM instruction tuning: ``labels`` copies ``input_ids`` on the response and its EOS, and is -100
  on every prompt position, so the loss is only on the answer. With a chat template the prompt is the
  template applied to one user turn with the generation prompt (``<|im_start|>assistant\\n`` for SmolLM2);
  without one it is ``"Question: {prompt}\\nAnswer:"`` followed by the response as ``" {response}"``.
* plain causal LM: ``labels`` equals ``input_ids`` (the model shifts them itself).
* seq2seq: ``input_ids`` from the source, ``labels`` from the target (``text_target=``).

Prompt and response are tokenised separately and concatenated, so the boundary between them is exact.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from .builtin import DataError

__all__ = [
    "IGNORE_INDEX",
    "encode_causal_lm",
    "encode_classification",
    "encode_instruction",
    "encode_seq2seq",
    "instruction_prompt_ids",
    "make_collator",
    "pad_collate",
]

IGNORE_INDEX = -100
Features = dict[str, Any]


def _ids(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` with no special tokens added."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _leading_special_ids(tokenizer: Any) -> list[int]:
    """The ids a tokenizer puts before the text by default (Llama's BOS; nothing for GPT-2/SmolLM2)."""
    with_special = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    bare = _ids(tokenizer, "a")
    if bare and bare[0] in with_special:
        return with_special[: with_special.index(bare[0])]
    return []


def _eos_id(tokenizer: Any) -> int:
    if tokenizer.eos_token_id is None:
        raise DataError(f"{type(tokenizer).__name__} has no eos_token; set tokenizer.eos_token first.")
    return int(tokenizer.eos_token_id)


def encode_classification(
    rows: Sequence[Mapping[str, str]], tokenizer: Any, label_names: Sequence[str], *, max_length: int = 128
) -> list[Features]:
    """Rows ``{"text", "label"}`` -> ``input_ids``, ``attention_mask`` (with the tokenizer's own special
    tokens, e.g. ``[CLS] ... [SEP]``), truncated to ``max_length``, and ``labels`` = index in ``label_names``.
    """
    index = {name: i for i, name in enumerate(label_names)}
    out: list[Features] = []
    for row in rows:
        if row["label"] not in index:
            raise DataError(f"Label {row['label']!r} is not one of {list(label_names)}.")
        ids = list(tokenizer(row["text"], truncation=True, max_length=max_length)["input_ids"])
        out.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": index[row["label"]]})
    return out


def instruction_prompt_ids(
    tokenizer: Any, prompt: str, *, use_chat_template: bool | None = None
) -> list[int]:
    """Token ids of the prompt part of an instruction example (everything before the response).

    Args:
        use_chat_template: ``None`` uses the tokenizer's chat template when it has one.
    """
    if use_chat_template is None:
        use_chat_template = bool(getattr(tokenizer, "chat_template", None))
    if use_chat_template:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return _ids(tokenizer, text)  # the template writes its own special tokens
    return _leading_special_ids(tokenizer) + _ids(tokenizer, f"Question: {prompt}\nAnswer:")


def _fit(prompt: list[int], response: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """Shorten to ``max_length`` tokens, keeping at least half of it (or all of it) for the response.

    The prompt loses tokens from its start, so the part right before the answer (the template's
    assistant header) survives; the response loses tokens from its end.
    """
    if len(prompt) + len(response) <= max_length:
        return prompt, response
    keep_response = min(len(response), max(max_length - len(prompt), max_length // 2))
    keep_prompt = max_length - keep_response
    return prompt[len(prompt) - keep_prompt :], response[:keep_response]


def encode_instruction(
    rows: Sequence[Mapping[str, str]],
    tokenizer: Any,
    *,
    max_length: int = 256,
    use_chat_template: bool | None = None,
) -> list[Features]:
    """Rows ``{"prompt", "response"}`` -> causal-LM features with the loss on the response only.

    ``input_ids`` = prompt ids + response ids + EOS; ``labels`` = -100 on the prompt ids, then the
    response ids and EOS. Too-long examples are cut as described in :func:`_fit`.

    Args:
        use_chat_template: ``True``/``False`` to force; ``None`` uses the chat template if there is one.
    """
    eos = _eos_id(tokenizer)
    chat = bool(getattr(tokenizer, "chat_template", None)) if use_chat_template is None else use_chat_template
    out: list[Features] = []
    for row in rows:
        prompt = instruction_prompt_ids(tokenizer, row["prompt"], use_chat_template=chat)
        answer = row["response"] if chat else f" {row['response']}"
        prompt, response = _fit(prompt, _ids(tokenizer, answer) + [eos], max_length)
        ids = prompt + response
        labels = [IGNORE_INDEX] * len(prompt) + response
        out.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    return out


def encode_causal_lm(
    rows: Sequence[Mapping[str, str]], tokenizer: Any, *, max_length: int = 256
) -> list[Features]:
    """Rows ``{"text"}`` -> BOS (if the tokenizer uses one) + text + EOS, truncated to ``max_length``;
    ``labels`` = ``input_ids`` (the model shifts them by one itself)."""
    eos = _eos_id(tokenizer)
    lead = _leading_special_ids(tokenizer)
    out: list[Features] = []
    for row in rows:
        ids = (lead + _ids(tokenizer, row["text"]) + [eos])[:max_length]
        out.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": list(ids)})
    return out


def encode_seq2seq(
    rows: Sequence[Mapping[str, str]],
    tokenizer: Any,
    *,
    max_source_length: int = 256,
    max_target_length: int = 128,
) -> list[Features]:
    """Rows ``{"prompt", "response"}`` -> encoder ``input_ids`` from the prompt (source) and decoder
    ``labels`` from the response (target), each with the tokenizer's own special tokens (e.g. T5's EOS)."""
    out: list[Features] = []
    for row in rows:
        source = list(tokenizer(row["prompt"], truncation=True, max_length=max_source_length)["input_ids"])
        target = tokenizer(text_target=row["response"], truncation=True, max_length=max_target_length)
        out.append(
            {"input_ids": source, "attention_mask": [1] * len(source), "labels": list(target["input_ids"])}
        )
    return out


def pad_collate(
    features: Sequence[Mapping[str, Any]],
    *,
    pad_token_id: int,
    padding_side: str = "right",
    pad_to_multiple_of: int | None = None,
) -> dict[str, torch.Tensor]:
    """Pad a list of encoded examples into a batch of tensors.

    ``input_ids`` are padded with ``pad_token_id``, ``attention_mask`` and ``token_type_ids`` with 0,
    list ``labels`` with -100 (to their own longest length: seq2seq targets differ from the inputs).
    Integer ``labels`` (classification) become a 1-D tensor.

    Returns:
        ``input_ids`` / ``attention_mask`` (B, T) long tensors, ``labels`` (B, T') or (B,).
    """
    if padding_side not in ("right", "left"):
        raise DataError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    if not features:
        raise DataError("pad_collate got an empty batch.")
    pad_values = {"input_ids": pad_token_id, "attention_mask": 0, "token_type_ids": 0, "labels": IGNORE_INDEX}
    batch: dict[str, torch.Tensor] = {}
    for key in features[0]:
        values = [f[key] for f in features]
        if not isinstance(values[0], list | tuple):
            batch[key] = torch.tensor(values)
            continue
        if key not in pad_values:
            raise DataError(f"pad_collate does not know how to pad {key!r}; known: {sorted(pad_values)}")
        width = max(len(v) for v in values)
        if pad_to_multiple_of:
            width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
        padded = [
            list(v) + [pad_values[key]] * (width - len(v))
            if padding_side == "right"
            else [pad_values[key]] * (width - len(v)) + list(v)
            for v in values
        ]
        batch[key] = torch.tensor(padded, dtype=torch.long)
    return batch


def make_collator(
    tokenizer: Any, *, padding_side: str = "right", pad_to_multiple_of: int | None = None
) -> Callable[[Sequence[Mapping[str, Any]]], dict[str, torch.Tensor]]:
    """A ``collate_fn`` for ``torch.utils.data.DataLoader`` that pads with the tokenizer's pad id.

    Tokenizers without a pad token (GPT-2, many causal LMs) pad with EOS; that is safe because padded
    positions have attention_mask 0 and label -100, while the real EOS keeps its label.
    """
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise DataError(f"{type(tokenizer).__name__} has neither a pad token nor an EOS token to pad with.")

    def collate(features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        return pad_collate(
            features,
            pad_token_id=int(pad_id),
            padding_side=padding_side,
            pad_to_multiple_of=pad_to_multiple_of,
        )

    return collate
