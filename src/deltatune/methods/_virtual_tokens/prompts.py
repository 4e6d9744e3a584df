"""Virtual tokens prepended to the input embeddings: the model call of prompt tuning and P-tuning.

    inputs_embeds' = [p_1 ... p_P ; embed(x_1) ... embed(x_S)]        (B, P + S, D)

and everything aligned with the input sequence follows: the attention mask gains P ones (the
virtual tokens are always attended to), ``token_type_ids`` gain P zeros, explicit ``position_ids``
become ``[0 .. P-1, P + pos]`` (what the model computes itself when none are given), and labels of
a decoder-only model gain P ``-100`` (no loss on virtual positions). Encoder-decoder models get the
virtual tokens on the encoder input; the decoder side is left as it is.

``generate()``: decoder-only models are called with ``input_ids`` *and* the prompted
``inputs_embeds`` (transformers' soft-prompt path: the embeddings feed the first step and fill
the KV cache, the returned sequences continue ``input_ids``); encoder-decoder models get the
prompted ``inputs_embeds`` for the encoder.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from ...errors import ConfigError
from ...input_delta import InputDelta, bind_call
from ...routing import Routing
from .config import embed_inputs, is_encoder_decoder
from .mixed import generate_routed, prepend_routed
from .table import ReparamTable


def _ones(batch: int, n: int, like: torch.Tensor) -> torch.Tensor:
    return torch.ones(batch, n, dtype=like.dtype, device=like.device)


def _extend_mask(mask: torch.Tensor | None, n: int) -> torch.Tensor | None:
    if mask is None:
        return None
    if mask.dim() != 2:
        raise ConfigError(
            f"attention_mask must be 2-D (batch, sequence) with virtual tokens; got shape {tuple(mask.shape)}."
        )
    return torch.cat([_ones(mask.shape[0], n, mask), mask], dim=1)


def prepend_prompts(model: nn.Module, call: dict[str, Any], prompts: torch.Tensor) -> dict[str, Any]:
    """The keyword call with ``prompts`` (P, D) prepended to the (encoder) input of every sequence."""
    call = dict(call)
    labels_follow_input = not is_encoder_decoder(model)
    embeds = embed_inputs(model, call)
    batch, seq = embeds.shape[:2]
    n = prompts.shape[0]
    prompts = prompts.to(embeds.dtype).unsqueeze(0).expand(batch, -1, -1)  # (B, P, D)
    call["inputs_embeds"] = torch.cat([prompts, embeds], dim=1)  # (B, P + S, D)
    call["attention_mask"] = _extend_mask(call.get("attention_mask"), n)
    if call.get("token_type_ids") is not None:
        types = call["token_type_ids"]
        call["token_type_ids"] = torch.cat([torch.zeros_like(types[:, :1]).expand(-1, n), types], dim=1)
    if call.get("position_ids") is not None:
        pos = call["position_ids"]
        first = torch.arange(n, dtype=pos.dtype, device=pos.device).expand(*pos.shape[:-1], n)
        call["position_ids"] = torch.cat([first, pos + n], dim=-1)
    labels = call.get("labels")
    if labels_follow_input and isinstance(labels, torch.Tensor) and labels.dim() >= 2 and labels.shape[:2] == (batch, seq):
        pad = torch.full((batch, n, *labels.shape[2:]), -100, dtype=labels.dtype, device=labels.device)
        call["labels"] = torch.cat([pad, labels], dim=1)
    if call.get("attention_mask") is None:
        call.pop("attention_mask")
    return call


def generate_with_prompts(model: nn.Module, kwargs: dict[str, Any], prompts: torch.Tensor) -> Any:
    """``model.generate`` with ``prompts`` (P, D) in front of the input at the first step (and so in the cache)."""
    if not callable(getattr(model, "generate", None)):
        raise ConfigError(f"{type(model).__name__} cannot generate text (it has no generate()); call the model instead.")
    prepare = getattr(model, "prepare_inputs_for_generation", None)
    if not is_encoder_decoder(model) and callable(prepare) and "inputs_embeds" not in inspect.signature(prepare).parameters:
        raise ConfigError(
            f"{type(model).__name__}.generate() cannot start from input embeddings (its prepare_inputs_for_generation "
            "takes no inputs_embeds), so virtual tokens cannot be fed to it; forward and training work. Generate "
            "with a layer method (LoRA, IA3, adapters) on this model."
        )
    kwargs = dict(kwargs)
    encoder_decoder = is_encoder_decoder(model)
    ids = kwargs.get("input_ids")
    call = {"input_ids": ids, "inputs_embeds": kwargs.pop("inputs_embeds", None)}
    embeds = embed_inputs(model, call)
    batch, seq = embeds.shape[:2]
    mask = kwargs.pop("attention_mask", None)
    if mask is None:
        mask = torch.ones(batch, seq, dtype=torch.long, device=embeds.device)
    prompted = prepend_prompts(model, {"inputs_embeds": embeds, "attention_mask": mask}, prompts)
    kwargs.update(prompted)
    if encoder_decoder:
        kwargs.pop("input_ids", None)  # the encoder reads the prompted inputs_embeds instead
    return model.generate(**kwargs)


class VirtualTokenDelta(InputDelta):
    """Virtual tokens ``table()[:P]`` prepended to the input (prompt tuning, P-tuning).

    The stored table has ``num_virtual_tokens * num_transformer_submodules`` rows (HF peft's
    layout); only the first ``num_virtual_tokens`` are read. Saved as ``prompt_embeddings``.
    """

    def __init__(self, table: ReparamTable, num_virtual_tokens: int) -> None:
        super().__init__()
        self.table = table
        self.num_virtual_tokens = num_virtual_tokens

    def prompts(self) -> torch.Tensor:
        """The virtual tokens the model reads, ``(P, D)``."""
        return self.table()[: self.num_virtual_tokens]

    def leading_positions(self) -> int:
        return self.num_virtual_tokens

    def run(self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return model(**prepend_prompts(model, bind_call(model, args, kwargs), self.prompts()))

    def generate(self, model: nn.Module, kwargs: dict[str, Any]) -> Any:
        return generate_with_prompts(model, kwargs, self.prompts())

    @classmethod
    def run_routed(cls, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], routing: Routing,
                   deltas: dict[str, InputDelta]) -> Any:
        prompts = {name: delta.prompts() for name, delta in deltas.items()}  # type: ignore[attr-defined]
        return model(**prepend_routed(model, bind_call(model, args, kwargs), routing, prompts))

    @classmethod
    def generate_routed(cls, model: nn.Module, kwargs: dict[str, Any], routing: Routing,
                        deltas: dict[str, InputDelta]) -> Any:
        return generate_routed(model, kwargs, routing, {n: d.prompts() for n, d in deltas.items()})  # type: ignore[attr-defined]

    def adapter_state(self) -> dict[str, torch.Tensor]:
        return {"prompt_embeddings": self.table.saved()}

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        self.table.load_saved(state["prompt_embeddings"])
