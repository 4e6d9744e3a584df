"""Prefix tuning (Li & Liang, arXiv 2101.00190): trainable keys and values in front of every attention layer.

    head_l(x) = softmax(q [P_k^l ; W_k h]^T / sqrt(d)) [P_v^l ; W_v h],   P_k^l, P_v^l in R^{P x d} trainable

Trains the prefixes (``P x L*2*D`` numbers, with ``D = kv_heads * head_dim``: grouped-query models get
prefixes as wide as their key/value heads), optionally through an MLP (``prefix_projection``), plus
``modules_to_save``. The prefixes travel in the model's own key/value cache (see :mod:`.cache`), so
``generate()`` keeps them at every step. Encoder-only models (BERT, RoBERTa) work when their attention
reads a cache (transformers 5 does); models whose attention reads none (DistilBERT, ALBERT) get their
prefixes through transformers' attention interface (:mod:`.interface`) where their attention uses it,
else a clear error.
Encoder-decoder models: prefixes in every decoder self-attention layer (HF peft's layout); with
``encoder_prefix=True`` (deltatune only) also in every encoder self-attention and every decoder
cross-attention layer, through forward pre-hooks on those attention modules (see :mod:`.attention`).

Saved in HF peft's format: ``prompt_embeddings`` of shape ``(P, L*2*D)`` (the MLP output when
projecting). Encoder-decoder models: HF peft (0.21, transformers 5) runs decoder prefixes only with
``num_transformer_submodules=2`` and then feeds decoder layer ``l`` the stored block ``2l mod L``
(for even ``L`` pairs of layers share a block and half the blocks stay unused). deltatune does the
same by default so files load in either library with equal outputs; ``num_transformer_submodules=1``
gives every decoder layer its own prefix (a file peft cannot run with an attention mask).
``encoder_prefix=True`` adds ``encoder_prefix_embeddings`` ``(P, L_enc*2*D)`` and
``cross_attention_prefix_embeddings`` ``(P, L_dec*2*D)`` (same flat layout) and the config field; HF
peft cannot read such a file. Cannot be merged.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ...errors import ConfigError, TargetError
from ...input_delta import InputDelta, bind_call
from ...registry import MethodSpec, register
from ...routing import Routing
from .._virtual_tokens import ReparamTable, fill_from_model
from .._virtual_tokens.config import text_config
from . import mixed
from .attention import ROLES, Site, attached, find_sites, flat_width
from .cache import KVLayout, build_cache, probe_layout
from .config import PrefixTuningConfig
from .interface import interface_sites, switched

if TYPE_CHECKING:
    from transformers import Cache


def _batch(call: dict[str, Any]) -> int:
    for key in ("input_ids", "inputs_embeds"):
        if call.get(key) is not None:
            return int(call[key].shape[0])
    raise ConfigError("Prefix tuning needs the model input: pass input_ids or inputs_embeds.")


def _expand_size(model: nn.Module, kwargs: dict[str, Any]) -> int:
    """How many rows ``generate`` makes of each input (beams / returned sequences)."""
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    beams = kwargs.get("num_beams") or getattr(config, "num_beams", 1) or 1
    returned = kwargs.get("num_return_sequences") or getattr(config, "num_return_sequences", 1) or 1
    return max(int(beams), int(returned))


def _ones_before(mask: torch.Tensor, n: int) -> torch.Tensor:
    return torch.cat([torch.ones(mask.shape[0], n, dtype=mask.dtype, device=mask.device), mask], dim=1)


class PrefixTuningDelta(InputDelta):
    """The key/value prefixes of one prefix-tuning adapter."""

    method_name = "prefix_tuning"

    #: file keys of the ``encoder_prefix`` tables, in the order of :data:`.attention.ROLES`
    EXTRA_KEYS = ("encoder_prefix_embeddings", "cross_attention_prefix_embeddings")

    def __init__(self, table: ReparamTable, layout: KVLayout, num_virtual_tokens: int, blocks: list[int],
                 extra: list[tuple[list[Site], ReparamTable]] | None = None) -> None:
        super().__init__()
        self.table = table
        self.layout = layout
        self.num_virtual_tokens = num_virtual_tokens
        self.blocks = blocks
        extra = extra or []
        self.extra_sites = [sites for sites, _ in extra]  # plain list: the base model's modules stay unregistered
        self.extra_tables = nn.ModuleList(table for _, table in extra)

    def leading_positions(self) -> int:
        return self.num_virtual_tokens

    def _hooks(self) -> Any:
        """The encoder / cross-attention prefixes in place for one call (nothing without ``encoder_prefix``)."""
        if not self.extra_sites:
            return nullcontext()
        return attached(list(zip(self.extra_sites, (t() for t in self.extra_tables))))

    def cache(self, batch: int, dtype: torch.dtype) -> Cache:
        """A fresh cache holding the prefixes for ``batch`` sequences."""
        return build_cache(self.table().to(dtype), self.layout, batch, self.blocks)

    def _mask_key(self) -> str:
        return "decoder_attention_mask" if self.layout.encoder_decoder else "attention_mask"

    def run(self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if model.training:
            refuse_checkpointing(model)
        call = bind_call(model, args, kwargs)
        kw = self.layout.cache_kwarg
        if any(call.get(name) is not None for name in ("cache", "past_key_values")):
            raise ConfigError(
                "Prefix tuning puts its prefixes into the key/value cache itself; do not pass a cache to "
                "forward(). For step-by-step decoding use generate()."
            )
        call.pop("past_key_values", None)
        call.pop("cache", None)
        mask = call.get(self._mask_key())
        if mask is not None:
            call[self._mask_key()] = _ones_before(mask, self.num_virtual_tokens)
        call[kw] = self.cache(_batch(call), model_dtype(model))
        with self._hooks():
            return model(**call)

    def generate(self, model: nn.Module, kwargs: dict[str, Any]) -> Any:
        kwargs = dict(kwargs)
        batch = _batch(kwargs)
        if not self.layout.encoder_decoder:
            mask = kwargs.get("attention_mask")
            if mask is None:
                source = kwargs.get("input_ids")
                seq = source.shape[1] if source is not None else kwargs["inputs_embeds"].shape[1]
                device = (source if source is not None else kwargs["inputs_embeds"]).device
                mask = torch.ones(batch, seq, dtype=torch.long, device=device)
            kwargs["attention_mask"] = _ones_before(mask, self.num_virtual_tokens)
        kwargs[self.layout.cache_kwarg] = self.cache(batch * _expand_size(model, kwargs), model_dtype(model))
        kwargs["use_cache"] = True  # the prefixes live in the cache; the tokens generated are the same either way
        with self._hooks():
            return model.generate(**kwargs)

    @classmethod
    def run_routed(cls, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], routing: Routing,
                   deltas: dict[str, InputDelta]) -> Any:
        if model.training:
            refuse_checkpointing(model)
        call = bind_call(model, args, kwargs)
        if any(call.get(name) is not None for name in ("cache", "past_key_values")):
            raise ConfigError("Prefix tuning puts its prefixes into the key/value cache itself; do not pass a cache.")
        call.pop("past_key_values", None)
        call.pop("cache", None)
        return mixed.run_routed(model, call, routing, deltas, _batch(call), model_dtype(model))  # type: ignore[arg-type]

    @classmethod
    def generate_routed(cls, model: nn.Module, kwargs: dict[str, Any], routing: Routing,
                        deltas: dict[str, InputDelta]) -> Any:
        return mixed.generate_routed(model, kwargs, routing, deltas, _expand_size(model, kwargs),  # type: ignore[arg-type]
                                     model_dtype(model))

    def adapter_state(self) -> dict[str, torch.Tensor]:
        state = {"prompt_embeddings": self.table.saved()}
        state.update({key: table.saved() for key, table in zip(self.EXTRA_KEYS, self.extra_tables)})
        return state

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        self.table.load_saved(state["prompt_embeddings"])
        for key, table in zip(self.EXTRA_KEYS, self.extra_tables):
            table.load_saved(state[key])


def refuse_checkpointing(model: nn.Module) -> None:
    """Gradient checkpointing makes transformers drop the cache in training, and with it the prefixes."""
    if any(getattr(module, "gradient_checkpointing", False) is True for module in model.modules()):
        raise ConfigError(
            "Prefix tuning keeps its prefixes in the key/value cache, which transformers drops while training "
            "with gradient checkpointing. Call model.gradient_checkpointing_disable() (with transformers' Trainer "
            "or TRL, which turns it on by default: gradient_checkpointing=False in the training arguments), or use "
            "prompt tuning / P-tuning, which work with checkpointing."
        )


def model_dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def _check_layout(config: PrefixTuningConfig, layout: KVLayout, model: nn.Module) -> None:
    """Fill the layout fields, or refuse a config made for another layout."""
    width = layout.num_heads * layout.head_dim
    given = (config.num_layers, config.num_attention_heads, config.token_dim)
    if config.num_layers is None:
        config.num_layers = layout.num_layers
    if config.num_attention_heads is None:
        config.num_attention_heads = layout.num_heads
    if config.token_dim is None:
        config.token_dim = width
    if (config.num_layers, config.num_attention_heads, config.token_dim) != (layout.num_layers, layout.num_heads, width):
        raise ConfigError(
            f"The prefix layout (num_layers, num_attention_heads, token_dim)={given} does not fit "
            f"{type(model).__name__}, whose attention caches hold {layout.num_layers} layers of {layout.num_heads} "
            f"key/value heads x {layout.head_dim} (token_dim {width}). The adapter belongs to another model, "
            "or leave these fields unset."
        )


def _blocks(config: PrefixTuningConfig, layout: KVLayout) -> list[int]:
    """Which stored block feeds each model layer: block ``l``, or HF peft's ``2l mod L`` (see the module doc)."""
    layers = layout.num_layers
    if layout.encoder_decoder and config.num_transformer_submodules == 2:
        return [(2 * layer) % layers for layer in range(layers)]
    return list(range(layers))


class InterfacePrefixDelta(PrefixTuningDelta):
    """Prefixes for a model whose attention reads no cache: handed to its attention function (:mod:`.interface`)."""

    def __init__(self, table: ReparamTable, layout: KVLayout, num_virtual_tokens: int, sites: list[nn.Module]) -> None:
        super().__init__(table, layout, num_virtual_tokens, list(range(layout.num_layers)))
        self.sites = sites  # plain list: the base model's modules stay unregistered here

    def _prefixes(self, dtype: torch.dtype) -> dict[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
        flat = self.table().to(dtype)  # (P, L * 2 * D): layer 0 keys, layer 0 values, layer 1 keys ...
        width = flat.shape[1] // (2 * len(self.sites))
        return {site: (flat[:, 2 * i * width:(2 * i + 1) * width], flat[:, (2 * i + 1) * width:(2 * i + 2) * width])
                for i, site in enumerate(self.sites)}

    def run(self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        with switched(model, self._prefixes(model_dtype(model))):
            return model(*args, **kwargs)

    def generate(self, model: nn.Module, kwargs: dict[str, Any]) -> Any:
        with switched(model, self._prefixes(model_dtype(model))):
            return model.generate(**kwargs)


def _through_interface(model: nn.Module, config: PrefixTuningConfig, no_cache: TargetError) -> InterfacePrefixDelta:
    """The prefixes of a model without a usable cache, if its attention goes through transformers' interface."""
    try:
        sites = interface_sites(model)
    except Exception as err:
        raise TargetError(f"{no_cache} (Nor does {err}.)") from err
    widths = {width for _, width in sites}
    cfg = text_config(model)
    heads = getattr(cfg, "num_key_value_heads", None) or getattr(cfg, "num_attention_heads", None)
    if len(widths) != 1 or not isinstance(heads, int) or next(iter(widths)) % heads:
        raise no_cache
    if config.encoder_prefix:
        raise ConfigError("encoder_prefix=True is for encoder-decoder models; leave it False.")
    width = widths.pop()
    layout = KVLayout(len(sites), heads, width // heads, "", False)
    _check_layout(config, layout, model)
    config.num_transformer_submodules = config.num_transformer_submodules or 1
    fill_from_model(config, model)
    config.num_layers = layout.num_layers
    if config.encoder_hidden_size is None:
        config.encoder_hidden_size = config.token_dim
    table = _table(config, width, 2 * layout.num_layers * width, model)
    return InterfacePrefixDelta(table, layout, config.num_virtual_tokens, [module for module, _ in sites])


def make_prefix_tuning(model: nn.Module, config: PrefixTuningConfig, adapter_name: str) -> PrefixTuningDelta:
    """Read the model's cache layout, fill the config, build the prefix table (and MLP when projecting).

    A model whose forward takes no cache gets its prefixes through transformers' attention interface
    instead (:mod:`.interface`), where its attention goes through it.
    """
    try:
        layout = probe_layout(model)
    except TargetError as err:
        return _through_interface(model, config, err)
    _check_layout(config, layout, model)
    if config.num_transformer_submodules is None:  # HF peft can read encoder-decoder prefixes only with 2
        config.num_transformer_submodules = 2 if layout.encoder_decoder else 1
    fill_from_model(config, model)
    config.num_layers = layout.num_layers  # fill_from_model never overrides; keep the probed value
    if config.encoder_hidden_size is None:
        config.encoder_hidden_size = config.token_dim
    dim = int(config.token_dim or 0)
    table = _table(config, dim, 2 * layout.num_layers * dim, model)
    extra = []
    if config.encoder_prefix:
        if not layout.encoder_decoder:
            raise ConfigError(
                f"encoder_prefix=True is for encoder-decoder models; {type(model).__name__} is not one, and its "
                "attention layers all get prefixes already. Leave encoder_prefix=False."
            )
        for role in ROLES:
            sites = find_sites(model, role)
            extra.append((sites, _table(config, sites[0].width, flat_width(sites), model)))
    return PrefixTuningDelta(table, layout, config.num_virtual_tokens, _blocks(config, layout), extra)


def _table(config: PrefixTuningConfig, dim: int, flat: int, model: nn.Module) -> ReparamTable:
    """A ``(P, flat)`` prefix table: plain, or ``MLP(e)`` with ``e`` ``(P, dim)`` when projecting."""
    if config.prefix_projection and not config.inference_mode:
        hidden = int(config.encoder_hidden_size or dim)
        head = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, flat))
        table = ReparamTable(config.num_virtual_tokens, dim, head)
        if config.init_weights == "zero":
            nn.init.zeros_(head[-1].weight)
            nn.init.zeros_(head[-1].bias)
    else:
        table = ReparamTable(config.num_virtual_tokens, flat)
        if config.init_weights == "zero":
            nn.init.zeros_(table.embedding.weight)
    return table.to(next(model.parameters()).device)


SPEC = register(
    MethodSpec(
        name="prefix_tuning",
        peft_type=PrefixTuningConfig.PEFT_TYPE,
        config_cls=PrefixTuningConfig,
        kind="input",
        make_input=make_prefix_tuning,
    )
)

__all__ = ["SPEC", "KVLayout", "PrefixTuningConfig", "PrefixTuningDelta", "make_prefix_tuning", "probe_layout"]
