"""The measured LoRA recipe: ``LoraConfig.recommended`` and when ``deltatune train`` / ``demo`` apply it.

References: HF peft's ``LoraConfig`` defaults (which deltatune's plain ``LoraConfig`` must keep), the
model's own ``nn.Linear`` modules (what "every linear layer" must wrap) and the ``r * (in + out)``
parameter count of a LoRA pair. Accuracy is the benchmark's job (``python -m bench.recipe``), not this file's.
"""

from __future__ import annotations

from typing import Any

import pytest
from torch import nn

import deltatune as dt
from deltatune.cli import main
from deltatune.train.options import DEFAULT_EPOCHS, DEFAULT_LR, TrainOptions, build_options


def test_recommended_fields_and_task_type_from_the_model(make_model: Any) -> None:
    config = dt.LoraConfig.recommended(make_model("bert_seq_cls"))
    assert config.target_modules == "all-linear"
    assert config.r == 32 and config.lora_alpha == 2 * config.r and config.lora_dropout == 0.1
    assert config.task_type == "SEQ_CLS"
    assert dt.LoraConfig.recommended(make_model("llama_lm")).task_type == "CAUSAL_LM"
    assert dt.LoraConfig.recommended().task_type is None
    assert dt.LoraConfig.recommended(make_model("bert_seq_cls"), r=4, task_type="FEATURE_EXTRACTION").r == 4
    assert 1e-4 < dt.LoraConfig.RECOMMENDED_LR < 1e-2


def test_plain_lora_config_keeps_peft_defaults() -> None:
    import peft

    ours, theirs = dt.LoraConfig(), peft.LoraConfig()
    for name in ("r", "lora_alpha", "lora_dropout", "target_modules", "bias", "use_rslora", "use_dora"):
        assert getattr(ours, name) == getattr(theirs, name), name


def test_recommended_wraps_every_linear_layer_but_the_head(make_model: Any) -> None:
    base = make_model("bert_seq_cls")
    linears = {n: m for n, m in base.named_modules() if isinstance(m, nn.Linear) and not n.startswith("classifier")}
    expected = sum(32 * (m.in_features + m.out_features) for m in linears.values())  # A (r, in) + B (out, r)
    expected += sum(p.numel() for p in base.classifier.parameters())  # SEQ_CLS trains the head
    model = dt.get_delta_model(base, dt.LoraConfig.recommended(base))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == expected
    lora_params = {n for n, p in model.named_parameters() if "lora_A" in n}
    assert len(lora_params) == len(linears)


def _options_from_cli(monkeypatch: pytest.MonkeyPatch, *args: str) -> TrainOptions:
    """The options ``deltatune train ARGS`` would train with (training itself is replaced by a recorder)."""
    from deltatune.train import loop

    seen: list[TrainOptions] = []
    monkeypatch.setattr(loop, "train", lambda options: seen.append(options) or {})
    assert main(["train", "--data", "trec", *args]) == 0
    return seen[0]


def test_cli_applies_the_recipe_only_when_given_no_method_options(monkeypatch: pytest.MonkeyPatch) -> None:
    recipe, rate = dt.LoraConfig.RECOMMENDED_OPTIONS, dt.LoraConfig.RECOMMENDED_LR
    plain = _options_from_cli(monkeypatch)
    assert plain.method_options == recipe and plain.lr == rate and plain.epochs == dt.LoraConfig.RECOMMENDED_EPOCHS
    config = plain.method_config("seq_cls")
    assert (config.r, config.lora_alpha, config.target_modules) == (32, 64, "all-linear")
    own_lr = _options_from_cli(monkeypatch, "--lr", "3e-4")
    assert own_lr.method_options == recipe and own_lr.lr == 3e-4 and own_lr.epochs == dt.LoraConfig.RECOMMENDED_EPOCHS
    assert _options_from_cli(monkeypatch, "--epochs", "1").epochs == 1
    own_opts = _options_from_cli(monkeypatch, "--method-opt", "r=4")
    assert own_opts.method_options == {"r": 4} and own_opts.lr == DEFAULT_LR and own_opts.epochs == DEFAULT_EPOCHS
    assert own_opts.method_config("seq_cls").lora_alpha == dt.LoraConfig().lora_alpha  # peft default, no recipe
    other = _options_from_cli(monkeypatch, "--method", "ia3")
    assert other.method_options == {} and other.lr == DEFAULT_LR and other.epochs == DEFAULT_EPOCHS


def test_yaml_method_options_count_as_the_users_choice() -> None:
    options = build_options({"method_options": {"target_modules": ["query", "value"]}}, {"method_options": {}})
    assert options.method_options == {"target_modules": ["query", "value"]} and options.lr == DEFAULT_LR
    assert build_options({"lr": 3e-4}, {}).lr == pytest.approx(3e-4)


def test_demo_uses_the_recipe() -> None:
    from deltatune.commands.demo import demo_options

    options = demo_options()
    assert options.method == "lora" and options.method_options == dt.LoraConfig.RECOMMENDED_OPTIONS
    assert options.lr == dt.LoraConfig.RECOMMENDED_LR and options.epochs == dt.LoraConfig.RECOMMENDED_EPOCHS
    assert demo_options(epochs=1).epochs == 1
