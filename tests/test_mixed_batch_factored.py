"""LoHa, LoKr, VeRA, BitFit and AdaLoRA in mixed-adapter batches, each through a gathered path.

Reference: each example run alone with its adapter (``set_adapter``) or with adapters disabled (1e-5).
The per-adapter fallback loop (``DeltaLayer.add_routed_delta``) is made to fail in these tests, so a
pass shows every row was served by the method's gathered form; each form (LoHa's rank-``r^2`` and
dense, LoKr's Kronecker and dense, VeRA's shared projections and LoRA form) is reached on purpose,
and a hand-written Kronecker product checks LoKr's factored matmul on its own.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from _mixed_checks import (
    BASE,
    assert_mixed_equals_solo,
    assert_row_gradient_is_its_adapters,
    build,
    logits,
    lora,
    perturbed,
)

import deltatune as dt
from deltatune.layer import DeltaLayer
from deltatune.methods._weight_delta.batched import KronStack, routed_kron
from deltatune.methods.lora.batched import LoraStack
from deltatune.methods.vera.batched import SharedVera

QV = ["q_proj", "v_proj"]


@pytest.fixture(autouse=True)
def no_loop(monkeypatch: Any) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the per-adapter fallback loop ran")

    monkeypatch.setattr(DeltaLayer, "add_routed_delta", refuse)


def stacks(model: dt.DeltaModel, method: str) -> list[type]:
    """Types of the cached stacks of ``method``'s layers after a no-grad mixed call."""
    return [type(v[-1]) for m in model.modules() if getattr(m, "method_name", "") == method
            for v in m.__dict__.get("_stack_cache", {}).values()]


def test_kron_matmul_equals_the_kronecker_product() -> None:
    gen = torch.Generator().manual_seed(0)
    w1, w2, x = torch.randn(2, 3, 4, generator=gen), torch.randn(2, 5, 2, generator=gen), torch.randn(2, 6, 8, generator=gen)
    got = routed_kron(KronStack(w1, w2), torch.tensor([1, 0]), x)
    torch.testing.assert_close(got[0], x[0] @ torch.kron(w1[1], w2[1]).T)
    torch.testing.assert_close(got[1], x[1] @ torch.kron(w1[0], w2[0]).T)


@pytest.mark.parametrize("ranks, form", [((2, 3), LoraStack), ((2, 6), torch.Tensor)], ids=["low_rank", "dense"])
def test_loha(make_model: Any, ranks: tuple[int, int], form: type) -> None:
    model = perturbed(build(make_model, "llama_lm", {"a": dt.LoHaConfig(r=ranks[0], alpha=3, target_modules=QV),
                                                     "b": dt.LoHaConfig(r=ranks[1], target_modules=QV),
                                                     "l": lora(2, 4)}))
    names = ["b", BASE, "a", "l", "b"]
    assert_mixed_equals_solo(model, make_model.inputs("llama_lm", batch=len(names)), names)
    assert set(stacks(model, "loha")) == {form}


@pytest.mark.parametrize("second, form", [({}, KronStack), ({"decompose_factor": 2}, torch.Tensor)],
                         ids=["kronecker", "dense"])
def test_lokr(make_model: Any, second: dict, form: type) -> None:
    model = perturbed(build(make_model, "llama_lm", {
        "a": dt.LoKrConfig(r=2, target_modules=QV, decompose_both=True),
        "b": dt.LoKrConfig(r=4, alpha=2, target_modules=QV, **second), "l": lora(2, 4)}))
    names = ["a", "l", BASE, "b", "a"]
    assert_mixed_equals_solo(model, make_model.inputs("llama_lm", batch=len(names)), names)
    assert set(stacks(model, "lokr")) == {form}


@pytest.mark.parametrize("second, form", [({}, SharedVera), ({"r": 6}, LoraStack), ({"projection_prng_key": 3}, LoraStack)],
                         ids=["shared", "other_rank", "other_key"])
def test_vera(make_model: Any, second: dict, form: type) -> None:
    model = perturbed(build(make_model, "llama_lm", {"a": dt.VeraConfig(r=4, target_modules=QV),
                                                     "b": dt.VeraConfig(**{"r": 4, "target_modules": QV, **second}),
                                                     "l": lora(2, 4)}))
    names = ["b", "a", BASE, "l", "a"]
    assert_mixed_equals_solo(model, make_model.inputs("llama_lm", batch=len(names)), names)
    assert set(stacks(model, "vera")) == {form}


@pytest.mark.parametrize("kind, targets", [("gpt2_lm", ["c_attn", "c_proj", "ln_1"]), ("cnn", ["conv2d", "conv1d", "fc"])])
def test_bitfit_on_linears_norms_and_convolutions(make_model: Any, kind: str, targets: list[str]) -> None:
    model = perturbed(build(make_model, kind, {"a": dt.BitFitConfig(target_modules=targets),
                                               "b": dt.BitFitConfig(target_modules=targets[:2])}))
    names = ["b", BASE, "a", "b"]
    assert_mixed_equals_solo(model, make_model.inputs(kind, batch=len(names)), names)


def adalora(init_r: int) -> dt.AdaLoraConfig:
    return dt.AdaLoraConfig(init_r=init_r, target_r=2, total_step=10, init_lora_weights=False, target_modules=QV)


def test_adalora_with_different_ranks_and_pruned_triplets(make_model: Any) -> None:
    model = build(make_model, "llama_lm", {"a": adalora(4), "b": adalora(6), "l": lora(2, 4)})
    with torch.no_grad():  # a pruned triplet: Lambda entry 0
        for m in model.modules():
            if getattr(m, "method_name", "") == "adalora":
                m.lora_E["b"][1] = 0.0
    names = ["a", "b", BASE, "l", "b"]
    assert_mixed_equals_solo(model, make_model.inputs("llama_lm", batch=len(names)), names)
    assert set(stacks(model, "adalora")) == {LoraStack}


def test_all_in_one_batch_gradients_reach_only_each_examples_adapter(make_model: Any) -> None:
    targets = ["c_attn", "c_fc"]
    configs = {"loha": dt.LoHaConfig(r=2, target_modules=targets), "lokr": dt.LoKrConfig(r=2, target_modules=targets),
               "vera": dt.VeraConfig(r=4, target_modules=targets), "bitfit": dt.BitFitConfig(target_modules=["c_proj"]),
               "ada": dt.AdaLoraConfig(init_r=3, target_r=2, total_step=10, init_lora_weights=False, target_modules=targets)}
    model = perturbed(build(make_model, "gpt2_lm", configs))
    names = ["loha", "lokr", BASE, "vera", "bitfit", "ada"]
    inputs = make_model.inputs("gpt2_lm", batch=len(names))
    assert_mixed_equals_solo(model, inputs, names)
    model.set_adapter(list(configs))
    model.double().train()  # float64: the two runs' different kernel orders round far below the tolerance
    for module in model.modules():  # GPT-2's own dropout off: the same function in both runs
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    for row, name in enumerate(names):
        if name == BASE:
            continue
        assert_row_gradient_is_its_adapters(model, inputs, names, row, list(configs), every_tensor=False,
                                            atol=1e-9, rtol=1e-7)


def test_lora_on_convolutions_as_one_grouped_convolution(make_model: Any) -> None:
    def conv_lora(r: int, alpha: float) -> dt.LoraConfig:
        return dt.LoraConfig(r=r, lora_alpha=alpha, target_modules=["conv2d", "conv1d", "fc"], init_lora_weights=False)

    model = perturbed(build(make_model, "cnn", {"a": conv_lora(2, 4), "b": conv_lora(5, 3), "c": conv_lora(1, 8)}))
    names = ["b", BASE, "a", "c", "b"]
    assert_mixed_equals_solo(model, make_model.inputs("cnn", batch=len(names)), names)
    assert set(stacks(model, "lora")) == {LoraStack, tuple}  # the linear's stack, the convolutions' (A, B)


def test_loading_into_an_existing_adapter_refreshes_its_stack(make_model: Any, tmp_path: Any) -> None:
    """Parameter-dict adapters (LoHa here) loaded in place: the cached stack must not serve the old values."""
    configs = {"a": dt.LoHaConfig(r=2, target_modules=QV), "b": dt.LoHaConfig(r=2, target_modules=QV)}
    model = perturbed(build(make_model, "llama_lm", configs))
    inputs = make_model.inputs("llama_lm", batch=3)
    inputs["input_ids"][1] = inputs["input_ids"][0]
    names = ["a", "b", BASE]
    assert_mixed_equals_solo(model, inputs, names)  # builds and caches the stacks
    model.save_pretrained(tmp_path)
    model.load_adapter(tmp_path / "b", "a")  # "a" now holds "b"'s values
    with torch.no_grad():
        mixed = logits(model(**inputs, adapter_names=names))
    torch.testing.assert_close(mixed[0], mixed[1], atol=1e-5, rtol=1e-5)
    assert_mixed_equals_solo(model, inputs, names)
