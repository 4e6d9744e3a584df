"""Adapter folders that name their base: HF peft's AutoPeftModel, transformers' AutoModel and
``model.load_adapter`` load them offline without warnings; the README.md model card; clear errors for
folders that hold no adapter or a different one."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import safetensors.torch
import torch

import deltatune as dt
from deltatune.cli import main
from deltatune.integrations.model_card import MARKER, add_training_results

tf = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from _tiny_lm import save_tiny_lm

LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM",
        "init_lora_weights": False}
IDS = torch.tensor([[3, 4, 5, 6, 7, 8]])


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    return save_tiny_lm(tmp_path_factory.mktemp("tiny_lm"))


def saved(base_dir: Path, folder: Path, **overrides) -> tuple[dt.DeltaModel, torch.Tensor]:
    torch.manual_seed(0)
    model = dt.get_delta_model(tf.AutoModelForCausalLM.from_pretrained(base_dir), dt.LoraConfig(**(LORA | overrides)))
    model.save_pretrained(folder)
    with torch.no_grad():
        return model, model(input_ids=IDS).logits


def about_the_adapter(record: list[warnings.WarningMessage]) -> list[str]:
    """Warnings other than transformers' own deprecation notices (raised whatever is loaded)."""
    return [str(w.message) for w in record if "deprecated" not in str(w.message)]


def test_peft_and_transformers_load_the_folder_offline_without_warnings(base_dir, tmp_path) -> None:
    model, expected = saved(base_dir, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base_dir.resolve())
    with torch.no_grad(), model.disable_adapter():
        assert (model(input_ids=IDS).logits - expected).abs().max() > 1e-3  # the adapter changes the output
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        auto_peft = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
        auto = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "adapter")
        plain = tf.AutoModelForCausalLM.from_pretrained(base_dir)
        plain.load_adapter(str(tmp_path / "adapter"))
    assert about_the_adapter(record) == []
    for loaded in (auto_peft, auto, plain):
        with torch.no_grad():
            torch.testing.assert_close(loaded.eval()(input_ids=IDS).logits, expected, atol=1e-5, rtol=0)


def test_model_card_names_base_method_targets_and_share(base_dir, tmp_path) -> None:
    model, _ = saved(base_dir, tmp_path / "adapter")
    card = (tmp_path / "adapter" / "README.md").read_text()
    total = sum(p.numel() for p in tf.AutoModelForCausalLM.from_pretrained(base_dir).parameters())
    trainable = 2 * ((4 * 32 + 32 * 4) + (4 * 32 + 16 * 4))  # 2 layers x (q: 32->32, v: 32->16 with 2 kv heads)
    assert f"base_model: {base_dir.resolve()}" in card and "library_name: peft" in card
    assert f"lora (LORA), task CAUSAL_LM, targets `['q_proj', 'v_proj']`; {trainable:,} trainable of " \
           f"{total + trainable:,} parameters ({100 * trainable / (total + trainable):.3f}%)" in card
    add_training_results(tmp_path / "adapter", {"data": "rt", "train_examples": 8, "steps": 2, "wall_time_s": 1.0,
                                                "final": {"test": {"loss": 1.25, "perplexity": 3.49}}})
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert "on `rt` (8 training examples, 2 optimizer steps" in card and "- test: loss 1.2500, perplexity 3.4900" in card
    model.save_pretrained(tmp_path / "adapter")  # saving again keeps the training results
    assert "- test: loss 1.2500" in (tmp_path / "adapter" / "README.md").read_text()
    (tmp_path / "adapter" / "README.md").write_text("# my own card\n")
    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "README.md").read_text() == "# my own card\n"  # never overwritten
    assert MARKER not in (tmp_path / "adapter" / "README.md").read_text()


def test_folders_without_an_adapter_say_what_to_pass(base_dir, tmp_path) -> None:
    plain = lambda: tf.AutoModelForCausalLM.from_pretrained(base_dir)
    with pytest.raises(dt.CheckpointError, match="does not exist"):
        dt.DeltaModel.from_pretrained(plain(), tmp_path / "nowhere")
    for step in (2, 10):
        saved(base_dir, tmp_path / "run" / f"checkpoint-{step}")
    with pytest.raises(dt.CheckpointError, match=f"Trainer checkpoints \\(checkpoint-2, checkpoint-10\\); pass one of "
                                                 f"them, e.g. {tmp_path / 'run' / 'checkpoint-10'}"):
        dt.DeltaModel.from_pretrained(plain(), tmp_path / "run")
    with pytest.raises(dt.CheckpointError, match=f"No adapter_config.json in {base_dir}. It holds a full model"):
        dt.DeltaModel.from_pretrained(plain(), base_dir)


def test_full_state_dict_from_an_older_trainer_save_loads_with_load_state_dict(base_dir, tmp_path) -> None:
    """What the error for a full-model folder suggests for the old Trainer output (the whole DeltaModel state)."""
    model, expected = saved(base_dir, tmp_path / "adapter")
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "model.safetensors")
    torch.manual_seed(1)
    other = dt.get_delta_model(tf.AutoModelForCausalLM.from_pretrained(base_dir), dt.LoraConfig(**LORA))
    other.load_state_dict(safetensors.torch.load_file(tmp_path / "model.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(other(input_ids=IDS).logits, expected, atol=1e-6, rtol=0)


def test_resuming_from_another_adapters_checkpoint_is_refused_untouched(base_dir, tmp_path) -> None:
    saved(base_dir, tmp_path / "r8", r=8)
    model, expected = saved(base_dir, tmp_path / "r4")
    with pytest.raises(dt.CheckpointError, match=f"{tmp_path / 'r8'} holds a different adapter.*another adapter_name"):
        model.load_adapter(tmp_path / "r8", "default", is_trainable=True)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, expected, atol=0, rtol=0)


def test_cli_names_the_adapter_whose_recorded_base_is_missing(base_dir, tmp_path, capsys) -> None:
    saved(base_dir, tmp_path / "adapter")
    path = tmp_path / "adapter" / "adapter_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"base_model_name_or_path": str(tmp_path / "gone")}))
    assert main(["generate", str(tmp_path / "adapter"), "--prompt", "the cat"]) == 2
    err = capsys.readouterr().err
    assert f"The adapter in {tmp_path / 'adapter'} was trained on '{tmp_path / 'gone'}'" in err and "--model" in err


def test_delta_model_is_what_trainer_and_trl_recognise_as_a_peft_model(base_dir) -> None:
    import copy

    from accelerate.utils import is_peft_model
    from transformers.trainer_utils import _is_peft_model, unwrap_peft_model

    torch.manual_seed(0)
    hf = tf.AutoModelForCausalLM.from_pretrained(base_dir)
    model = dt.get_delta_model(hf, dt.LoraConfig(**LORA))
    assert _is_peft_model(model) and is_peft_model(model) and isinstance(model, dt.DeltaModel)
    assert type(model).__name__ == "DeltaModel" and unwrap_peft_model(model) is hf is model.get_base_model()
    assert model.peft_config["default"].r == 4 and model.active_adapters == ["default"]  # deltatune's own attributes
    twin = copy.deepcopy(model)
    assert isinstance(twin, peft.PeftModel) and twin.get_base_model() is not hf
