"""peft's user-facing names on a DeltaModel behave as in HF peft (the reference, run on the same tiny Llama):
TaskType, disable/enable_adapter_layers, set_requires_grad, get_model_status/get_layer_status,
get/set_peft_model_state_dict, config from_pretrained/save_pretrained, merge_and_unload(progressbar=...),
save_pretrained(save_embedding_layers=...), prepare_model_for_kbit_training and the PeftModel/PeftConfig aliases."""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch
import transformers as tf
from safetensors.torch import load_file

import deltatune as dt

IDS = torch.tensor([[3, 7, 1, 9, 4, 2], [5, 5, 8, 1, 0, 6]])


def tiny(seed: int = 0) -> tf.LlamaForCausalLM:
    torch.manual_seed(seed)
    config = tf.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    return tf.LlamaForCausalLM(config).eval()


def pair(tmp_path: Path, **lora: object) -> tuple[peft.PeftModel, dt.DeltaModel]:
    """A peft model with non-zero random LoRA weights and the deltatune model loaded from its files."""
    config = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False} | lora
    torch.manual_seed(1)
    ref = peft.get_peft_model(tiny(), peft.LoraConfig(**config))
    ref.save_pretrained(tmp_path / "ref")
    ours = dt.DeltaModel.from_pretrained(tiny(), tmp_path / "ref", is_trainable=True)
    ref.train(), ours.train()
    return ref, ours


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_task_type_enum_is_stored_as_peft_s_string(tmp_path: Path) -> None:
    assert [t.value for t in dt.TaskType] == [t.value for t in peft.TaskType if t.value in dt.config.TASK_TYPES]
    for enum_value in (dt.TaskType.CAUSAL_LM, peft.TaskType.CAUSAL_LM):
        config = dt.LoraConfig(r=2, target_modules=["q_proj"], task_type=enum_value)
        assert type(config.task_type) is str and config.task_type == "CAUSAL_LM"
    dt.get_peft_model(tiny(), config).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    assert peft.PeftConfig.from_pretrained(str(tmp_path)).task_type == peft.TaskType.CAUSAL_LM


def test_disable_and_enable_adapter_layers_match_peft(tmp_path: Path) -> None:
    ref, ours = pair(tmp_path)
    base, adapted = logits(tiny()), logits(ref)
    assert (adapted - base).abs().max() > 1e-3  # the adapter changes the output
    torch.testing.assert_close(logits(ours), adapted, atol=1e-5, rtol=0)
    for model in (ref, ours):
        model.merge_adapter()
        model.disable_adapter_layers()
    torch.testing.assert_close(logits(ours), base, atol=1e-5, rtol=0)  # merged weights come out again
    torch.testing.assert_close(logits(ref), base, atol=1e-5, rtol=0)
    assert trainable(ours) == trainable(ref) == 0  # peft freezes the adapters while they are off
    for model in (ref, ours):
        model.enable_adapter_layers()
    torch.testing.assert_close(logits(ours), adapted, atol=1e-5, rtol=0)
    assert trainable(ours) == trainable(ref) > 0


def test_set_requires_grad_and_model_status_match_peft(tmp_path: Path) -> None:
    ref, ours = pair(tmp_path)
    for model, lib in ((ref, peft), (ours, dt)):
        model.add_adapter("b", lib.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    fields = ["peft_types", "trainable_params", "total_params", "num_adapter_layers", "enabled", "active_adapters",
              "merged_adapters", "requires_grad", "available_adapters"]

    def same_status() -> None:
        theirs, mine = ref.get_model_status(), ours.get_model_status()
        assert {f: getattr(mine, f) for f in fields} == {f: getattr(theirs, f) for f in fields}

    same_status()
    for model in (ref, ours):
        model.set_requires_grad("b")
    assert trainable(ours) == trainable(ref) and ours.active_adapters == ["default"]
    same_status()
    for model in (ref, ours):
        model.set_requires_grad(["default", "b"], requires_grad=False)
    assert trainable(ours) == trainable(ref) == 0
    for model in (ref, ours):
        model.set_requires_grad("default")
        model.merge_adapter()
    same_status()
    theirs = {s.name.removeprefix("model."): (s.active_adapters, s.merged_adapters, s.requires_grad, s.available_adapters)
              for s in ref.get_layer_status()}
    mine = {s.name: (s.active_adapters, s.merged_adapters, s.requires_grad, s.available_adapters)
            for s in ours.get_layer_status()}
    assert mine == theirs
    assert ours.peft_type == ref.peft_type == "LORA" and ours.active_peft_config is ours.peft_config["default"]
    with pytest.raises(dt.AdapterNotFoundError, match="nope"):
        ours.set_requires_grad("nope")


def test_peft_model_state_dict_both_ways(tmp_path: Path) -> None:
    ref, ours = pair(tmp_path, lora_dropout=0.0)
    theirs = peft.get_peft_model_state_dict(ref)
    mine = dt.get_peft_model_state_dict(ours)
    assert sorted(mine) == sorted(theirs)
    for key in theirs:
        torch.testing.assert_close(mine[key], theirs[key], atol=0, rtol=0)
    fresh = dt.get_peft_model(tiny(), dt.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    assert (logits(fresh) - logits(ref)).abs().max() > 1e-3
    result = dt.set_peft_model_state_dict(fresh, theirs)
    assert result.missing_keys == [] and result.unexpected_keys == []
    torch.testing.assert_close(logits(fresh), logits(ref), atol=1e-5, rtol=0)
    before = logits(fresh)
    bad = {k: (v[:2] if "lora_A" in k else v) for k, v in theirs.items()}
    with pytest.raises(dt.CheckpointError, match="shape"):
        dt.set_peft_model_state_dict(fresh, bad)
    torch.testing.assert_close(logits(fresh), before, atol=0, rtol=0)  # nothing was copied


def test_config_from_pretrained_and_save_pretrained(tmp_path: Path) -> None:
    peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2},
                    task_type="CAUSAL_LM").save_pretrained(str(tmp_path / "a"))
    for cls in (dt.LoraConfig, dt.DeltaConfig, dt.PeftConfig):
        config = cls.from_pretrained(tmp_path / "a")
        assert type(config) is dt.LoraConfig
        assert (config.r, config.lora_alpha, sorted(config.target_modules), config.rank_pattern, config.task_type) == (
            4, 8, ["q_proj", "v_proj"], {"v_proj": 2}, "CAUSAL_LM")
    with pytest.raises(dt.ConfigError, match="holds a LORA adapter, not a IA3Config"):
        dt.IA3Config.from_pretrained(tmp_path / "a")
    dt.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]).save_pretrained(tmp_path / "b")
    back = peft.PeftConfig.from_pretrained(str(tmp_path / "b"))
    assert isinstance(back, peft.IA3Config) and sorted(back.feedforward_modules) == ["down_proj"]
    assert dt.DeltaConfig.from_pretrained(tmp_path, subfolder="b").feedforward_modules == ["down_proj"]


def test_merge_and_unload_progressbar_and_save_embedding_layers(tmp_path: Path) -> None:
    ref, ours = pair(tmp_path)
    ours.save_pretrained(tmp_path / "auto", save_embedding_layers="auto")
    ours.save_pretrained(tmp_path / "off", save_embedding_layers=False)
    auto, off = (load_file(tmp_path / name / "adapter_model.safetensors") for name in ("auto", "off"))
    assert sorted(auto) == sorted(off) == sorted(peft.get_peft_model_state_dict(ref))  # adapter tensors only
    with pytest.raises(dt.ConfigError, match="save_embedding_layers"):
        ours.save_pretrained(tmp_path / "on", save_embedding_layers=True)
    assert not (tmp_path / "on").exists()
    expected = logits(ref.merge_and_unload(progressbar=True))
    torch.testing.assert_close(logits(ours.merge_and_unload(progressbar=True)), expected, atol=1e-5, rtol=0)


def test_aliases_and_prepare_model_for_kbit_training(tmp_path: Path) -> None:
    ref, _ = pair(tmp_path)
    assert dt.PeftModel is dt.DeltaModel and dt.PeftConfig is dt.DeltaConfig
    loaded = dt.PeftModel.from_pretrained(tiny(), tmp_path / "ref")
    torch.testing.assert_close(logits(loaded), logits(ref), atol=1e-5, rtol=0)
    theirs, mine = peft.prepare_model_for_kbit_training(tiny()), dt.prepare_model_for_kbit_training(tiny())
    assert not mine.is_gradient_checkpointing and not theirs.is_gradient_checkpointing  # float: peft leaves it off
    assert trainable(mine) == trainable(theirs) == 0
    quantized = dt.prepare_model_for_kbit_training(dt.quantize(tiny(), "int8"))
    assert quantized.is_gradient_checkpointing  # quantized: on by default, as in peft


@pytest.mark.parametrize("config", [
    peft.LoraConfig(r=4, target_modules=["q_proj"], task_type=peft.TaskType.CAUSAL_LM),
    peft.LoraConfig(target_modules="all-linear", use_dora=True, rank_pattern={"v_proj": 2}),
    peft.IA3Config(task_type="CAUSAL_LM"),
    peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
    peft.LoHaConfig(target_modules=["q_proj"]),
], ids=lambda c: type(c).__name__)
def test_a_peft_config_object_builds_the_same_adapter(config: peft.PeftConfig, recwarn: pytest.WarningsRecorder) -> None:
    ours, theirs = dt.get_peft_model(tiny(), config), peft.get_peft_model(tiny(), config)
    assert not [w for w in recwarn if "deltatune version does not know" in str(w.message)]
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    mine, reference = dt.get_peft_model_state_dict(ours), peft.get_peft_model_state_dict(theirs)
    assert {k: v.shape for k, v in mine.items()} == {k: v.shape for k, v in reference.items()}
    assert type(ours.peft_config["default"]).__name__ == type(config).__name__
    assert ours.peft_config["default"].task_type == getattr(config.task_type, "value", config.task_type)


def test_a_peft_config_with_options_deltatune_lacks_warns_and_other_objects_are_refused() -> None:
    with pytest.warns(UserWarning, match="lora_bias"):
        dt.get_peft_model(tiny(), peft.LoraConfig(r=2, target_modules=["q_proj"], lora_bias=True))
    with pytest.raises(dt.ConfigError, match="dict is not an adapter config"):
        dt.get_peft_model(tiny(), {"r": 4})


def test_wrapping_an_adapted_model_again_is_refused_and_changes_nothing() -> None:
    """peft only warns on a second get_peft_model; nested adapters are refused here, naming the way out."""
    model = dt.get_peft_model(tiny(), dt.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    inner, before = model.get_base_model(), logits(model)
    for target in (model, inner):
        with pytest.raises(dt.ConfigError, match="add_adapter"):
            dt.get_peft_model(target, dt.LoraConfig(r=4, target_modules=["v_proj"]))
    assert model.get_nb_trainable_parameters()[0] == 2 * (4 * 32 + 32 * 4)  # q_proj's A and B in two layers
    torch.testing.assert_close(logits(model), before, atol=0, rtol=0)
    plain = model.unload()
    assert dt.get_peft_model(plain, dt.LoraConfig(r=4, target_modules=["v_proj"])).active_adapters == ["default"]


def test_from_pretrained_with_a_config_object_uses_it_as_peft_does(tmp_path: Path) -> None:
    ref, _ = pair(tmp_path)
    override = peft.LoraConfig(r=4, lora_alpha=2, target_modules=["q_proj", "v_proj"])  # the file says alpha 8
    theirs = peft.PeftModel.from_pretrained(tiny(), str(tmp_path / "ref"), config=override)
    for config in (override, dt.LoraConfig(r=4, lora_alpha=2, target_modules=["q_proj", "v_proj"])):
        ours = dt.PeftModel.from_pretrained(tiny(), tmp_path / "ref", config=config)
        torch.testing.assert_close(logits(ours), logits(theirs), atol=1e-5, rtol=0)
    assert (logits(theirs) - logits(ref)).abs().max() > 1e-4  # the override changed the scaling
    with pytest.raises(dt.CheckpointError, match="shape"):
        dt.PeftModel.from_pretrained(tiny(), tmp_path / "ref", config=dt.LoraConfig(r=2, target_modules=["q_proj",
                                                                                                          "v_proj"]))


@pytest.mark.parametrize("options", [
    {"target_modules": "all-linear"},
    {"target_modules": ["q_proj", "v_proj"], "layers_to_transform": [1]},
    {"target_modules": ["q_proj"], "layers_to_transform": 0, "layers_pattern": "layers"},
    {"target_modules": ["q_proj", "v_proj"], "rank_pattern": {"v_proj": 2}, "alpha_pattern": {"v_proj": 8}},
    {"target_modules": "all-linear", "exclude_modules": ["down_proj"]},
    {"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]},
    {"target_modules": ["q_proj"], "bias": "lora_only"},
], ids=lambda o: "-".join(sorted(o)))
def test_targeting_options_pick_what_peft_picks(options: dict) -> None:
    """The same keyword arguments to dt.LoraConfig and peft.LoraConfig train the same tensors."""
    ours, theirs = dt.get_peft_model(tiny(), dt.LoraConfig(r=4, **options)), peft.get_peft_model(
        tiny(), peft.LoraConfig(r=4, **options))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    mine, reference = dt.get_peft_model_state_dict(ours), peft.get_peft_model_state_dict(theirs)
    assert {k: v.shape for k, v in mine.items()} == {k: v.shape for k, v in reference.items()}


def test_peft_names_work_without_peft_installed(tmp_path: Path) -> None:
    """Without peft (or inside without_peft_identity, as the CLI builds models) a DeltaModel is no
    peft.PeftModel; the peft names it offers must not come from peft."""
    from deltatune.integrations.peft_identity import without_peft_identity

    ref, _ = pair(tmp_path)
    with without_peft_identity():
        model = dt.PeftModel.from_pretrained(tiny(), tmp_path / "ref", is_trainable=True)
    assert not isinstance(model, peft.PeftModel)
    assert model.get_nb_trainable_parameters() == ref.get_nb_trainable_parameters()
    assert model.get_model_status().trainable_params == ref.get_model_status().trainable_params
    model.disable_adapter_layers()
    torch.testing.assert_close(logits(model), logits(tiny()), atol=1e-5, rtol=0)
    assert sorted(dt.get_peft_model_state_dict(model)) == sorted(peft.get_peft_model_state_dict(ref))
