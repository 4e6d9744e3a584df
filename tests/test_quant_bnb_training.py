"""4-bit training layers (deltatune.quant.bnb_training): the same loss and gradients as bitsandbytes' own
MatMul4Bit, bit for bit, with one dequantization fewer per step under gradient checkpointing and none kept
outside it. The reference is the same model with its layers' class set back to ``bnb.nn.Linear4bit``."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _quant_models import count_dequantizations, inputs, quantized_llama

bnb = pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.filterwarnings("ignore")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _model(kind: str, checkpointing: bool, reentrant: bool = False, bitsandbytes_own: bool = False):
    import deltatune as dt
    from deltatune.quant.bnb_training import TrainingLinear4bit

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = dt.prepare_for_kbit_training(quantized_llama(kind), use_gradient_checkpointing=checkpointing,
                                             gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    if bitsandbytes_own:
        for module in model.modules():
            if type(module) is TrainingLinear4bit:
                module.__class__ = bnb.nn.Linear4bit
    torch.manual_seed(1)
    delta = dt.get_delta_model(model, dt.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=TARGETS))
    with torch.no_grad():  # non-zero B: every adapter changes the output and passes gradients down
        for name, param in delta.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn_like(param) * 0.1)
    return delta.train()


def _loss_and_grads(model) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    batch = inputs(batch=2, seq=9)
    torch.manual_seed(3)  # the same dropout masks in both models
    loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kind", ["nf4", "fp4"])
@pytest.mark.parametrize(("checkpointing", "reentrant"), [(True, False), (True, True), (False, False)])
def test_loss_and_gradients_equal_bitsandbytes_matmul(kind: str, checkpointing: bool, reentrant: bool) -> None:
    from deltatune.quant.bnb_training import TrainingLinear4bit

    ours = _model(kind, checkpointing, reentrant)
    reference = _model(kind, checkpointing, reentrant, bitsandbytes_own=True)
    assert sum(type(m) is TrainingLinear4bit for m in ours.modules()) == 14  # 2 layers x 7 projections
    assert not any(type(m) is TrainingLinear4bit for m in reference.modules())
    loss, grads = _loss_and_grads(ours)
    ref_loss, ref_grads = _loss_and_grads(reference)
    assert torch.equal(loss, ref_loss)
    assert grads.keys() == ref_grads.keys() and len(grads) == 28
    for name, grad in grads.items():
        assert grad.abs().sum() > 0, name  # every LoRA factor is reached
        assert torch.equal(grad, ref_grads[name]), name


@pytest.mark.parametrize(("checkpointing", "layers"), [(True, 14), (False, 11)])
def test_each_weight_is_dequantized_twice_per_step(monkeypatch: pytest.MonkeyPatch, checkpointing: bool,
                                                   layers: int) -> None:
    """Checkpointed: forward and recompute (bitsandbytes: a third time in backward); not: forward, backward.
    Without checkpointing the embedding output needs no gradient, so layer 0's q/k/v take bitsandbytes'
    no-gradient path (one dequantization, not counted here): 11 of the 14 layers run this module's matmul."""
    model = _model("nf4", checkpointing)
    calls = count_dequantizations(monkeypatch)
    _loss_and_grads(model)
    assert calls[0] == 2 * layers


def test_without_checkpointing_no_float_weight_is_kept_for_backward() -> None:
    """Keeping W outside a checkpointed block would hold every layer's float weight until backward."""
    model = _model("nf4", checkpointing=False)
    shapes = {tuple(m.weight.quant_state.shape) for m in model.modules() if "Linear4bit" in type(m).__name__}
    saved: list[tuple[int, ...]] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.is_floating_point():
            saved.append(tuple(tensor.shape))
        return tensor

    batch = inputs(batch=2, seq=9)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    assert saved and not set(saved) & shapes


def test_checkpointing_flag_set_only_inside_checkpointed_layers_and_wrapping_is_idempotent() -> None:
    from deltatune.quant.bnb_training import (
        _FlaggedCheckpoint,
        flag_checkpointed_layers,
        in_checkpointed_region,
    )

    model = _model("nf4", checkpointing=True)
    flagged = [m for m in model.modules() if isinstance(m.__dict__.get("_gradient_checkpointing_func"), _FlaggedCheckpoint)]
    assert len(flagged) >= 2  # each decoder layer (and the model, which transformers also gives one)
    assert flag_checkpointed_layers(model) == 0
    seen: list[bool] = []
    layer = model.get_base_model().model.layers[0]
    layer.self_attn.q_proj.register_forward_hook(lambda *_: seen.append(in_checkpointed_region()))
    _loss_and_grads(model)
    assert seen == [True, True]  # the forward and its recompute
    assert not in_checkpointed_region()


def test_training_layer_is_still_a_bitsandbytes_linear4bit_and_infers_as_one() -> None:
    from deltatune.weights import quantization

    model = _model("nf4", checkpointing=True)
    layer = model.get_base_model().model.layers[0].self_attn.q_proj.get_base_layer()
    assert isinstance(layer, bnb.nn.Linear4bit) and quantization(layer) == "nf4"
    weight = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)  # (64, 64)
    x = torch.randn(3, 64, requires_grad=True)
    assert torch.equal(layer(x), torch.nn.functional.linear(x, weight))  # training: Dequantized4bitMatmul
    with torch.no_grad():  # inference: bitsandbytes' own forward
        assert torch.allclose(layer(x), torch.nn.functional.linear(x, weight), atol=1e-5)
