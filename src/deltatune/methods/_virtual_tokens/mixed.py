"""Virtual tokens in a mixed-adapter batch: each row with its own prompt (or none), padded and masked.

Row ``b`` reads ``P_b`` virtual tokens (``0`` for rows of the base model or of a layer method); the
batch is padded to ``P = max P_b`` with zero vectors whose attention mask is ``0``, so no token ever
attends to them. Where the padding goes keeps each row equal to its solo run:

* causal models (any attention module with ``is_causal``), decoder-only: the padding goes *first*,
  ``[0 .. 0 ; p_1 .. p_{P_b} ; x]``, so every row ends in the same column (generation appends there,
  last-token pooling reads there). Positions are passed explicitly as in the solo run
  (``[0 .. P_b + S - 1]`` on the row's own tokens; ``generate`` derives them from the mask itself);
* bidirectional models and encoder-decoder encoders: the padding goes *last*,
  ``[p_1 .. p_{P_b} ; x ; 0 .. 0]``, so every row starts in column 0 (BERT pools the first column;
  absolute positions stay those of the solo run).

Labels of decoder-only models get ``-100`` on all ``P`` leading columns, and on the first input token
of rows without virtual tokens (alone, nothing precedes it to predict it from); ``token_type_ids`` get ``0``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ...errors import ConfigError
from ...routing import Routing
from .config import embed_inputs, is_encoder_decoder


def is_causal_lm(model: nn.Module) -> bool:
    """A decoder-only model: not encoder-decoder, and its attention modules are causal."""
    if is_encoder_decoder(model):
        return False
    return any(getattr(m, "is_causal", False) is True for m in model.modules())


def _row_prompts(routing: Routing, prompts: Mapping[str, torch.Tensor], batch: int) -> list[torch.Tensor | None]:
    names = routing.name_of_row()
    if len(names) != batch:
        raise ConfigError(f"adapter_names has {len(names)} names but the batch has {batch} examples.")
    return [prompts.get(name) for name in names]


def _left_padded(rows: list[torch.Tensor | None], width: int, embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, P, D)`` block with row ``b`` = ``[0 .. 0 ; p_1 .. p_{P_b}]`` and its ``(B, P)`` mask."""
    block = embeds.new_zeros(len(rows), width, embeds.shape[-1])
    mask = torch.zeros(len(rows), width, dtype=torch.long, device=embeds.device)
    for b, p in enumerate(rows):
        if p is not None and p.shape[0]:
            block[b, width - p.shape[0] :] = p.to(embeds.dtype)
            mask[b, width - p.shape[0] :] = 1
    return block, mask


def prepend_routed(model: nn.Module, call: dict[str, Any], routing: Routing,
                   prompts: Mapping[str, torch.Tensor], *, for_generate: bool = False) -> dict[str, Any]:
    """The keyword call with each row's virtual tokens in front of its input (see the module doc)."""
    call = dict(call)
    causal = is_causal_lm(model)
    embeds = embed_inputs(model, call)  # (B, S, D)
    batch, seq, dim = embeds.shape
    rows = _row_prompts(routing, prompts, batch)
    lengths = torch.tensor([0 if p is None else p.shape[0] for p in rows], device=embeds.device)  # (B,)
    width = int(lengths.max())
    mask = call.get("attention_mask")
    if mask is None:
        mask = torch.ones(batch, seq, dtype=torch.long, device=embeds.device)
    if mask.dim() != 2:
        raise ConfigError(f"attention_mask must be 2-D (batch, sequence) with virtual tokens; got {tuple(mask.shape)}.")
    if causal:  # [pad ; prompt ; x]
        block, block_mask = _left_padded(rows, width, embeds)
        call["inputs_embeds"] = torch.cat([block, embeds], dim=1)  # (B, P + S, D)
        call["attention_mask"] = torch.cat([block_mask.to(mask.dtype), mask], dim=1)
        shift = width - lengths  # (B,) padding columns in front of each row
        if not for_generate:
            pos = call.get("position_ids")
            cols = torch.arange(width + seq, device=embeds.device).unsqueeze(0) - shift.unsqueeze(1)  # (B, P + S)
            if pos is not None:
                cols = torch.cat([cols[:, :width], pos + lengths.unsqueeze(1).to(pos.dtype)], dim=1)
            call["position_ids"] = cols.clamp(min=0)
        labels = call.get("labels")
        if isinstance(labels, torch.Tensor) and labels.dim() >= 2 and labels.shape[:2] == (batch, seq):
            pad = torch.full((batch, width, *labels.shape[2:]), -100, dtype=labels.dtype, device=labels.device)
            labels = torch.cat([pad, labels], dim=1)
            if width:  # a row without virtual tokens predicts nothing for its first token (as alone)
                labels[lengths == 0, width] = -100
            call["labels"] = labels
    else:  # [prompt ; x ; pad]: each row's content from column 0
        full = embeds.new_zeros(batch, width + seq, dim)
        full_mask = torch.zeros(batch, width + seq, dtype=mask.dtype, device=mask.device)
        for b, p in enumerate(rows):
            n = int(lengths[b])
            if n:
                full[b, :n] = p.to(embeds.dtype)
                full_mask[b, :n] = 1
            full[b, n : n + seq] = embeds[b]
            full_mask[b, n : n + seq] = mask[b]
        call["inputs_embeds"], call["attention_mask"] = full, full_mask
        if call.get("position_ids") is not None:
            raise ConfigError("position_ids with virtual tokens of different lengths in one batch are supported for "
                              "decoder-only models only; leave them out (the model counts positions itself).")
        labels = call.get("labels")
        if not is_encoder_decoder(model) and isinstance(labels, torch.Tensor) and labels.shape[:2] == (batch, seq):
            raise ConfigError("token-level labels with a mixed batch of virtual tokens on a bidirectional model "
                              "are not supported; compute the loss from the logits.")
    types = call.get("token_type_ids")
    if types is not None:
        zeros = torch.zeros(batch, width, dtype=types.dtype, device=types.device)
        call["token_type_ids"] = torch.cat([zeros, types], dim=1) if causal else torch.cat([types, zeros], dim=1)
    return call


def generate_routed(model: nn.Module, kwargs: dict[str, Any], routing: Routing,
                    prompts: Mapping[str, torch.Tensor]) -> Any:
    """``model.generate`` with each row's virtual tokens in front of its input at the first step."""
    if not callable(getattr(model, "generate", None)):
        raise ConfigError(f"{type(model).__name__} cannot generate text (it has no generate()); call the model instead.")
    kwargs = dict(kwargs)
    call = {"input_ids": kwargs.get("input_ids"), "inputs_embeds": kwargs.pop("inputs_embeds", None),
            "attention_mask": kwargs.pop("attention_mask", None)}
    kwargs.update(prepend_routed(model, call, routing, prompts, for_generate=True))
    if is_encoder_decoder(model):
        kwargs.pop("input_ids", None)  # the encoder reads the prompted inputs_embeds instead
    return model.generate(**kwargs)
