"""Checkpoints are HF peft's format, tested both ways with ``peft`` itself as the reference.

* deltatune makes and trains an adapter, saves it; ``peft.PeftModel.from_pretrained`` loads it onto a
  fresh copy of the base model and gives the same outputs (<= 1e-5); peft re-saves it with exactly
  the same tensor keys and values.
* ``peft.get_peft_model`` makes an adapter with non-zero weights, trains it, saves it; deltatune loads
  it with the same outputs and re-saves it with exactly peft's keys.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import deltatune as dt

peft = pytest.importorskip("peft")

CASES: dict[str, tuple[str, dict]] = {
    "bert_seq_cls_head": ("bert_seq_cls", {"target_modules": ["query", "value"], "task_type": "SEQ_CLS"}),
    "gpt2_conv1d": ("gpt2_lm", {"target_modules": ["c_attn", "c_proj", "c_fc"]}),
    "llama_gqa": ("llama_lm", {"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}),
    "llama_dora": ("llama_lm", {"target_modules": ["q_proj", "v_proj", "down_proj"], "use_dora": True}),
    "gpt2_dora_conv1d": ("gpt2_lm", {"target_modules": ["c_attn"], "use_dora": True}),
    "bert_rslora": ("bert_seq_cls", {"target_modules": ["query", "key"], "use_rslora": True, "task_type": "SEQ_CLS"}),
    "bert_embedding": ("bert", {"target_modules": ["word_embeddings", "query"]}),
    "bert_bias_all": ("bert_seq_cls", {"target_modules": ["query"], "bias": "all", "task_type": "SEQ_CLS"}),
    "gpt2_bias_lora_only": ("gpt2_lm", {"target_modules": ["c_attn"], "bias": "lora_only"}),
    "llama_patterns": ("llama_lm", {"target_modules": ["q_proj", "v_proj", "gate_proj"], "layers_to_transform": [1],
                                    "rank_pattern": {"v_proj": 2}, "alpha_pattern": {"gate_proj": 3.0}}),
}


def saved_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


# peft's bias="all" writes a modules_to_save head's bias three times: as "<head>.bias" (like every
# modules_to_save tensor) and again, through its bias filter, as "<head>.modules_to_save.bias" and
# "<head>.original_module.bias". deltatune writes the first, which holds the trained value, and skips
# the two duplicates when it reads peft's file.
PEFT_BIAS_DUPLICATES = {"base_model.model.classifier.modules_to_save.bias", "base_model.model.classifier.original_module.bias"}


def assert_same_files(ours: Path, theirs: Path, allow_extra_base: bool = False) -> None:
    """Both folders hold the same tensor keys with equal values (peft may add full base-layer weights)."""
    a, b = saved_tensors(ours), saved_tensors(theirs)
    extra = set(b) - set(a) - PEFT_BIAS_DUPLICATES
    if allow_extra_base:
        extra = {k for k in extra if ".base_layer." not in k}
    assert set(a) - set(b) == set() and extra == set(), (sorted(set(a) ^ set(b)))
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=0, rtol=0, msg=key)


def deltatune_config_warnings(record: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in record if "deltatune" in str(w.message) or "ignoring fields" in str(w.message)]


@pytest.mark.parametrize("case", list(CASES))
def test_deltatune_adapter_loads_in_peft(case, make_model, output_of, train, tmp_path) -> None:
    kind, options = CASES[case]
    inputs = make_model.inputs(kind)
    model = dt.get_delta_model(make_model(kind, seed=0), dt.LoraConfig(r=4, lora_alpha=8, **options))
    train(model, inputs, steps=3)
    model.eval()
    expected = output_of(model, inputs)
    with model.disable_adapter():
        assert (output_of(model, inputs) - expected).abs().max() > 1e-4  # the adapter matters
    model.save_pretrained(tmp_path / "dt")

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        loaded = peft.PeftModel.from_pretrained(make_model(kind, seed=0), tmp_path / "dt").eval()
    # Every key of adapter_config.json is one peft knows (the fingerprint lives in the safetensors header).
    # (transformers' own deprecation notices, raised inside peft whatever the adapter, are not about it.)
    about_adapter = [str(w.message) for w in record if "deprecated" not in str(w.message)]
    assert about_adapter == [], about_adapter
    torch.testing.assert_close(output_of(loaded, inputs), expected, atol=1e-5, rtol=0)
    loaded.save_pretrained(tmp_path / "peft")
    assert_same_files(tmp_path / "dt", tmp_path / "peft")
    ours = json.loads((tmp_path / "dt" / "adapter_config.json").read_text())
    theirs = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    for key in ("peft_type", "task_type", "r", "lora_alpha", "use_dora", "use_rslora", "rank_pattern", "alpha_pattern",
                "layers_to_transform", "fan_in_fan_out"):
        assert ours[key] == theirs[key], key


@pytest.mark.parametrize("case", list(CASES))
def test_peft_adapter_loads_in_deltatune(case, make_model, output_of, train, tmp_path) -> None:
    kind, options = CASES[case]
    inputs = make_model.inputs(kind)
    config = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **options)
    theirs = peft.get_peft_model(make_model(kind, seed=0), config)
    train(theirs, inputs, steps=2)  # also moves DoRA's magnitude and the classifier head
    theirs.eval()
    expected = output_of(theirs, inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.save_pretrained(tmp_path / "peft")

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        ours = dt.DeltaModel.from_pretrained(make_model(kind, seed=0), tmp_path / "peft")
    assert deltatune_config_warnings(record) == []  # peft's own fields at their defaults are not worth a warning
    torch.testing.assert_close(output_of(ours, inputs), expected, atol=1e-5, rtol=0)
    ours.save_pretrained(tmp_path / "dt")
    assert_same_files(tmp_path / "dt", tmp_path / "peft")


def test_peft_saved_embedding_base_weights_are_accepted(make_model, output_of, tmp_path) -> None:
    """peft stores the whole ``embed_tokens`` weight next to the adapter when it is targeted; loading
    puts it back into the base layer (peft's behaviour) instead of failing on an unknown key."""
    inputs = make_model.inputs("llama_lm")
    config = peft.LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"], init_lora_weights=False)
    theirs = peft.get_peft_model(make_model("llama_lm", seed=0), config).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.save_pretrained(tmp_path / "peft")
    assert any(k.endswith("embed_tokens.base_layer.weight") for k in saved_tensors(tmp_path / "peft"))
    ours = dt.DeltaModel.from_pretrained(make_model("llama_lm", seed=0), tmp_path / "peft")
    torch.testing.assert_close(output_of(ours, inputs), output_of(theirs, inputs), atol=1e-5, rtol=0)
    ours.save_pretrained(tmp_path / "dt")
    assert_same_files(tmp_path / "dt", tmp_path / "peft", allow_extra_base=True)


def test_non_default_adapter_in_subfolder_both_ways(make_model, output_of, tmp_path) -> None:
    kind = "bert_seq_cls"
    inputs = make_model.inputs(kind)
    cfg = {"r": 4, "lora_alpha": 8, "task_type": "SEQ_CLS", "init_lora_weights": False}
    # deltatune -> peft
    model = dt.get_delta_model(make_model(kind), dt.LoraConfig(target_modules=["query"], **cfg))
    model.add_adapter("other", dt.LoraConfig(target_modules=["value", "key"], **cfg))
    model.set_adapter("other")
    with torch.no_grad():
        model.base_model.classifier.modules_to_save["other"].bias.add_(0.5)
    expected = output_of(model.eval(), inputs)
    model.save_pretrained(tmp_path / "dt")
    assert (tmp_path / "dt" / "adapter_config.json").is_file()
    assert (tmp_path / "dt" / "other" / "adapter_model.safetensors").is_file()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(make_model(kind), tmp_path / "dt")
        loaded.load_adapter(str(tmp_path / "dt" / "other"), adapter_name="other")
    loaded.set_adapter("other")
    torch.testing.assert_close(output_of(loaded.eval(), inputs), expected, atol=1e-5, rtol=0)

    # peft -> deltatune: peft writes the non-default adapter into the same kind of subfolder.
    theirs = peft.get_peft_model(make_model(kind), peft.LoraConfig(target_modules=["query"], **cfg))
    theirs.add_adapter("other", peft.LoraConfig(target_modules=["value"], **cfg))
    theirs.set_adapter("other")
    expected = output_of(theirs.eval(), inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.save_pretrained(tmp_path / "peft")
    ours = dt.DeltaModel.from_pretrained(make_model(kind), tmp_path / "peft")
    ours.load_adapter(tmp_path / "peft" / "other", "other")
    ours.set_adapter("other")
    torch.testing.assert_close(output_of(ours, inputs), expected, atol=1e-5, rtol=0)
    ours.save_pretrained(tmp_path / "dt2")
    assert_same_files(tmp_path / "dt2" / "other", tmp_path / "peft" / "other")


@pytest.mark.integration
def test_bundled_minilm_both_ways(output_of, train, tmp_path) -> None:
    from transformers import AutoModelForSequenceClassification

    from deltatune.bundled import bundled_model_path

    path = bundled_model_path("minilm")

    def fresh(seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)  # the classifier head is new (random) at every load
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 5000, (2, 12), generator=gen)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    cfg = {"r": 4, "lora_alpha": 8, "target_modules": ["query", "value"], "task_type": "SEQ_CLS"}

    model = dt.get_delta_model(fresh(1), dt.LoraConfig(**cfg))
    train(model, inputs, steps=2, lr=0.01)
    expected = output_of(model.eval(), inputs)
    model.save_pretrained(tmp_path / "dt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(fresh(2), tmp_path / "dt").eval()
    torch.testing.assert_close(output_of(loaded, inputs), expected, atol=1e-5, rtol=0)
    # The same adapter also loads back into deltatune on a third load (new random head: not a mismatch).
    again = dt.DeltaModel.from_pretrained(fresh(3), tmp_path / "dt")
    torch.testing.assert_close(output_of(again, inputs), expected, atol=1e-5, rtol=0)

    theirs = peft.get_peft_model(fresh(4), peft.LoraConfig(init_lora_weights=False, **cfg)).eval()
    expected = output_of(theirs, inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.save_pretrained(tmp_path / "peft")
    ours = dt.DeltaModel.from_pretrained(fresh(5), tmp_path / "peft")
    torch.testing.assert_close(output_of(ours, inputs), expected, atol=1e-5, rtol=0)
    ours.save_pretrained(tmp_path / "dt2")
    assert_same_files(tmp_path / "dt2", tmp_path / "peft")
