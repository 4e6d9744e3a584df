"""The core drives any registered layer method, not only LoRA: a toy method nested with LoRA.

The toy method ``testscale`` scales a layer's output per feature, ``h = (1 + g) * f(x)`` (not
mergeable). Wrapped around a LoRA layer, the module computes ``(1 + g) * (W x + b + s B A x)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune import registry
from deltatune.layer import DeltaLayer


@dataclass
class ScaleConfig(dt.TargetedConfig):
    PEFT_TYPE: ClassVar[str] = "TESTSCALE"
    init_value: float = 0.5


class ScaleLayer(DeltaLayer):
    adapter_attr_names = ("scale_g",)
    method_name = "testscale"

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.scale_g = nn.ParameterDict()

    def add(self, name: str, config: ScaleConfig, path: str = "") -> None:
        out = self.get_base_layer().weight.shape[0]
        self.scale_g[name] = nn.Parameter(torch.full((out,), config.init_value))
        self.set_active(self.active_adapters)

    def add_delta(self, name: str, x: torch.Tensor, result: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return result * (1 + self.scale_g[name])


def scale_can_wrap(module: nn.Module, config: ScaleConfig, path: str) -> str | None:
    return None if hasattr(module, "weight") else f"{type(module).__name__} has no weight to size the scale"


@pytest.fixture
def scale_method() -> Iterator[registry.MethodSpec]:
    """The toy method as a method with one layer class registers it: ``layer_cls``, no ``make_layer``."""
    spec = registry.MethodSpec(name="testscale", peft_type="TESTSCALE", config_cls=ScaleConfig, kind="layer",
                               layer_cls=ScaleLayer, can_wrap=scale_can_wrap)
    registry.register(spec)
    yield spec
    for table, key in ((registry._BY_NAME, "testscale"), (registry._BY_PEFT_TYPE, "TESTSCALE"),
                       (registry._BY_CONFIG, ScaleConfig)):
        table.pop(key, None)


def test_nested_methods_forward_merge_save_and_delete(scale_method, make_model, output_of, tmp_path) -> None:
    base = make_model("mlp")
    inputs = make_model.inputs("mlp")
    x = inputs["x"]
    w1, b1 = base.fc1.weight.detach().clone(), base.fc1.bias.detach().clone()
    model = dt.get_delta_model(base, dt.LoraConfig(r=2, lora_alpha=2, target_modules=["fc1"], init_lora_weights=False))
    model.add_adapter("s", ScaleConfig(target_modules=["fc1"], init_value=0.5))
    assert isinstance(model.base_model.fc1, ScaleLayer) and type(model.base_model.fc1.base_layer).__name__ == "LoraLinear"
    model.set_adapter(["default", "s"])
    lora = model.base_model.fc1.base_layer
    a, b = lora.lora_A["default"].weight.detach(), lora.lora_B["default"].weight.detach()
    expected_fc1 = 1.5 * (x @ w1.T + b1 + x @ a.T @ b.T)
    torch.testing.assert_close(model.base_model.fc1(x), expected_fc1, atol=1e-6, rtol=0)
    expected = output_of(model, inputs)

    with pytest.raises(dt.MergeError, match="testscale.*cannot be merged"):
        model.merge_adapter()
    model.merge_adapter(["default"])  # LoRA below the toy layer merges into the innermost weight
    torch.testing.assert_close(output_of(model, inputs), expected, atol=1e-5, rtol=0)
    model.unmerge_adapter()
    assert (lora.get_base_layer().weight - w1).abs().max() <= 1e-6

    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    assert set(load_file(tmp_path / "s" / "adapter_model.safetensors")) == {"base_model.model.fc1.scale_g"}
    loaded = dt.DeltaModel.from_pretrained(make_model("mlp"), tmp_path)
    loaded.load_adapter(tmp_path / "s", "s")
    loaded.set_adapter(["default", "s"])
    torch.testing.assert_close(output_of(loaded, inputs), expected, atol=1e-6, rtol=0)

    model.delete_adapter("default")  # the inner LoRA wrapper goes, the toy layer stays
    assert isinstance(model.base_model.fc1, ScaleLayer) and isinstance(model.base_model.fc1.base_layer, nn.Linear)
    torch.testing.assert_close(model.base_model.fc1(x), 1.5 * (x @ w1.T + b1), atol=1e-6, rtol=0)
    model.delete_adapter("s")
    assert isinstance(model.base_model.fc1, nn.Linear)


def test_registry_lookup_and_unknown_names(scale_method) -> None:
    assert dt.get_method("testscale") is scale_method
    assert dt.get_method("TESTSCALE") is scale_method
    assert dt.get_method(ScaleConfig()) is scale_method
    assert dt.get_method(dt.LoraConfig()).name == "lora"
    with pytest.raises(dt.ConfigError, match="Unknown method.*'nope'.*lora"):
        dt.get_method("nope")


def test_spec_wrap_builds_layer_cls_and_asks_can_wrap_first(scale_method) -> None:
    """``MethodSpec.wrap`` builds ``layer_cls.wrapping`` for a module ``can_wrap`` accepts and ``None`` otherwise."""
    linear = nn.Linear(3, 2)
    layer = scale_method.wrap(linear, ScaleConfig(init_value=0.25), "a", "fc")
    assert isinstance(layer, ScaleLayer) and layer.get_base_layer() is linear
    assert torch.equal(layer.scale_g["a"].detach(), torch.full((2,), 0.25))
    assert scale_method.wrap(nn.ReLU(), ScaleConfig(), "a", "act") is None


def test_layer_method_needs_exactly_one_way_to_build_its_layer() -> None:
    def build(module: nn.Module, config: ScaleConfig, name: str, path: str) -> ScaleLayer:
        return ScaleLayer.wrapping(module, name, config, path)

    common = {"name": "testscale2", "peft_type": "TESTSCALE2", "config_cls": ScaleConfig, "kind": "layer"}
    for ways in ({}, {"make_layer": build, "layer_cls": ScaleLayer}):
        with pytest.raises(ValueError, match="exactly one of make_layer and layer_cls"):
            registry.register(registry.MethodSpec(**common, **ways))
    assert "testscale2" not in registry._BY_NAME
