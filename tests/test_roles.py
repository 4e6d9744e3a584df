"""Roles from structure: what model_interface infers on families it has no table entry for, and overrides."""

from __future__ import annotations

import pytest
import torch
from _zoo import tiny_inputs
from _zoo import tiny_model as zoo_model

import deltatune as dt
from deltatune import model_interface as mi


def _last(paths: list[str]) -> set[str]:
    """Paths with the layer number dropped: ``model.layers.0.self_attn.q_proj`` -> ``self_attn.q_proj``."""
    return {".".join(p.split(".")[-2:]) for p in paths}


@pytest.mark.parametrize(("family", "expected"), [
    ("gpt_neox", {"q": {"attention.query_key_value"}, "o": {"attention.dense"}, "up": {"mlp.dense_h_to_4h"},
                  "down": {"mlp.dense_4h_to_h"}, "ffn_block": {"0.mlp", "1.mlp"}}),
    ("mpt", {"k": {"attn.Wqkv"}, "o": {"attn.out_proj"}, "down": {"ffn.down_proj"}, "ffn_block": {"0.ffn", "1.ffn"}}),
    ("phi", {"q": {"self_attn.q_proj"}, "o": {"self_attn.dense"}, "up": {"mlp.fc1"}, "down": {"mlp.fc2"}}),
    ("ctrl", {"v": {"multi_head_attention.Wv"}, "o": {"multi_head_attention.dense"}, "up": {"ffn.0"},
              "down": {"ffn.2"}, "ffn_block": {"0.ffn", "1.ffn"}}),
    ("deberta-v2", {"q": {"self.query_proj"}, "o": {"output.dense"}, "up": {"intermediate.dense"},
                    "ffn_block": {"0.output", "1.output"}}),
    ("flaubert", {"q": {"0.q_lin", "1.q_lin"}, "up": {"0.lin1", "1.lin1"}, "ffn_block": {"ffns.0", "ffns.1"}}),
    ("opt", {"q": {"self_attn.q_proj"}, "up": {"0.fc1", "1.fc1"}, "down": {"0.fc2", "1.fc2"}, "ffn_block": set()}),
    ("mixtral", {"up": set(), "ffn_out": {"0.mlp", "1.mlp"}, "router": {"mlp.gate"},
                 "experts": {"experts.gate_up_proj", "experts.down_proj"}}),
    ("llama", {"gate": {"mlp.gate_proj"}, "up": {"mlp.gate_proj", "mlp.up_proj"}, "embed": {"model.embed_tokens"},
               "head": {"lm_head"}}),
    ("t5", {"cross_attn": {"1.EncDecAttention"}, "enc_self_attn": {"0.SelfAttention"}, "up": {"DenseReluDense.wi"}}),
])
def test_roles_are_read_from_the_structure(family: str, expected: dict[str, set[str]]) -> None:
    model = zoo_model(family)
    for role, paths in expected.items():
        assert _last(mi.role_paths(model, role)) == paths, role


def test_inline_feed_forward_is_explained() -> None:
    reason = mi.missing_role_reason(zoo_model("opt"), "ffn_block")
    assert "OPTDecoderLayer computes its feed-forward block inline" in reason and "fc2" in reason


def test_role_regex_generalises_layer_numbers_and_matches_exactly_the_roles() -> None:
    model = zoo_model("qwen2")
    regex = mi.role_regex(model, ["q", "v"])
    assert regex == r"(?:model\.layers\.\d+\.self_attn\.q_proj|model\.layers\.\d+\.self_attn\.v_proj)"
    delta = dt.get_delta_model(model, dt.LoraConfig(r=2))
    wrapped = {p for p, m in delta.base_model.named_modules() if isinstance(m, dt.layer.DeltaLayer)}
    assert wrapped == {f"model.layers.{i}.self_attn.{n}" for i in (0, 1) for n in ("q_proj", "v_proj")}


def _cached(model, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    from transformers import DynamicCache

    cache = DynamicCache()
    with torch.no_grad():
        model(**inputs, cache=cache, use_cache=True)
    return cache.layers[0].keys.clone(), cache.layers[0].values.clone()


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "falcon", "bloom", "gpt_bigcode", "mpt"])
def test_fused_qkv_rows_match_what_the_attention_reads(family: str) -> None:
    """Zeroing the rows said to be the values zeroes the cached values of that layer and leaves the keys (and
    the other way round): the layout (concat, per-head, grouped) is the one the model's forward uses."""
    model = zoo_model(family)
    inputs = {"input_ids": tiny_inputs(family)["input_ids"]}
    path = mi.role_paths(model, "qkv")[0]
    rows = mi.fused_qkv_rows(model, path)
    assert sorted(torch.cat(list(rows.values())).tolist()) == list(range(mi.linear_dims(model.get_submodule(path))[1]))
    keys, values = _cached(model, inputs)
    layer = model.get_submodule(path)
    transposed = not isinstance(layer, torch.nn.Linear)
    for role, zeroed_side in (("v", 1), ("k", 0)):
        saved = (layer.weight.detach().clone(), None if layer.bias is None else layer.bias.detach().clone())
        with torch.no_grad():
            if transposed:
                layer.weight[:, rows[role]] = 0
            else:
                layer.weight[rows[role]] = 0
            if layer.bias is not None:
                layer.bias[rows[role]] = 0
        new = _cached(model, inputs)
        assert new[zeroed_side].abs().max() < 1e-6
        assert torch.equal(new[1 - zeroed_side], (keys, values)[1 - zeroed_side])
        with torch.no_grad():
            layer.weight.copy_(saved[0])
            if saved[1] is not None:
                layer.bias.copy_(saved[1])


def test_register_architecture_overrides_inference() -> None:
    model = zoo_model("stablelm")
    try:
        dt.register_architecture("stablelm", roles={"q": "k_proj", "v": r"mlp\.up_proj"})
        delta = dt.get_delta_model(model, dt.LoraConfig(r=2))
        wrapped = {p.split(".", 3)[-1] for p, m in delta.base_model.named_modules() if isinstance(m, dt.layer.DeltaLayer)}
        assert wrapped == {"self_attn.k_proj", "mlp.up_proj"}
    finally:
        mi._OVERRIDES.pop("stablelm", None)
    with pytest.raises(dt.ConfigError, match="unknown roles"):
        dt.register_architecture("x", roles={"query": "q"})
    with pytest.raises(dt.ConfigError, match="invalid"):
        dt.register_architecture("x", roles={"q": "q_proj("})


def test_model_without_attention_gets_an_error_naming_what_was_found() -> None:
    from transformers import MambaConfig, MambaForCausalLM

    model = MambaForCausalLM(MambaConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, state_size=4))
    with pytest.raises(dt.ConfigError) as info:
        dt.get_delta_model(model, dt.LoraConfig(r=2))
    message = str(info.value)
    assert "found 0 attention module(s)" in message and "in_proj" in message and "register_architecture" in message


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_roles_see_through_adapter_wrappers(family: str) -> None:
    """A second adapter of another method gets the same defaults as the first: wrappers are looked through."""
    model = zoo_model(family)
    before = {role: mi.role_paths(model, role) for role in mi.ROLES}
    delta = dt.get_delta_model(model, dt.LoraConfig(r=2, target_modules="all-linear"))
    after = {role: mi.role_paths(delta.base_model, role) for role in mi.ROLES}
    assert after == before
