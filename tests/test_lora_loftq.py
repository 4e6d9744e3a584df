"""LoftQ initialisation (Li et al., arXiv 2310.08659) on a tiny Llama.

References: the alternation written out below with bitsandbytes' own ``quantize_4bit`` /
``dequantize_4bit`` and ``torch.linalg.svd``; HF peft's ``loftq_init`` (which computes on a CUDA device:
run here on the CPU by mapping its ``"cuda"`` device arguments to ``"cpu"``).
"""

from __future__ import annotations

import importlib.util
import json
import warnings

import pytest
import torch
from _loftq_reference import quantize_roundtrip, reference_loftq
from _quant_models import dequantized_by_backend, inputs, quantized_llama, tiny_llama
from torch import nn
from torch.overrides import TorchFunctionMode

import deltatune as dt
from deltatune.methods.lora.loftq import loftq_factors
from deltatune.quant import QuantizationError

pytestmark = pytest.mark.filterwarnings("ignore")
bnb_functional = pytest.importorskip("bitsandbytes.functional")
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def loftq_config(r: int = 4, alpha: float = 8, iters: int = 1, **kw) -> dt.LoraConfig:
    return dt.LoraConfig(r=r, lora_alpha=alpha, target_modules="all-linear", init_lora_weights="loftq",
                         loftq_config=dt.LoftQConfig(loftq_bits=4, loftq_iter=iters), **kw)


def float_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {p: m.weight.detach().clone() for p, m in model.named_modules() if p.endswith(LINEARS)}


def layers(delta: dt.DeltaModel) -> dict[str, nn.Module]:
    return {p: m for p, m in delta.get_base_model().named_modules() if p.endswith(LINEARS)}


def loftq_error(delta: dt.DeltaModel, weights: dict[str, torch.Tensor]) -> float:
    """sqrt(sum over layers of ||W - (dequant(Q) + s B A)||_F^2), Q read with bitsandbytes' own function."""
    total = 0.0
    for path, layer in layers(delta).items():
        q = dequantized_by_backend(layer.get_base_layer())
        delta_w = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        total += float((weights[path] - q - delta_w).norm() ** 2)
    return total ** 0.5


def test_loftq_follows_the_alternation_and_its_error_falls_with_iterations() -> None:
    weights = float_weights(tiny_llama())
    plain = sum(float((w - quantize_roundtrip(w)[1]).norm() ** 2) for w in weights.values()) ** 0.5  # QLoRA's start
    errors = []
    for iters in (1, 2, 4):
        delta = dt.get_delta_model(tiny_llama(), loftq_config(iters=iters))
        for path, layer in layers(delta).items():
            base = layer.get_base_layer()
            assert "Linear4bit" in {c.__name__ for c in type(base).__mro__}  # real 4-bit storage: training is QLoRA
            assert base.weight.quant_type == "nf4" and base.weight.compress_statistics
            _, q, a, b = reference_loftq(weights[path], 4, layer.scaling["default"], iters)
            torch.testing.assert_close(dequantized_by_backend(base), q, atol=1e-6, rtol=0)
            torch.testing.assert_close(layer.lora_A["default"].weight, a, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(layer.lora_B["default"].weight, b, atol=1e-5, rtol=1e-4)
        errors.append(loftq_error(delta, weights))
    assert errors[0] < 0.95 * plain, (errors, plain)  # rank 4 of 64 on random weights: about 10% less
    assert errors[1] <= errors[0] and errors[2] <= errors[1], errors
    # the LoRA scale is accounted for: s B A, not B A, fits W - Q, whatever alpha is
    scaled = dt.get_delta_model(tiny_llama(), loftq_config(alpha=32, iters=1))
    assert loftq_error(scaled, weights) == pytest.approx(errors[0], rel=1e-4)
    # the model starts closer to the float model than plain nf4 does (rms logit error; rank 4: a little closer)
    batch = inputs()
    with torch.no_grad():  # train mode: bitsandbytes' float32 CPU kernel, not the bfloat16 inference one
        want = tiny_llama()(**batch).logits
        nf4 = quantized_llama("nf4").train()(**batch).logits
        got = scaled.train()(**batch).logits
    assert (got - want).pow(2).mean() < 0.9 * (nf4 - want).pow(2).mean()


class _CudaToCpu(TorchFunctionMode):
    """peft's LoftQ moves its work to ``"cuda"``; this runs those calls on the CPU instead."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        def cpu(value):
            if isinstance(value, str) and value.startswith("cuda"):
                return "cpu"
            return torch.device("cpu") if isinstance(value, torch.device) and value.type == "cuda" else value

        return func(*(cpu(a) for a in args), **{k: cpu(v) for k, v in (kwargs or {}).items()})


def _peft_quantized(weight: torch.Tensor) -> nn.Module:
    """peft's quantizer for LoftQ: NF4 without double quantisation."""
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(weight.shape[1], weight.shape[0], bias=False, compute_dtype=torch.float32,
                              compress_statistics=False, quant_type="nf4", device="meta")
    layer.weight = bnb.nn.Params4bit(weight.detach().clone(), requires_grad=False, compress_statistics=False,
                                     quant_type="nf4", module=layer)
    return layer.to("cpu")


@pytest.mark.parametrize("iters", [1, 2])
def test_loftq_equals_peft_with_its_quantizer_and_scale_one(iters: int) -> None:
    """Where the two are meant to be equal (peft's NF4 without double quantisation, lora_alpha == r, where
    peft's unscaled split is right), deltatune's alternation gives peft's Q, A and B."""
    from peft.utils.loftq_utils import loftq_init

    weight = tiny_llama().model.layers[0].mlp.down_proj.weight.detach()  # (64, 128)
    with _CudaToCpu():
        q_peft, a_peft, b_peft = loftq_init(weight.clone(), num_bits=4, reduced_rank=4, num_iter=iters)
    layer, a, b = loftq_factors(weight, 4, 1.0, iters, _peft_quantized)
    torch.testing.assert_close(dequantized_by_backend(layer), q_peft, atol=1e-6, rtol=0)
    torch.testing.assert_close(a, a_peft, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(b, b_peft, atol=1e-5, rtol=1e-4)


def test_loftq_model_matches_peft_loftq_model_in_error() -> None:
    """The same tiny model through peft's get_peft_model and deltatune's get_delta_model (r = alpha = 4, T = 2):
    deltatune double-quantises the block scales (as dt.quantize), peft does not, so Q differs in the scales'
    rounding and only the error norms compare; peft keeps dequant(Q) in a float base, deltatune the 4-bit Q."""
    import peft

    weights = float_weights(tiny_llama())
    config = peft.LoraConfig(r=4, lora_alpha=4, target_modules=list(LINEARS))
    config.init_lora_weights, config.loftq_config = "loftq", {"loftq_bits": 4, "loftq_iter": 2}  # skips peft's scipy check
    with _CudaToCpu():
        theirs = peft.get_peft_model(tiny_llama(), config)
    peft_error = 0.0
    for path, module in theirs.base_model.model.named_modules():
        if path.endswith(LINEARS):
            w = module.get_base_layer().weight + module.scaling["default"] * module.get_delta_weight("default")
            peft_error += float((weights[path] - w).norm() ** 2)
    ours = loftq_error(dt.get_delta_model(tiny_llama(), loftq_config(r=4, alpha=4, iters=2)), weights)
    assert ours == pytest.approx(peft_error ** 0.5, rel=0.02)


def test_loftq_adapter_saves_as_plain_lora_and_loads_on_the_base_it_fits(tmp_path) -> None:
    from transformers import LlamaForCausalLM

    from deltatune.quant.load import from_pretrained_quantized

    batch = inputs()
    for iters in (1, 2):
        delta = dt.get_delta_model(dt.prepare_for_kbit_training(tiny_llama(), use_gradient_checkpointing=False),
                                   loftq_config(iters=iters))
        codes = {p: m.get_base_layer().weight.data.clone() for p, m in layers(delta).items()}
        optimizer = torch.optim.SGD([p for p in delta.parameters() if p.requires_grad], lr=0.1)
        delta.train()(**batch, labels=batch["input_ids"]).loss.backward()
        optimizer.step()  # a QLoRA step: the adapter moves, the 4-bit base does not
        assert all(torch.equal(m.get_base_layer().weight.data, codes[p]) for p, m in layers(delta).items())
        with torch.no_grad():
            expected = delta(**batch).logits
        folder = tmp_path / f"adapter{iters}"
        delta.save_pretrained(folder)
        saved = json.loads((folder / "adapter_config.json").read_text())
        assert saved["init_lora_weights"] is True and not saved["loftq_config"]  # no loader redoes LoftQ
        with pytest.raises(dt.BaseModelMismatchError, match="float"):
            dt.DeltaModel.from_pretrained(tiny_llama(), folder)
        if iters == 1:  # Q_1 = quant(W): the usual nf4 base of the original model
            base = quantized_llama("nf4")
        else:  # Q_2 is a new base: refused on the usual one; saved as dequant(Q) and re-quantized, it fits
            with pytest.raises(dt.BaseModelMismatchError, match="different weights"):
                dt.DeltaModel.from_pretrained(quantized_llama("nf4"), folder)
            dt.dequantize(delta.unload()).save_pretrained(tmp_path / "loftq-base")
            base = from_pretrained_quantized(LlamaForCausalLM, str(tmp_path / "loftq-base"), "nf4")
        loaded = dt.DeltaModel.from_pretrained(base, folder).train()
        with torch.no_grad():  # re-quantizing dequant(Q) gives Q's codes; its double-quantised scales move by 1e-6
            torch.testing.assert_close(loaded(**batch).logits, expected, atol=1e-5 if iters == 1 else 1e-3, rtol=0)


def test_loftq_bad_input_is_refused_before_anything_changes(monkeypatch) -> None:
    with pytest.raises(dt.ConfigError, match="needs loftq_config"):
        dt.LoraConfig(init_lora_weights="loftq")
    with pytest.raises(dt.ConfigError, match="loftq_bits=2"):
        dt.LoftQConfig(loftq_bits=2)
    with pytest.raises(dt.ConfigError, match="loftq_iter=0"):
        dt.LoftQConfig(loftq_iter=0)
    with pytest.warns(UserWarning, match="loftq_config is ignored"):
        assert dt.LoraConfig(loftq_config=dt.LoftQConfig()).loftq_config == {}

    nf4 = quantized_llama("nf4")  # LoftQ quantizes the float weights itself: a quantized base is refused
    with pytest.raises(dt.TargetError, match="quantized already .*nf4.*float model"):
        dt.get_delta_model(nf4, loftq_config())
    assert not any(getattr(m, "_delta_base_child", None) for m in nf4.modules())

    model = tiny_llama()
    with pytest.raises(dt.TargetError, match="embed_tokens: .*loftq"):
        dt.get_delta_model(model, dt.LoraConfig(r=2, target_modules=["q_proj", "embed_tokens"],
                                                init_lora_weights="loftq", loftq_config=dt.LoftQConfig()))
    from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

    custom = nn.Sequential(NonDynamicallyQuantizableLinear(8, 4))  # a subclass: its forward may differ
    with pytest.raises(dt.TargetError, match="NonDynamicallyQuantizableLinear"):
        dt.get_delta_model(custom, dt.LoraConfig(r=2, target_modules=["0"], init_lora_weights="loftq",
                                                 loftq_config=dt.LoftQConfig()))
    delta = dt.get_delta_model(model, dt.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(dt.TargetError, match="already carries adapters"):
        delta.add_adapter("loftq", dt.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="loftq",
                                                 loftq_config=dt.LoftQConfig()))
    assert list(delta.peft_config) == ["default"]

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    fresh = tiny_llama()
    with pytest.raises(QuantizationError, match=r"pip install 'bitsandbytes>=0.46'"):
        dt.get_delta_model(fresh, loftq_config())
    assert all(type(m) is nn.Linear for p, m in fresh.named_modules() if p.endswith(LINEARS))


def test_loftq_with_dora_starts_from_the_loftq_weight() -> None:
    """DoRA's magnitude is taken from dequant(Q) + s B A, so the model starts where plain LoftQ does."""
    batch = inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = dt.get_delta_model(tiny_llama(), loftq_config()).train()
        dora = dt.get_delta_model(tiny_llama(), loftq_config(use_dora=True)).train()
    with torch.no_grad():
        torch.testing.assert_close(dora(**batch).logits, plain(**batch).logits, atol=1e-4, rtol=0)


def test_loftq_8bit_holds_int8_and_fits_better_than_int8_alone() -> None:
    from _quant_models import requantized_by_backend

    weights = float_weights(tiny_llama())
    delta = dt.get_delta_model(tiny_llama(), dt.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                           init_lora_weights="loftq",
                                                           loftq_config=dt.LoftQConfig(loftq_bits=8, loftq_iter=2)))
    assert all("Linear8bitLt" in {c.__name__ for c in type(m.get_base_layer()).__mro__} for m in layers(delta).values())
    plain = sum(float((w - requantized_by_backend("int8", w)).norm() ** 2) for w in weights.values()) ** 0.5
    assert loftq_error(delta, weights) < 0.95 * plain


def test_loftq_layers_keep_the_training_layout_through_an_inference_call() -> None:
    """bitsandbytes re-lays-out 4-bit weights at the first inference call on AVX512-BF16 CPUs, which breaks
    training after it; LoftQ's new layers opt out as prepare_for_kbit_training's layers do."""
    delta = dt.get_delta_model(tiny_llama(), loftq_config()).eval()
    with torch.no_grad():
        delta(**inputs())
    states = [m.get_base_layer().weight.quant_state for m in layers(delta).values()]
    assert not any(getattr(state, "packing_format_for_cpu", False) for state in states)


def _lora_factors(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{"layers.<i>.<...>_proj": (A, B)}``: keyed from ``layers.`` on, whatever wraps the model."""
    return {p[p.index("layers."):]: (m.lora_A["default"].weight.detach().clone(), m.lora_B["default"].weight.detach().clone())
            for p, m in model.named_modules() if p.endswith(LINEARS) and hasattr(m, "lora_A")}


def test_loftq_on_an_already_quantized_base_from_its_safetensors(tmp_path) -> None:
    """replace_lora_weights_loftq on a base loaded as nf4: the same A, B as LoftQ (T=1) on the float model, and,
    with lora_alpha == r, HF peft's replace_lora_weights_loftq on the same loaded base."""
    import peft
    from transformers import LlamaForCausalLM

    from deltatune.quant.load import from_pretrained_quantized

    tiny_llama().save_pretrained(tmp_path / "float")

    def nf4_base() -> nn.Module:
        return from_pretrained_quantized(LlamaForCausalLM, str(tmp_path / "float"), "nf4")

    lora = {"r": 4, "target_modules": list(LINEARS)}
    delta = dt.get_delta_model(nf4_base(), dt.LoraConfig(lora_alpha=8, **lora))
    assert len(dt.replace_lora_weights_loftq(delta, tmp_path / "float")) == 14
    from_float = dt.get_delta_model(tiny_llama(), loftq_config(r=4, alpha=8))
    want = _lora_factors(from_float)
    for path, (a, b) in _lora_factors(delta).items():
        torch.testing.assert_close(a, want[path][0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(b, want[path][1], atol=1e-5, rtol=1e-4)

    ours = dt.get_delta_model(nf4_base(), dt.LoraConfig(lora_alpha=4, **lora))
    dt.replace_lora_weights_loftq(ours, tmp_path / "float")
    theirs = peft.get_peft_model(nf4_base(), peft.LoraConfig(lora_alpha=4, **lora))
    with _CudaToCpu():
        peft.replace_lora_weights_loftq(theirs, model_path=str(tmp_path / "float" / "model.safetensors"))
    theirs_factors = _lora_factors(theirs)
    for path, (a, b) in _lora_factors(ours).items():
        torch.testing.assert_close(a, theirs_factors[path][0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(b, theirs_factors[path][1], atol=1e-5, rtol=1e-4)

    before = _lora_factors(ours)
    assert dt.replace_lora_weights_loftq(ours, tmp_path / "float", callback=lambda model, path: False) == []
    assert all(torch.equal(a, before[p][0]) for p, (a, _) in _lora_factors(ours).items())
    with pytest.raises(dt.ConfigError, match="no model.safetensors"):
        dt.replace_lora_weights_loftq(ours, tmp_path)
    with pytest.raises(dt.ConfigError, match="wraps a quantized linear layer"):
        dt.replace_lora_weights_loftq(dt.get_delta_model(tiny_llama(), dt.LoraConfig(**lora)), tmp_path / "float")


def test_loftq_quantization_setting_picks_fp4_and_the_block_size() -> None:
    """``LoftQConfig(loftq_quantization="fp4:32")``: Q is bitsandbytes FP4 in blocks of 32, and Q + s B A fits W
    better than FP4 alone (the alternation does not depend on the code book)."""
    weights = float_weights(tiny_llama())
    config = dt.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights="loftq",
                           loftq_config=dt.LoftQConfig(loftq_bits=4, loftq_iter=2, loftq_quantization="fp4:32"))
    delta = dt.get_delta_model(tiny_llama(), config)
    bases = [m.get_base_layer() for m in layers(delta).values()]
    assert all(b.weight.quant_type == "fp4" and b.weight.blocksize == 32 for b in bases)

    plain = sum(float((w - quantize_roundtrip(w, 32, "fp4")[1]).norm() ** 2) for w in weights.values()) ** 0.5
    assert loftq_error(delta, weights) < 0.95 * plain
