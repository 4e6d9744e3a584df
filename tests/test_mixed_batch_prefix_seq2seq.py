"""Prefix tuning on encoder-decoder models in mixed-adapter batches (``adapter_names=[...]``).

Reference: each example run alone with its adapter (``set_adapter``) or with adapters disabled, for
the forward (logits and per-row loss) and ``generate`` with beams; HF peft's block pairing
(``num_transformer_submodules=2``) and one block per layer (``=1``) in one batch. A decoder with
absolute positions (BART) is exact only when every row has the same prefix length: anything else is
refused before work starts.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from _mixed_checks import (
    BASE,
    assert_generate_mixed_equals_solo,
    assert_mixed_equals_solo,
    build,
    lora,
    perturbed,
)

import deltatune as dt
from deltatune.errors import ConfigError


def prefix(p: int, **kw: Any) -> dt.PrefixTuningConfig:
    return dt.PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=p, **kw)


def t5_model(make_model: Any) -> dt.DeltaModel:
    configs = {"x2": prefix(2), "x4": prefix(4), "one": prefix(3, num_transformer_submodules=1),
               "l": dt.LoraConfig(r=2, lora_alpha=4, target_modules=["q", "v"], init_lora_weights=False,
                                  task_type="SEQ_2_SEQ_LM")}
    return perturbed(build(make_model, "t5", configs))


def test_t5_rows_with_different_prefix_lengths(make_model: Any) -> None:
    model = t5_model(make_model)
    names = ["x4", "l", BASE, "x2", "one", "x4"]
    inputs = make_model.inputs("t5", batch=len(names))
    assert_mixed_equals_solo(model, inputs, names)
    inputs["decoder_attention_mask"] = torch.ones_like(inputs["decoder_input_ids"])
    inputs["decoder_attention_mask"][1, -1] = 0  # a padded decoder position too
    assert_mixed_equals_solo(model, inputs, names)


def test_t5_loss_from_labels_per_row(make_model: Any) -> None:
    model = t5_model(make_model)
    names = ["x2", "one", "l"]
    inputs = make_model.inputs("t5", batch=3)
    call = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"], "labels": inputs["decoder_input_ids"]}
    with torch.no_grad():
        mixed = model(**call, adapter_names=names).loss
        losses = []
        for i, name in enumerate(names):
            model.set_adapter(name)
            losses.append(model(**{k: v[i : i + 1] for k, v in call.items()}).loss)
    torch.testing.assert_close(mixed, torch.stack(losses).mean(), atol=1e-5, rtol=1e-5)  # equal label counts


def test_t5_generate_with_beams(make_model: Any) -> None:
    model = t5_model(make_model)
    ids = make_model.inputs("t5", batch=5)["input_ids"]
    names = ["x4", BASE, "one", "l", "x2"]
    for kw in ({"num_beams": 2, "num_return_sequences": 2}, {}):
        gen = {"max_new_tokens": 5, "do_sample": False, **kw}
        assert_generate_mixed_equals_solo(model, ids, names, gen)


def test_t5_gradients_reach_only_each_examples_prefix(make_model: Any) -> None:
    model = t5_model(make_model)
    model.set_adapter(["x2", "x4", "one", "l"])
    model.train()
    inputs = make_model.inputs("t5", batch=3)
    model(**inputs, adapter_names=["x4", "x2", BASE]).logits[0].pow(2).sum().backward()
    for name in ("x2", "x4", "one", "l"):
        grads = [p.grad for p in model.adapter_parameters(name)]
        if name == "x4":
            assert all(g is not None and g.abs().sum() > 0 for g in grads)
        else:
            assert all(g is None or g.abs().sum() == 0 for g in grads), name


def test_bart_absolute_positions_need_equal_prefix_lengths(make_model: Any) -> None:
    model = perturbed(build(make_model, "bart", {"a": prefix(3), "b": prefix(3), "c": prefix(2), "l": lora(2, 4)}))
    inputs = make_model.inputs("bart", batch=4)
    assert_mixed_equals_solo(model, inputs, ["a", "b", "b", "a"])  # one prefix length: exact
    for names in (["a", "c", "a", "b"], ["a", BASE, "b", "a"], ["a", "l", "b", "a"]):
        with pytest.raises(ConfigError, match="absolute|counts positions"):
            model(**inputs, adapter_names=names)
    with pytest.raises(ConfigError, match="prefix lengths"):
        model.generate(input_ids=inputs["input_ids"], adapter_names=["a", "c", "a", "b"], max_new_tokens=2)


@pytest.mark.parametrize("kind", ["t5", "bart"])
def test_encoder_prefix_rows(make_model: Any, kind: str) -> None:
    """Encoder and cross-attention prefixes per row: different lengths (T5), beside rows without them."""
    if kind == "t5":
        configs = {"e2": prefix(2, encoder_prefix=True), "e4": prefix(4, encoder_prefix=True), "x": prefix(3),
                   "l": dt.LoraConfig(r=2, target_modules=["q", "v"], init_lora_weights=False, task_type="SEQ_2_SEQ_LM")}
        names = ["e4", "x", BASE, "e2", "l", "e4"]
    else:  # absolute decoder positions: one decoder prefix length; the encoder prefixes may differ in use
        configs = {"e": prefix(3, encoder_prefix=True), "x": prefix(3)}
        names = ["e", "x", "x", "e"]
    model = perturbed(build(make_model, kind, configs))
    inputs = make_model.inputs(kind, batch=len(names))
    assert_mixed_equals_solo(model, {k: v for k, v in inputs.items() if k != "attention_mask"}, names)  # no mask
    inputs["attention_mask"][1, -2:] = 0  # padded encoder positions too
    assert_mixed_equals_solo(model, inputs, names)
    ids, gen = inputs["input_ids"], {"max_new_tokens": 4, "do_sample": False, "num_beams": 2, "num_return_sequences": 2}
    with torch.no_grad():
        mixed = model.generate(input_ids=ids, attention_mask=inputs["attention_mask"], adapter_names=names, **gen)
        for i, name in enumerate(names):
            one = {"input_ids": ids[i : i + 1], "attention_mask": inputs["attention_mask"][i : i + 1]}
            if name == BASE:
                with model.disable_adapter():
                    ref = model.generate(**one, **gen)
            else:
                model.set_adapter(name)
                ref = model.generate(**one, **gen)
            assert torch.equal(mixed[2 * i : 2 * i + 2, : ref.shape[1]], ref), name
    if kind == "t5":  # training: row 0's loss reaches only its adapter's three tables
        model.set_adapter(list(configs))
        model.train()
        model(**inputs, adapter_names=names).logits[0].pow(2).sum().backward()
        for name in configs:
            grads = [p.grad for p in model.adapter_parameters(name)]
            if name == "e4":
                assert len(grads) == 3 and all(g is not None and g.abs().sum() > 0 for g in grads)
            else:
                assert all(g is None or g.abs().sum() == 0 for g in grads), name
