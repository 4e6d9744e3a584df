"""Prefix tuning on encoders whose attention reads no cache (DistilBERT, ALBERT), through the attention interface.

Reference: the plain base model whose attention function (transformers' dispatch, ``"sdpa"``) is
replaced here by the formula ``softmax(q [P_k ; K]^T * scale + [0 ; mask]) [P_v ; V]``, written in this test.
"""

from __future__ import annotations

import pytest
import torch
from _zoo import tiny_inputs, tiny_model
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import deltatune as dt


def _reference_attention(flat: torch.Tensor, calls: list[int]):
    """Attention modules in call order; ALBERT calls its one shared layer twice, and one prefix serves both."""

    def attend(module, query, key, value, mask, scaling=None, **kwargs):
        heads, dh = key.shape[1], key.shape[-1]
        width = heads * dh
        layer = len(calls) % (flat.shape[1] // (2 * width))  # (P, L * 2 * D)
        calls.append(layer)
        pk = flat[:, 2 * layer * width:(2 * layer + 1) * width].view(-1, heads, dh).transpose(0, 1)  # (H, P, Dh)
        pv = flat[:, (2 * layer + 1) * width:(2 * layer + 2) * width].view(-1, heads, dh).transpose(0, 1)
        keys = torch.cat([pk.expand(key.shape[0], -1, -1, -1), key], dim=-2)
        values = torch.cat([pv.expand(value.shape[0], -1, -1, -1), value], dim=-2)
        scores = query @ keys.transpose(-1, -2) * (scaling or dh ** -0.5)  # (B, H, S, P + S)
        if mask is not None:
            additive = torch.zeros_like(mask, dtype=scores.dtype).masked_fill(~mask, float("-inf")) \
                if mask.dtype == torch.bool else mask
            front = torch.zeros(*additive.shape[:-1], pk.shape[1], dtype=scores.dtype)
            scores = scores + torch.cat([front, additive], dim=-1)
        out = scores.softmax(-1) @ values  # (B, H, S, Dh)
        return out.transpose(1, 2).contiguous(), None

    return attend


@pytest.mark.parametrize("family", ["distilbert", "albert"])
def test_prefixes_through_the_attention_interface_follow_the_formula(family: str, tmp_path) -> None:
    inputs = tiny_inputs(family)
    inputs["attention_mask"][1, -2:] = 0  # padding in the second row: the mask must keep working
    model = dt.get_delta_model(tiny_model(family), dt.PrefixTuningConfig(num_virtual_tokens=3))
    delta = model.input_deltas["default"]
    with torch.no_grad():
        delta.table.embedding.weight.normal_()
    flat = delta.table().detach()
    with torch.no_grad():
        out = model(**inputs).logits
    base = tiny_model(family)
    original, calls = ALL_ATTENTION_FUNCTIONS._global_mapping["sdpa"], []
    ALL_ATTENTION_FUNCTIONS._global_mapping["sdpa"] = _reference_attention(flat, calls)
    try:
        base.config._attn_implementation = "sdpa"
        with torch.no_grad():
            expected = base(**inputs).logits
    finally:
        ALL_ATTENTION_FUNCTIONS._global_mapping["sdpa"] = original
    assert calls == ([0, 0] if family == "albert" else [0, 1])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert base.config._attn_implementation == "sdpa" and model.config._attn_implementation != "deltatune_prefix"
    model.save_pretrained(tmp_path)
    loaded = dt.DeltaModel.from_pretrained(tiny_model(family), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, out, atol=1e-6, rtol=0)


def test_attention_outside_the_interface_keeps_the_clear_error() -> None:
    with pytest.raises(dt.TargetError, match="takes no key/value cache.*attention interface"):
        dt.get_delta_model(tiny_model("mpnet"), dt.PrefixTuningConfig(num_virtual_tokens=3))
