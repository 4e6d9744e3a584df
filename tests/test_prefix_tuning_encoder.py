"""Prefix tuning with ``encoder_prefix=True``: prefixes also in encoder self-attention and decoder cross-attention.

References are independent of the implementation: the attention formula written out here
(``softmax(q [P_k ; K]^T * scale + bias + mask) [P_v ; V]``, then the output projection), transformers'
own T5 relative position bias for a key sequence that starts ``P`` positions earlier, and a step-by-step
decoding loop without any cache.
"""

from __future__ import annotations

import json

import pytest
import torch
from _input_methods import check_save_load, check_training_step, greedy, main_output
from conftest import tiny_inputs, tiny_model
from safetensors.torch import load_file

import deltatune as dt

P, H, DH = 3, 4, 8  # prefix length; tiny T5/BART: 4 heads of 8, 2 encoder + 2 decoder layers


def enc_model(kind: str, **options: object) -> dt.DeltaModel:
    config = dt.PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=P, encoder_prefix=True, **options)
    return dt.get_delta_model(tiny_model(kind), config).eval()


def tables(model: dt.DeltaModel) -> list[torch.Tensor]:
    """(encoder self-attention, decoder cross-attention) tables, each (P, [L0 keys, L0 values, L1 keys, ...])."""
    return [t().detach() for t in model.input_deltas["default"].extra_tables]


def prefix_kv(table: torch.Tensor, layer: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    kv = table.view(P, -1, 2, H, DH)[:, layer]  # (P, k/v, H, Dh)
    return tuple(kv[:, i].permute(1, 0, 2).expand(batch, -1, -1, -1) for i in (0, 1))  # (B, H, P, Dh)


def split(x: torch.Tensor) -> torch.Tensor:  # (B, T, H * Dh) -> (B, H, T, Dh)
    return x.view(x.shape[0], -1, H, DH).transpose(1, 2)


def attend(att, h, source, table, layer, visible, scale, bias=0.0) -> torch.Tensor:
    """The attention formula with a prefix, written out; ``visible`` (B, S) marks attendable real keys."""
    names = ("q", "k", "v", "o") if hasattr(att, "q") else ("q_proj", "k_proj", "v_proj", "out_proj")
    q_, k_, v_, o_ = (getattr(att, n) for n in names)
    pk, pv = prefix_kv(table, layer, h.shape[0])
    k = torch.cat([pk, split(k_(source))], dim=2)  # (B, H, P + S, Dh)
    v = torch.cat([pv, split(v_(source))], dim=2)
    seen = torch.cat([torch.ones(h.shape[0], P), visible.float()], dim=1)  # prefix always visible
    scores = split(q_(h)) @ k.transpose(-1, -2) * scale + bias + (1 - seen)[:, None, None, :] * -1e9
    return o_((scores.softmax(-1) @ v).transpose(1, 2).reshape(*h.shape[:2], -1))


def record(modules: list[torch.nn.Module]) -> list[dict]:
    seen: list[dict] = [{} for _ in modules]
    for slot, module in zip(seen, modules):
        module.register_forward_pre_hook(lambda m, a, k, s=slot: s.update(args=a, kw=k), with_kwargs=True)
        module.register_forward_hook(lambda m, a, out, s=slot: s.update(out=out[0]))
    return seen


def t5_bias(att, q: int, s: int) -> torch.Tensor:
    """T5's own relative position bias for keys [prefix ; input]: the prefix at positions -P .. -1."""
    with torch.no_grad():
        return att.compute_bias(q + P, s + P)[:, :, P:, :]  # queries at P .. P + q - 1, keys 0 .. P + s - 1


def test_bart_encoder_and_cross_attention_match_the_formula() -> None:
    model = enc_model("bart")
    bart = model.base_model.model.model  # peft's path: the wrapped BartForConditionalGeneration, then its BartModel
    enc_att = [layer.self_attn for layer in bart.encoder.layers]
    cross_att = [layer.encoder_attn for layer in bart.decoder.layers]
    seen = record(enc_att + cross_att)
    inputs = tiny_inputs("bart")
    inputs["attention_mask"][1, -3:] = 0
    main_output(model, inputs)
    enc_table, cross_table = tables(model)
    mask = inputs["attention_mask"]
    with torch.no_grad():
        for layer in range(2):
            h = seen[layer]["args"][0]
            expected = attend(enc_att[layer], h, h, enc_table, layer, mask, DH**-0.5)
            torch.testing.assert_close(seen[layer]["out"], expected, atol=1e-5, rtol=0)
            h, source = seen[2 + layer]["args"][0], seen[2 + layer]["kw"]["key_value_states"]
            expected = attend(cross_att[layer], h, source, cross_table, layer, mask, DH**-0.5)
            torch.testing.assert_close(seen[2 + layer]["out"], expected, atol=1e-5, rtol=0)


def test_t5_encoder_attention_matches_the_formula_with_shifted_position_bias() -> None:
    model = enc_model("t5")
    t5 = model.base_model
    enc_att = [block.layer[0].SelfAttention for block in t5.encoder.block]
    cross_att = [block.layer[1].EncDecAttention for block in t5.decoder.block]
    seen = record(enc_att + cross_att)
    inputs = tiny_inputs("t5")
    inputs["attention_mask"][1, -3:] = 0
    main_output(model, inputs)
    enc_table, cross_table = tables(model)
    mask = inputs["attention_mask"]
    bias = t5_bias(enc_att[0], 7, 7)  # layer 0's bias table serves every encoder layer
    with torch.no_grad():
        for layer in range(2):  # layer 1 checks the bias T5 hands on is the widened one, widened once
            h = seen[layer]["args"][0]
            expected = attend(enc_att[layer], h, h, enc_table, layer, mask, 1.0, bias)
            torch.testing.assert_close(seen[layer]["out"], expected, atol=1e-5, rtol=0)
            h, source = seen[2 + layer]["args"][0], seen[2 + layer]["kw"]["key_value_states"]
            expected = attend(cross_att[layer], h, source, cross_table, layer, mask, 1.0)  # no bias in cross-attn
            torch.testing.assert_close(seen[2 + layer]["out"], expected, atol=1e-5, rtol=0)


def test_t5_encoder_prefix_of_real_token_keys_equals_longer_input_in_layer0() -> None:
    """Prefix = the layer-0 keys/values T5 computes for real tokens x: layer 0 on y equals layer 0 on [x ; y]."""
    base, model = tiny_model("t5"), enc_model("t5")
    x, y = torch.tensor([[11, 42, 7]]), torch.tensor([[5, 9, 31, 2, 17]])
    att = base.encoder.block[0].layer[0].SelfAttention
    seen = record([att, model.base_model.encoder.block[0].layer[0].SelfAttention])
    with torch.no_grad():
        base.encoder(input_ids=torch.cat([x, y], dim=1))
        normed = base.encoder.block[0].layer[0].layer_norm(base.shared(x))  # layer-0 input of x
        rows = torch.cat([att.k(normed)[0], att.v(normed)[0]], dim=-1)  # (P, [keys, values])
        table = model.input_deltas["default"].extra_tables[0].embedding.weight
        table[:, : rows.shape[1]] = rows  # encoder layer 0's prefix
        model(input_ids=y, decoder_input_ids=torch.tensor([[0]]))
    torch.testing.assert_close(seen[1]["out"], seen[0]["out"][:, P:], atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["t5", "bart"])
def test_generate_with_cache_equals_uncached_steps_and_caches_the_cross_prefix_once(kind: str) -> None:
    model = enc_model(kind)
    inputs = tiny_inputs(kind)
    inputs["attention_mask"][1, -2:] = 0
    decoder = model.base_model.get_decoder()
    cross = [m for n, m in decoder.named_modules() if n.endswith(("EncDecAttention", "encoder_attn"))]
    lengths: list[int] = []
    cross[-1].register_forward_hook(lambda m, a, k, out: lengths.append(
        k["cache"].cross_attention_cache.get_seq_length(m.layer_idx)), with_kwargs=True)
    out = greedy(model, inputs, new=4, return_dict_in_generate=True, output_logits=True)
    assert lengths == [P + 7] * 4  # the prefix in the cached cross-attention keys exactly once, every step
    seq = out.sequences
    with torch.no_grad():  # no cache: every step recomputes everything from the tokens so far
        for step, logits in enumerate(out.logits):
            full = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                         decoder_input_ids=seq[:, : step + 1]).logits[:, -1]
            torch.testing.assert_close(logits, full, atol=1e-5, rtol=0)
    plain = dt.get_delta_model(tiny_model(kind), dt.PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=P))
    plain.input_deltas["default"].table.load_saved(model.input_deltas["default"].table.saved())
    assert not torch.allclose(main_output(plain.eval(), inputs), main_output(model, inputs), atol=1e-3)


@pytest.mark.parametrize("projection", [False, True])
def test_trains_only_the_prefixes_and_reloads(projection: bool, tmp_path) -> None:
    model = enc_model("t5", prefix_projection=projection)
    inputs = tiny_inputs("t5")
    inputs["attention_mask"][1, :2] = 0
    check_training_step(model, "t5", inputs)
    for table in model.input_deltas["default"].extra_tables:  # both new tables learn
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in table.parameters())
    check_save_load(model, tiny_model("t5"), inputs, tmp_path)
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert {k: tuple(v.shape) for k, v in saved.items()} == {
        "prompt_embeddings": (P, 2 * 2 * 32), "encoder_prefix_embeddings": (P, 2 * 2 * 32),
        "cross_attention_prefix_embeddings": (P, 2 * 2 * 32)}
    assert json.loads((tmp_path / "adapter_config.json").read_text())["encoder_prefix"] is True


def test_default_file_has_no_encoder_prefix_field(tmp_path) -> None:
    model = dt.get_delta_model(tiny_model("bart"), dt.PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=P))
    model.save_pretrained(tmp_path)
    assert "encoder_prefix" not in json.loads((tmp_path / "adapter_config.json").read_text())
    assert set(load_file(str(tmp_path / "adapter_model.safetensors"))) == {"prompt_embeddings"}


def test_encoder_prefix_is_refused_on_decoder_only_models_and_must_be_bool() -> None:
    with pytest.raises(dt.ConfigError, match="encoder-decoder"):
        dt.get_delta_model(tiny_model("gpt2_lm"), dt.PrefixTuningConfig(num_virtual_tokens=P, encoder_prefix=True))
    with pytest.raises(dt.ConfigError, match="encoder_prefix"):
        dt.PrefixTuningConfig(encoder_prefix="yes")
