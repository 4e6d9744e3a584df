"""AdaLoRA against HF peft (the reference): the same run pruned the same way, and files both ways.

* Replay: peft's AdaLoRA and deltatune's start from the same triplets and train with plain SGD on
  the same batches; peft adds its orthogonality term to the loss and calls ``update_and_allocate``,
  deltatune's step hook adds the term's gradient and prunes. Every step the kept triplets and the
  weights agree.
* A pruned adapter saved by either library loads in the other with the same outputs and re-saves
  exactly the same tensors (kept triplets only) and ``rank_pattern``.
* The schedule runs from deltatune's training loop (through ``step_hooks``) and from a
  ``transformers.Trainer`` with :class:`~deltatune.integrations.trainer_callback.DeltaStepCallback`.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

import deltatune as dt
from deltatune.step_hooks import step_hooks

peft = pytest.importorskip("peft")

KIND = "llama_lm"
OPTIONS = {"init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 2, "deltaT": 1, "total_step": 8,
           "target_modules": ["q_proj", "v_proj", "down_proj"], "lora_alpha": 8, "task_type": "CAUSAL_LM"}


def quietly(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def twins(make_model):
    theirs = quietly(peft.get_peft_model, make_model(KIND), peft.AdaLoraConfig(init_lora_weights=False, **OPTIONS))
    ours = dt.get_delta_model(make_model(KIND), dt.AdaLoraConfig(init_lora_weights=False, **OPTIONS))
    mine = dict(ours.named_parameters())
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if p.requires_grad:
                mine[name.replace("base_model.model.", "base_model.", 1)].copy_(p)
    return theirs, ours


def run_both(theirs, ours, make_model, steps: int) -> None:
    inputs = make_model.inputs(KIND)
    batch = {**inputs, "labels": inputs["input_ids"]}
    opt_t = torch.optim.SGD([p for p in theirs.parameters() if p.requires_grad], lr=0.05)
    opt_o = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.05)
    theirs.train()
    ours.train()
    for step in range(1, steps + 1):
        theirs(**batch).loss.backward()  # peft's forward adds orth_reg_weight * regulariser to the loss
        opt_t.step()
        theirs.base_model.update_and_allocate(step)
        opt_t.zero_grad()
        ours(**batch).loss.backward()
        for hook in step_hooks(ours):
            hook.before_optimizer_step()
        opt_o.step()
        for hook in step_hooks(ours):
            hook.after_optimizer_step(step)
        opt_o.zero_grad()
        their_pattern = {k.removesuffix(".default"): v for k, v in (theirs.peft_config["default"].rank_pattern or {}).items()}
        assert (ours.peft_config["default"].rank_pattern or {}) == their_pattern, step
        mine = dict(ours.named_parameters())
        for name, p in theirs.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(mine[name.replace("base_model.model.", "base_model.", 1)], p,
                                           atol=1e-5, rtol=1e-4, msg=f"{name} at step {step}")
    theirs.eval()
    ours.eval()


def test_pruning_replays_peft_step_by_step(make_model, output_of) -> None:
    theirs, ours = twins(make_model)
    run_both(theirs, ours, make_model, steps=8)
    pattern = ours.peft_config["default"].rank_pattern
    assert sum(sum(v) for v in pattern.values()) <= 2 * len(pattern) < 4 * len(pattern)  # pruned to the budget
    inputs = make_model.inputs(KIND)
    torch.testing.assert_close(output_of(ours, inputs), output_of(theirs, inputs), atol=1e-5, rtol=0)
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj
    dropped = ~torch.tensor(pattern["model.layers.0.self_attn.q_proj.lora_E"])
    assert torch.all(layer.lora_E["default"][dropped] == 0)


def test_pruned_files_both_ways(make_model, output_of, tmp_path) -> None:
    theirs, ours = twins(make_model)
    run_both(theirs, ours, make_model, steps=7)
    inputs = make_model.inputs(KIND)
    quietly(theirs.save_pretrained, tmp_path / "peft")
    ours.save_pretrained(tmp_path / "dt")
    a, b = load_file(tmp_path / "dt" / "adapter_model.safetensors"), load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
    assert any(v.shape[0] < 4 for k, v in a.items() if k.endswith("lora_E"))  # only the kept triplets are saved
    ours_cfg = json.loads((tmp_path / "dt" / "adapter_config.json").read_text())
    theirs_cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert ours_cfg["rank_pattern"] == theirs_cfg["rank_pattern"]
    # peft's file -> deltatune, and deltatune's file -> peft
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        loaded = dt.DeltaModel.from_pretrained(make_model(KIND), tmp_path / "peft")
    assert not [w for w in record if "ignoring fields" in str(w.message)]
    torch.testing.assert_close(output_of(loaded, inputs), output_of(theirs, inputs), atol=1e-5, rtol=0)
    loaded.save_pretrained(tmp_path / "dt2")
    again = load_file(tmp_path / "dt2" / "adapter_model.safetensors")
    assert again.keys() == b.keys() and all(torch.equal(again[k], b[k]) for k in b)
    peft_loaded = quietly(peft.PeftModel.from_pretrained, make_model(KIND), str(tmp_path / "dt")).eval()
    torch.testing.assert_close(output_of(peft_loaded, inputs), output_of(ours, inputs), atol=1e-5, rtol=0)


def test_merge_equals_formula(make_model, output_of) -> None:
    model = dt.get_delta_model(make_model(KIND), dt.AdaLoraConfig(init_lora_weights=False, **OPTIONS))
    layer = model.base_model.model.model.layers[1].self_attn.v_proj
    a, e, b = (layer.lora_A["default"].detach(), layer.lora_E["default"].detach(), layer.lora_B["default"].detach())
    expected_delta = b @ (a * e) * 8 / (4 + 1e-5)
    torch.testing.assert_close(layer.delta_weight("default"), expected_delta)
    inputs = make_model.inputs(KIND)
    expected = output_of(model, inputs)
    model.merge_adapter()
    torch.testing.assert_close(output_of(model, inputs), expected, atol=1e-5, rtol=0)


def test_trainer_callback_prunes(make_model, tmp_path) -> None:
    from transformers import Trainer, TrainingArguments

    from deltatune.integrations.trainer_callback import DeltaStepCallback

    options = {k: v for k, v in OPTIONS.items() if k != "total_step"}  # the Trainer's max_steps fills it
    model = dt.get_delta_model(make_model(KIND), dt.AdaLoraConfig(**options))
    ids = make_model.inputs(KIND, batch=8)["input_ids"]
    data = [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row} for row in ids]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4, learning_rate=0.05,
                             report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True,
                             dataloader_num_workers=0, remove_unused_columns=False)
    quietly(Trainer(model=model, args=args, train_dataset=data, callbacks=[DeltaStepCallback()]).train)
    config = model.peft_config["default"]
    assert config.total_step == 6
    kept = [sum(v) for v in config.rank_pattern.values()]
    assert sum(kept) <= 2 * len(kept)


def test_schedule_needs_a_pruning_phase() -> None:
    with pytest.raises(dt.ConfigError, match="tinit"):
        dt.AdaLoraConfig(tinit=5, tfinal=5, total_step=10)


def test_deltatune_training_loop_runs_the_schedule(tmp_path) -> None:
    """``deltatune train --method adalora``: the loop gives the hook its step count and the saved adapter
    holds the pruned ranks (the budget ends at target_r per layer)."""
    from _train_tiny import save_tiny, write_classification

    from deltatune.train.loop import train
    from deltatune.train.options import TrainOptions

    model, data = save_tiny("bert", tmp_path / "bert"), write_classification(tmp_path / "cls.jsonl", 40)
    options = TrainOptions(model=str(model), data=str(data), output_dir=str(tmp_path / "out"), quiet=True, threads=1,
                           batch_size=8, max_steps=5, lr=1e-2, method="adalora",
                           method_options={"init_r": 4, "target_r": 1, "tinit": 1, "target_modules": ["query", "value"]})
    train(options)
    saved = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert saved["total_step"] == 5
    kept = [sum(v) for v in saved["rank_pattern"].values()]
    assert len(kept) == 4 and sum(kept) <= 4
    tensors = load_file(tmp_path / "out" / "adapter" / "adapter_model.safetensors")
    assert sum(v.shape[0] for k, v in tensors.items() if k.endswith("lora_E")) == sum(kept)
