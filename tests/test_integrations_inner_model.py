"""Passing the model *inside* a DeltaModel (adapters injected) to transformers' Trainer or TRL's SFTTrainer.

The Trainer saves such a model with its own ``save_pretrained``; while adapters are injected that writes
the adapter folder (:mod:`deltatune.integrations.adapter_saving`), never a full checkpoint whose
``q_proj.weight`` is missing. Each test trains for real, saves with ``trainer.save_model`` and rebuilds the
trained model from the folder three ways: deltatune, peft's ``AutoPeftModelForCausalLM`` and
``AutoModelForCausalLM`` (transformers' adapter loading), all offline from the local base folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import deltatune as dt

tf = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
from _tiny_lm import TEXTS, save_tiny_lm

LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM"}
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors", "README.md"}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    return save_tiny_lm(tmp_path_factory.mktemp("tiny_lm"))


def injected(base_dir: Path) -> tuple[dt.DeltaModel, torch.nn.Module]:
    torch.manual_seed(0)
    inner = tf.AutoModelForCausalLM.from_pretrained(base_dir)
    return dt.get_delta_model(inner, dt.LoraConfig(**LORA)), inner


def check_reloads(inner: torch.nn.Module, before: torch.Tensor, base_dir: Path, folder: Path) -> None:
    """``folder`` holds the adapter only, and every loader rebuilds ``inner``'s outputs from it."""
    names = {p.name for p in folder.iterdir()}
    assert ADAPTER_FILES <= names and not names & {"model.safetensors", "config.json", "pytorch_model.bin"}
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base_dir.resolve())
    ids = torch.tensor([[3, 5, 6, 7, 8, 3, 9]])
    inner.eval()
    with torch.no_grad():
        expected = inner(input_ids=ids).logits
        assert (expected - before).abs().max() > 1e-4  # training changed the model
        ours = dt.DeltaModel.from_pretrained(tf.AutoModelForCausalLM.from_pretrained(base_dir), folder)
        torch.testing.assert_close(ours(input_ids=ids).logits, expected, atol=1e-5, rtol=0)
        from peft import AutoPeftModelForCausalLM

        theirs = AutoPeftModelForCausalLM.from_pretrained(folder).eval()
        torch.testing.assert_close(theirs(input_ids=ids).logits, expected, atol=1e-5, rtol=0)
        plain = tf.AutoModelForCausalLM.from_pretrained(folder).eval()  # base + adapter via transformers' peft API
        torch.testing.assert_close(plain(input_ids=ids).logits, expected, atol=1e-5, rtol=0)


def logits_of(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([[3, 5, 6, 7, 8, 3, 9]])).logits


def test_trainer_given_the_inner_model_saves_the_adapter(base_dir, tmp_path) -> None:
    _, inner = injected(base_dir)
    before = logits_of(inner)
    tokenizer = tf.AutoTokenizer.from_pretrained(base_dir)
    data = datasets.Dataset.from_dict({"text": TEXTS * 2}).map(lambda b: tokenizer(b["text"]), batched=True)
    args = tf.TrainingArguments(str(tmp_path / "run"), max_steps=3, per_device_train_batch_size=4, report_to=[],
                                use_cpu=True, save_steps=3, learning_rate=1e-2)
    trainer = tf.Trainer(model=inner, args=args, train_dataset=data, processing_class=tokenizer,
                         data_collator=tf.DataCollatorForLanguageModeling(tokenizer, mlm=False))
    trainer.train()
    assert not {p.name for p in (tmp_path / "run" / "checkpoint-3").iterdir()} & {"model.safetensors", "config.json"}
    trainer.save_model(str(tmp_path / "final"))
    check_reloads(inner, before, base_dir, tmp_path / "final")


def test_sft_trainer_given_the_inner_model_saves_the_adapter(base_dir, tmp_path) -> None:
    trl = pytest.importorskip("trl")
    _, inner = injected(base_dir)
    before = logits_of(inner)
    args = trl.SFTConfig(str(tmp_path / "sft"), max_steps=3, per_device_train_batch_size=4, report_to=[],
                         use_cpu=True, save_strategy="no", learning_rate=1e-2,
                         bf16=False)  # (SFTConfig's default bf16 would leave inner's forward under autocast)
    trainer = trl.SFTTrainer(model=inner, args=args, train_dataset=datasets.Dataset.from_dict({"text": TEXTS}),
                             processing_class=tf.AutoTokenizer.from_pretrained(base_dir))
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    check_reloads(inner, before, base_dir, tmp_path / "final")


def test_the_inner_model_saves_in_full_again_once_unloaded(base_dir, tmp_path) -> None:
    delta, inner = injected(base_dir)
    with torch.no_grad():
        for name, p in delta.named_parameters():
            if "lora_B" in name:
                p.normal_()  # a non-zero adapter, merged below
    expected = logits_of(inner)
    merged = delta.merge_and_unload()
    assert merged is inner and type(inner) is tf.LlamaForCausalLM
    inner.save_pretrained(tmp_path / "full")
    reloaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "full")
    torch.testing.assert_close(logits_of(reloaded), expected, atol=1e-5, rtol=0)


def test_unsupported_save_arguments_fail_before_writing(base_dir, tmp_path) -> None:
    _, inner = injected(base_dir)
    with pytest.raises(dt.ConfigError, match="push_to_hub"):
        inner.save_pretrained(tmp_path / "out", push_to_hub=True)
    assert not (tmp_path / "out").exists()
