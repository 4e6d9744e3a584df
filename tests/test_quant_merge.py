"""Merging into quantized bases (dequantize, add, re-quantize) and the merge-error report.

References: the float merge of the same adapter on a float model built from the backend's own
dequantized weights, re-quantized with the backend's own API; the logit differences are recomputed
in the test from the two models' outputs.
"""

from __future__ import annotations

import pytest
import torch
from _quant_models import (
    BACKENDS,
    dequantized_by_backend,
    float_reference,
    inputs,
    quantized_llama,
    requantized_by_backend,
    tiny_llama,
)
from test_quant_methods import METHODS, _copy_adapter

import deltatune as dt
from deltatune.merge_check import default_probe
from deltatune.weights import param_tensors

pytestmark = pytest.mark.filterwarnings("ignore")
MERGEABLE = ["lora", "dora", "rslora", "ia3"]


def _storage(model: torch.nn.Module) -> dict[str, list[torch.Tensor]]:
    return {n: [t.clone() for t in param_tensors(p)] for n, p in model.named_parameters()}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", MERGEABLE)
def test_merge_requantizes_the_float_merged_weight_and_unmerge_restores_exactly(method: str, backend: str) -> None:
    torch.manual_seed(2)
    quantized = quantized_llama(backend)
    reference = float_reference(quantized)
    delta = dt.get_delta_model(quantized, METHODS[method]())
    ref_delta = dt.get_delta_model(reference, METHODS[method]())
    _copy_adapter(delta, ref_delta)
    before = _storage(delta)
    delta.merge_adapter()
    ref_delta.merge_adapter()
    layers = dict(delta.base_model.named_modules())
    ref_layers = dict(ref_delta.base_model.named_modules())
    checked = 0
    for path in ("model.layers.0.self_attn.v_proj", "model.layers.1.mlp.down_proj"):
        merged = dequantized_by_backend(layers[path].get_base_layer())
        expected = requantized_by_backend(backend, ref_layers[path].get_base_layer().weight.detach())
        assert torch.allclose(merged, expected, atol=1e-6), (path, (merged - expected).abs().max())
        assert not torch.equal(merged, dequantized_by_backend(quantized_llama(backend).get_submodule(path)))
        checked += 1
    assert checked == 2
    delta.unmerge_adapter()
    after = _storage(delta)
    assert all(all(torch.equal(a, b) for a, b in zip(before[n], after[n])) for n in before)


@pytest.mark.parametrize("backend", ["nf4", "int8", "torchao-int8"])
def test_merge_and_unload_reports_the_logit_error_it_measures(backend: str) -> None:
    torch.manual_seed(3)
    model = quantized_llama(backend)
    delta = dt.get_delta_model(model, METHODS["lora"]())
    probe = default_probe(model)
    delta.eval()
    with torch.no_grad():
        unmerged = delta(**probe).logits
    merged_model = delta.merge_and_unload()
    assert not any(getattr(m, "_delta_base_child", None) for m in merged_model.modules())
    with torch.no_grad():
        merged = merged_model(**probe).logits
    report = delta.merge_report
    diff = (merged - unmerged).abs()
    assert report.max_logit_error == pytest.approx(diff.max().item(), rel=1e-5)
    assert report.mean_logit_error == pytest.approx(diff.mean().item(), rel=1e-5)
    assert report.quantized_layers == 14 and report.probe_tokens == probe["input_ids"].numel()
    assert report.max_logit_error > 0
    assert "max |logit difference|" in str(report)


@pytest.mark.parametrize("backend", ["fp4", "torchao-int8"])
def test_safe_merge_above_the_tolerance_is_refused_and_leaves_the_model_unchanged(backend: str) -> None:
    torch.manual_seed(4)
    delta = dt.get_delta_model(quantized_llama(backend), METHODS["lora"]())
    batch = inputs()
    delta.eval()
    with torch.no_grad():
        before = delta(**batch).logits
    storage = _storage(delta)
    with pytest.raises(dt.MergeError, match="Merge refused.*above max_logit_error=1e-06.*unchanged"):
        delta.merge_and_unload(safe_merge=True, max_logit_error=1e-6)
    assert any(getattr(m, "_delta_base_child", None) for m in delta.base_model.modules())  # still wrapped
    assert all(not w.merged_adapters for w in delta.base_model.modules() if hasattr(w, "merged_adapters"))
    after_storage = _storage(delta)
    assert all(all(torch.equal(a, b) for a, b in zip(storage[n], after_storage[n])) for n in storage)
    with torch.no_grad():
        assert torch.equal(delta(**batch).logits, before)
    # A tolerance above the measured error merges.
    report = delta.verify_merge(max_logit_error=10.0)
    assert 0 < report.max_logit_error <= 10.0


def test_float_merges_report_too() -> None:
    torch.manual_seed(5)
    model = tiny_llama()
    delta = dt.get_delta_model(model, METHODS["lora"]())
    batch = inputs()
    merged = delta.merge_and_unload(probe=batch)
    report = delta.merge_report
    assert report.quantized_layers == 0 and report.probe_tokens == batch["input_ids"].numel()
    assert report.max_logit_error < 1e-4  # float32 rounding only
    assert merged is model


def test_dequantize_then_merge_gives_a_full_precision_model() -> None:
    torch.manual_seed(6)
    quantized = quantized_llama("nf4")
    reference = float_reference(quantized)
    delta = dt.get_delta_model(quantized, METHODS["lora"]())
    ref_delta = dt.get_delta_model(reference, METHODS["lora"]())
    _copy_adapter(delta, ref_delta)
    dt.dequantize(delta.base_model, torch.float32)
    merged = delta.merge_and_unload(probe=inputs())
    assert delta.merge_report.quantized_layers == 0 and delta.merge_report.max_logit_error < 1e-4
    ref_merged = ref_delta.merge_and_unload()
    for (name, p), (_, q) in zip(merged.named_parameters(), ref_merged.named_parameters()):
        assert p.dtype == torch.float32 and torch.allclose(p, q, atol=1e-6), name
