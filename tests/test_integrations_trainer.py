"""transformers' Trainer and TRL's SFT/DPO trainers train a DeltaModel with their default arguments.

Each test runs the real trainer on a tiny Llama saved as a local folder (``_tiny_lm``). What is checked:
the dataset columns the model's forward takes survive ``remove_unused_columns``; every ``checkpoint-N/``
and ``save_model`` folder holds the adapter in peft's format (no full state dict); resuming reproduces an
uninterrupted run; the trainer's loss is the adapter model's own loss; gradient checkpointing gives the
same update as no checkpointing.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch

import deltatune as dt

tf = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
from _tiny_lm import TEXTS, save_tiny_lm

LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM"}
TRAINER_FILES = {"adapter_config.json", "adapter_model.safetensors", "README.md", "tokenizer.json",
                 "tokenizer_config.json", "training_args.bin"}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    return save_tiny_lm(tmp_path_factory.mktemp("tiny_lm"))


def delta_model(base_dir: Path, seed: int = 0, **overrides) -> dt.DeltaModel:
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_pretrained(base_dir)
    return dt.get_delta_model(model, dt.LoraConfig(**(LORA | overrides)))


def adapter_tensors(model: dt.DeltaModel) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def tokenized(base_dir: Path):
    tokenizer = tf.AutoTokenizer.from_pretrained(base_dir)
    # "text" is not an argument of forward: the Trainer's default remove_unused_columns must drop it and keep the rest.
    data = datasets.Dataset.from_dict({"text": TEXTS * 4}).map(lambda b: tokenizer(b["text"]), batched=True)
    return tokenizer, data


def trainer_for(model, base_dir: Path, out: Path, **args) -> tf.Trainer:
    tokenizer, data = tokenized(base_dir)
    settings = {"per_device_train_batch_size": 4, "report_to": [], "use_cpu": True, "max_steps": 4,
                "save_steps": 2, "logging_steps": 1, "seed": 0} | args
    evaluate = settings.get("eval_strategy", "no") != "no"
    return tf.Trainer(model=model, args=tf.TrainingArguments(str(out), **settings), train_dataset=data,
                      eval_dataset=data if evaluate else None, processing_class=tokenizer,
                      data_collator=tf.DataCollatorForLanguageModeling(tokenizer, mlm=False))


def test_trainer_checkpoints_hold_the_adapter_and_resume(base_dir, tmp_path) -> None:
    model = delta_model(base_dir)
    start = adapter_tensors(model)
    trainer = trainer_for(model, base_dir, tmp_path / "run")
    trainer.train()
    final = adapter_tensors(model)
    assert all(not torch.equal(start[k], final[k]) for k in start)  # every adapter tensor trained
    for folder in (tmp_path / "run" / "checkpoint-2", tmp_path / "run" / "checkpoint-4"):
        names = {p.name for p in folder.iterdir()}
        assert TRAINER_FILES <= names and not names & {"model.safetensors", "pytorch_model.bin", "config.json"}
        assert {"optimizer.pt", "scheduler.pt", "trainer_state.json", "rng_state.pth"} <= names
    trainer.save_model(str(tmp_path / "final"))
    assert {p.name for p in (tmp_path / "final").iterdir()} == TRAINER_FILES
    saved = safetensors.torch.load_file(tmp_path / "final" / "adapter_model.safetensors")
    assert len(saved) == len(final) == 8  # 2 layers x (q, v) x (A, B), nothing of the base
    loaded = dt.DeltaModel.from_pretrained(tf.AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "final")
    for key, value in adapter_tensors_all(loaded).items():
        torch.testing.assert_close(value, final[key], atol=0, rtol=0)

    # A fresh model (other init) resumed from checkpoint-2 ends where the uninterrupted run ended.
    resumed = delta_model(base_dir, seed=1)
    trainer_for(resumed, base_dir, tmp_path / "run").train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    for key, value in adapter_tensors(resumed).items():
        torch.testing.assert_close(value, final[key], atol=1e-6, rtol=0)


def adapter_tensors_all(model: dt.DeltaModel) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if "lora_" in n}


def test_gradient_checkpointing_and_accumulation_match_plain_steps(base_dir, tmp_path) -> None:
    results = []
    for checkpointing in (False, True):
        model = delta_model(base_dir, init_lora_weights=False)
        trainer_for(model, base_dir, tmp_path / str(checkpointing), max_steps=2, save_strategy="no",
                    gradient_checkpointing=checkpointing, gradient_accumulation_steps=2,
                    per_device_train_batch_size=2).train()
        assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules()) == checkpointing
        results.append(adapter_tensors(model))
    for key in results[0]:
        torch.testing.assert_close(results[1][key], results[0][key], atol=1e-6, rtol=0)


def test_bf16_autocast_trains(base_dir, tmp_path) -> None:
    fp32 = trainer_for(delta_model(base_dir), base_dir, tmp_path / "fp32", max_steps=1, save_strategy="no")
    fp32.train()
    model = delta_model(base_dir)
    start = adapter_tensors(model)
    trainer = trainer_for(model, base_dir, tmp_path, max_steps=2, save_strategy="no", bf16=True)
    trainer.train()
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in trainer.state.log_history if "loss" in h)
    first, reference = trainer.state.log_history[0]["loss"], fp32.state.log_history[0]["loss"]
    assert first != reference and abs(first - reference) < 0.05  # computed in bf16: close to fp32, not equal
    assert all(not torch.equal(start[k], v) for k, v in adapter_tensors(model).items())
    assert all(v.dtype == torch.float32 for v in adapter_tensors(model).values())  # autocast, fp32 master weights


def test_trl_sft_trainer_loss_is_the_adapter_models_loss(base_dir, tmp_path) -> None:
    trl = pytest.importorskip("trl")
    model = delta_model(base_dir, init_lora_weights=False)  # non-zero adapter: it changes the loss
    tokenizer = tf.AutoTokenizer.from_pretrained(base_dir)
    ids = tokenizer(TEXTS[0] + tokenizer.eos_token, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = model(input_ids=ids, labels=ids).loss.item()
        with model.disable_adapter():
            base_only = model(input_ids=ids, labels=ids).loss.item()
    assert abs(expected - base_only) > 1e-3
    args = trl.SFTConfig(str(tmp_path / "sft"), max_steps=2, per_device_train_batch_size=4, report_to=[], use_cpu=True,
                         logging_steps=1, save_steps=1)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_dict({"text": [TEXTS[0]] * 4}),
                             processing_class=tokenizer)
    trainer.train()
    first = trainer.state.log_history[0]["loss"]
    assert abs(first - expected) < 1e-3, (first, expected, base_only)
    names = {p.name for p in (tmp_path / "sft" / "checkpoint-1").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= names and "model.safetensors" not in names
    trainer.save_model(str(tmp_path / "sft_final"))
    assert {p.name for p in (tmp_path / "sft_final").iterdir()} == TRAINER_FILES


def test_trl_sft_trainer_with_gradient_checkpointing(base_dir, tmp_path) -> None:
    trl = pytest.importorskip("trl")
    model = delta_model(base_dir)
    start = adapter_tensors(model)
    args = trl.SFTConfig(str(tmp_path), max_steps=2, per_device_train_batch_size=2, report_to=[], use_cpu=True,
                         gradient_checkpointing=True, gradient_accumulation_steps=2, save_strategy="no")
    trl.SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_dict({"text": TEXTS * 2}),
                   processing_class=tf.AutoTokenizer.from_pretrained(base_dir)).train()
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    assert all(not torch.equal(start[k], v) for k, v in adapter_tensors(model).items())


def test_trl_dpo_trainer(base_dir, tmp_path) -> None:
    trl = pytest.importorskip("trl")
    model = delta_model(base_dir)
    start = adapter_tensors(model)
    data = datasets.Dataset.from_dict({"prompt": ["the cat", "a dog"] * 2, "chosen": [" sat on the mat", " ran to the park"] * 2,
                                       "rejected": [" red blue", " big small"] * 2})
    args = trl.DPOConfig(str(tmp_path / "dpo"), max_steps=2, per_device_train_batch_size=4, report_to=[], use_cpu=True,
                         logging_steps=1, learning_rate=1e-2, save_strategy="no")
    trainer = trl.DPOTrainer(model=model, args=args, train_dataset=data,
                             processing_class=tf.AutoTokenizer.from_pretrained(base_dir))
    trainer.train()
    history = [h for h in trainer.state.log_history if "rewards/margins" in h]
    assert history[0]["rewards/margins"] == 0.0  # the reference ("ref", a frozen copy) equals the policy at step 1
    assert history[1]["rewards/margins"] > 0.0  # after one update the policy prefers the chosen answers
    trained = adapter_tensors(model)
    assert all(not torch.equal(start[k], trained[k]) for k in start if ".default." in k)
    trainer.save_model(str(tmp_path / "dpo_final"))
    config = json.loads((tmp_path / "dpo_final" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4


@pytest.mark.integration
def test_smollm2_sft_then_auto_peft_model_and_gguf(tmp_path) -> None:
    """The bundled SmolLM2: two SFT steps, the saved adapter names the local export as its base,
    AutoPeftModelForCausalLM rebuilds the trained model from the folder alone, and it exports to GGUF."""
    trl = pytest.importorskip("trl")
    from peft import AutoPeftModelForCausalLM

    from deltatune.bundled import resolve_model_path
    from deltatune.integrations.gguf_lora import export_gguf_lora

    path = resolve_model_path("smollm2")
    tokenizer = tf.AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    model = dt.get_delta_model(tf.AutoModelForCausalLM.from_pretrained(path),
                               dt.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                             layers_to_transform=[0, 1], task_type="CAUSAL_LM"))
    args = trl.SFTConfig(str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=2, max_length=16,
                         report_to=[], use_cpu=True, save_strategy="no", learning_rate=1e-2)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_dict({"text": TEXTS}),
                             processing_class=tokenizer)
    trainer.train()
    trainer.save_model(str(tmp_path / "adapter"))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(Path(path).resolve())
    saved = safetensors.torch.load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    trained = {k.replace(".default.", ".").replace("base_model.", "base_model.model.", 1): v
               for k, v in adapter_tensors(model).items()}
    assert saved.keys() == trained.keys() and all(torch.equal(saved[k], trained[k]) for k in saved)
    # (The trained DeltaModel itself now computes under the Trainer's bf16 autocast: accelerate wraps its
    # forward, as it does a PeftModel's. The reference is the adapter rebuilt by deltatune in fp32.)
    ids = tokenizer("the cat sat", return_tensors="pt")["input_ids"]
    reference = dt.DeltaModel.from_pretrained(tf.AutoModelForCausalLM.from_pretrained(path), tmp_path / "adapter")
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
        with reference.disable_adapter():
            assert (reference(input_ids=ids).logits - expected).abs().max() > 1e-4  # two steps changed the model
        loaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter").eval()
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, atol=1e-4, rtol=0)
    export_gguf_lora(tmp_path / "adapter", tmp_path / "adapter.gguf")
    import gguf

    names = {t.name for t in gguf.GGUFReader(tmp_path / "adapter.gguf").tensors}
    assert names == {f"blk.{i}.attn_{m}.weight.lora_{ab}" for i in (0, 1) for m in "qv" for ab in "ab"}


def test_resuming_from_another_adapters_checkpoint_fails_before_training(base_dir, tmp_path) -> None:
    """A checkpoint of another adapter (here rank 8 for a rank-4 model): a clear error naming the folder."""
    trainer_for(delta_model(base_dir, r=8), base_dir, tmp_path / "r8", max_steps=2).train()
    model = delta_model(base_dir)
    before = adapter_tensors(model)
    with pytest.raises(dt.CheckpointError, match=f"{tmp_path / 'r8' / 'checkpoint-2'} holds a different adapter"):
        trainer_for(model, base_dir, tmp_path / "r4", max_steps=2).train(
            resume_from_checkpoint=str(tmp_path / "r8" / "checkpoint-2"))
    assert all(torch.equal(before[k], v) for k, v in adapter_tensors(model).items())  # nothing half-loaded


@pytest.mark.parametrize("method", ["prompt_tuning", "ia3"])
def test_input_and_other_layer_methods_train_with_trainer_and_sft(base_dir, tmp_path, method) -> None:
    trl = pytest.importorskip("trl")
    config = {"prompt_tuning": dt.PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"),
              "ia3": dt.IA3Config(task_type="CAUSAL_LM")}[method]
    for which in ("trainer", "sft"):
        torch.manual_seed(0)
        model = dt.get_delta_model(tf.AutoModelForCausalLM.from_pretrained(base_dir), config)
        start = adapter_tensors(model)
        if which == "trainer":
            trainer = trainer_for(model, base_dir, tmp_path / which, max_steps=2, save_strategy="no", learning_rate=1e-2)
        else:
            args = trl.SFTConfig(str(tmp_path / which), max_steps=2, per_device_train_batch_size=4, report_to=[],
                                 use_cpu=True, save_strategy="no", learning_rate=1e-2)
            trainer = trl.SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_dict({"text": TEXTS}),
                                     processing_class=tf.AutoTokenizer.from_pretrained(base_dir))
        trainer.train()
        assert all(not torch.equal(start[k], v) for k, v in adapter_tensors(model).items())
        trainer.save_model(str(tmp_path / f"{which}_final"))
        assert {p.name for p in (tmp_path / f"{which}_final").iterdir()} == TRAINER_FILES


def test_load_best_model_at_end_loads_the_best_checkpoints_adapter(base_dir, tmp_path) -> None:
    model = delta_model(base_dir)
    trainer = trainer_for(model, base_dir, tmp_path, max_steps=4, eval_strategy="steps", eval_steps=2,
                          load_best_model_at_end=True, metric_for_best_model="loss", greater_is_better=True,
                          learning_rate=1e-2)  # "best" = highest loss: step 2, not the last step
    trainer.train()
    best = Path(trainer.state.best_model_checkpoint)
    assert best.name == "checkpoint-2"
    last = safetensors.torch.load_file(tmp_path / "checkpoint-4" / "adapter_model.safetensors")
    saved = safetensors.torch.load_file(best / "adapter_model.safetensors")
    live = {k.replace(".default.", ".").replace("base_model.", "base_model.model.", 1): v
            for k, v in adapter_tensors_all(model).items()}
    assert saved.keys() == live.keys() and all(torch.equal(saved[k], live[k]) for k in saved)
    assert not all(torch.equal(last[k], live[k]) for k in saved)  # the best, not the last, is loaded
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)  # still trainable


def test_trainer_trains_a_classifier_and_saves_its_head_with_the_adapter(make_model, tmp_path) -> None:
    """Sequence classification: the ``label`` column reaches the model, the head trains and is saved."""
    model = dt.get_delta_model(make_model("bert_seq_cls"), dt.LoraConfig(r=4, target_modules=["query", "value"],
                                                                         task_type="SEQ_CLS"))
    start = adapter_tensors(model)
    ids = torch.randint(1, 100, (16, 8), generator=torch.Generator().manual_seed(0))
    data = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * 8] * 16,
                                       "label": [i % 3 for i in range(16)], "note": ["unused"] * 16})
    args = tf.TrainingArguments(str(tmp_path), max_steps=2, per_device_train_batch_size=8, report_to=[], use_cpu=True,
                                save_strategy="no", learning_rate=1e-2)
    trainer = tf.Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    assert all(not torch.equal(start[k], v) for k, v in adapter_tensors(model).items())
    assert any(".classifier." in k for k in start)
    trainer.save_model(str(tmp_path / "final"))
    saved = safetensors.torch.load_file(tmp_path / "final" / "adapter_model.safetensors")
    assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= set(saved)
