"""OFT and LayerNorm tuning in mixed-adapter batches (``adapter_names=[...]``), beside LoRA and ``"__base__"``.

Reference: each example run alone with its adapter (``set_adapter``) or with adapters disabled; the
gathered paths must agree to 1e-5, and in training mode an example's loss must reach only its own
adapter's tensors, with the gradient it gets when run alone. A hand-written rotation checks the
block-size widening on its own.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from _mixed_checks import (
    BASE,
    assert_generate_mixed_equals_solo,
    assert_mixed_equals_solo,
    assert_row_gradient_is_its_adapters,
    build,
    lora,
    perturbed,
)
from torch import nn

import deltatune as dt
from deltatune.methods.oft.batched import routed_rotate, stack_rotations


def oft(**kw: Any) -> dt.OFTConfig:
    kw.setdefault("target_modules", ["q_proj", "v_proj", "down_proj"])
    return dt.OFTConfig(**kw)


def oft_configs() -> dict[str, Any]:
    return {"o4": oft(oft_block_size=4), "o8": oft(oft_block_size=8, use_cayley_neumann=False),
            "share": oft(r=2, oft_block_size=0, block_share=True, target_modules=["q_proj", "o_proj"]),
            "l": lora(2, 4)}


def test_widened_blocks_are_the_same_rotation() -> None:
    """Blocks of size 2 and 4 at the common size 4: each row equals ``x @ block_diag(R_k)`` written out."""
    gen = torch.Generator().manual_seed(0)
    small, big = torch.randn(4, 2, 2, generator=gen), torch.randn(2, 4, 4, generator=gen)
    stack = stack_rotations([small, big], [4, 2])  # (3, 2, 4, 4)
    x = torch.randn(3, 5, 8, generator=gen)
    got = routed_rotate(stack, torch.tensor([0, 1, 2]), x)
    torch.testing.assert_close(got[0], x[0] @ torch.block_diag(*small))
    torch.testing.assert_close(got[1], x[1] @ torch.block_diag(*big))
    torch.testing.assert_close(got[2], x[2])


@pytest.mark.parametrize("kind", ["llama_lm", "t5"])
def test_oft_block_sizes_shared_blocks_with_lora(make_model: Any, kind: str) -> None:
    configs = oft_configs()
    if kind == "t5":
        configs = {k: (oft(oft_block_size=v.oft_block_size, r=v.r, block_share=v.block_share,
                           target_modules=["q", "v", "wo"]) if k != "l" else v) for k, v in configs.items()}
    model = perturbed(build(make_model, kind, configs))
    names = ["o4", "l", BASE, "o8", "share", "o4"]
    assert_mixed_equals_solo(model, make_model.inputs(kind, batch=len(names)), names)


def test_oft_on_conv1d_and_coft(make_model: Any) -> None:
    configs = {"o": oft(oft_block_size=8, target_modules=["c_attn", "c_fc"]),
               "c": oft(oft_block_size=4, coft=True, eps=0.5, target_modules=["c_attn"]), "l": lora(3, 4)}
    model = perturbed(build(make_model, "gpt2_lm", configs))
    names = ["c", BASE, "o", "l", "o"]
    assert_mixed_equals_solo(model, make_model.inputs("gpt2_lm", batch=len(names)), names)


def ln(targets: list[str]) -> dt.LNTuningConfig:
    return dt.LNTuningConfig(target_modules=targets)


@pytest.mark.parametrize("kind, targets", [("llama_lm", ["input_layernorm", "norm"]),
                                           ("bert_seq_cls", ["LayerNorm"]),
                                           ("t5", ["layer_norm", "final_layer_norm"])])
def test_ln_tuning_with_lora_and_oft(make_model: Any, kind: str, targets: list[str]) -> None:
    configs: dict[str, Any] = {"n1": ln(targets), "n2": ln(targets[:1]), "l": lora(2, 4)}
    if kind == "llama_lm":
        configs["o"] = oft(oft_block_size=8)
    task = {"task_type": "SEQ_CLS"} if kind == "bert_seq_cls" else {}
    configs = {k: type(v)(**{**v.__dict__, **task}) for k, v in configs.items()}
    model = perturbed(build(make_model, kind, configs))
    names = ["n1", "l", BASE, "n2", "n1", *(["o"] if "o" in configs else [])]
    assert_mixed_equals_solo(model, make_model.inputs(kind, batch=len(names)), names)


class ShiftedNorm(nn.Module):
    """A norm of the form ``(1 + w) * n(x)`` (Gemma's, Nemotron's): not ``w * n(x)``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (1 + self.weight) * nn.functional.layer_norm(x, x.shape[-1:])


class NormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.norm = ShiftedNorm(8)
        self.ln = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.ln(self.norm(self.fc(x))))


def test_ln_tuning_of_another_norm_form_is_served_per_adapter() -> None:
    torch.manual_seed(0)
    model = dt.get_delta_model(NormNet(), ln(["norm", "ln"]), "a")
    model.add_adapter("b", ln(["norm"]))
    model = perturbed(model.eval())
    inputs = {"x": torch.randn(4, 8)}
    names = ["b", "a", BASE, "b"]
    with torch.no_grad():
        mixed = model(**inputs, adapter_names=names)
        for i, name in enumerate(names):
            if name == BASE:
                with model.disable_adapter():
                    ref = model(x=inputs["x"][i : i + 1])
            else:
                model.set_adapter(name)
                ref = model(x=inputs["x"][i : i + 1])
            torch.testing.assert_close(mixed[i : i + 1], ref, atol=1e-5, rtol=1e-5)
    wrappers = {type(m.get_base_layer()).__name__: m for m in model.modules() if hasattr(m, "_gathers")}
    assert not wrappers["ShiftedNorm"]._gathers() and wrappers["LayerNorm"]._gathers()


def test_gradients_reach_only_each_examples_adapter(make_model: Any) -> None:
    configs = {"o": oft(oft_block_size=4), "o2": oft(oft_block_size=8), "n": ln(["input_layernorm", "norm"]),
               "n2": ln(["input_layernorm"]), "l": lora(2, 4)}
    model = perturbed(build(make_model, "llama_lm", configs))
    model.set_adapter(list(configs))  # all trainable
    model.train()
    inputs = make_model.inputs("llama_lm", batch=5)
    names = ["o", "n", BASE, "l", "o2"]
    for row in (0, 1):  # an OFT row, an LN-tuning row
        assert_row_gradient_is_its_adapters(model, inputs, names, row, list(configs))


def test_generate_mixes_oft_ln_tuning_and_lora(make_model: Any) -> None:
    model = perturbed(build(make_model, "llama_lm", {"o": oft(oft_block_size=4), "n": ln(["input_layernorm"]),
                                                     "l": lora(2, 4)}))
    ids = make_model.inputs("llama_lm", batch=4, seq=5)["input_ids"]
    names = ["n", "o", BASE, "l"]
    gen = {"max_new_tokens": 5, "do_sample": False, "num_beams": 2, "pad_token_id": 0}
    assert_generate_mixed_equals_solo(model, ids, names, gen)
