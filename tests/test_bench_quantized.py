"""The quantized-base benchmark's instruments: stored weight bytes and the ratio table (no training)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _quant_models import quantized_llama, tiny_llama

from bench.quantized import report, weight_bytes

pytestmark = pytest.mark.filterwarnings("ignore")


def test_weight_bytes_counts_values_and_scales_as_stored() -> None:
    float_model, nf4 = tiny_llama(), quantized_llama("nf4")
    linear = [m for n, m in float_model.named_modules() if n.startswith("model.layers") and isinstance(m, torch.nn.Linear)]
    linear_fp32 = sum(m.weight.numel() * 4 for m in linear)
    n_values = linear_fp32 // 4
    saved = weight_bytes(float_model) - weight_bytes(nf4)
    # nf4: half a byte per value, plus one 8-bit scale per 64-value block and a float32 scale per 256 blocks
    nf4_linear = n_values / 2 + n_values / 64 + 4 * n_values / (64 * 256)
    assert saved == pytest.approx(linear_fp32 - nf4_linear, rel=0.01)


def test_report_gives_ratios_to_the_float32_runs_and_deltatune_over_peft() -> None:
    row = {"ok": True, "weight_mb": 100.0, "peak_total_mb": 400.0, "peak_mb": 200.0, "step_s": 1.0, "base_ppl": 12.0,
           "test_ppl": 10.0, "merge_max": 0.0, "merge_mean": 0.0}
    results = {"float32": row, "float32-ckpt": row | {"peak_total_mb": 200.0},
               "nf4": row | {"weight_mb": 30.0, "peak_total_mb": 100.0, "step_s": 1.5, "untrained_ppl": 12.0},
               "nf4-loftq": row | {"weight_mb": 30.0, "peak_total_mb": 100.0, "step_s": 1.5, "untrained_ppl": 11.0},
               "peft-nf4": row | {"weight_mb": 30.0, "peak_total_mb": 125.0, "step_s": 2.0},
               "int8": {"ok": False, "error": "boom"}}
    text = report(results, {"steps": 1})
    # each row says its settings (checkpointing, embedding), then ratios to float32 and to float32 + checkpointing
    assert "| nf4 | on | float32 | 30.0 | 0.30x | 100 | 0.25x | 0.50x | 200 | 1.500 | 1.50x | 12.000 | 12.000 | 10.000 |" in text
    # LoftQ's row: the untrained model (adapter on) is Q + s B A, no longer the base alone
    assert "| nf4-loftq | on | float32 | 30.0 | 0.30x | 100 | 0.25x | 0.50x | 200 | 1.500 | 1.50x | 12.000 | 11.000 |" in text
    assert "| peft-nf4 | on | float32 | 30.0 | 0.30x | 125 | 0.31x | 0.62x | 200 | 2.000 | 2.00x | 12.000 | - |" in text
    assert "| float32 | off | float32 | 100.0 | 1.00x | 400 | 1.00x | 2.00x |" in text
    assert "| int8 | on | float32 | failed: boom |" in text
    assert "deltatune/peft (nf4, both checkpointed): step time 0.75x, peak training memory 0.80x" in text


def test_nf4_nockpt_row_is_uncheckpointed_and_the_report_gives_the_trade_off() -> None:
    row = {"ok": True, "weight_mb": 30.0, "peak_total_mb": 100.0, "peak_mb": 50.0, "step_s": 1.5, "base_ppl": 12.0,
           "test_ppl": 10.0, "merge_max": 0.0, "merge_mean": 0.0}
    results = {"float32": row | {"weight_mb": 100.0, "peak_total_mb": 400.0, "step_s": 1.0},
               "nf4": row, "nf4-nockpt": row | {"peak_total_mb": 300.0, "step_s": 1.2}}
    text = report(results, {"steps": 1})
    assert "| nf4-nockpt | off | float32 | 30.0 | 0.30x | 300 | 0.75x | - | 50 | 1.200 | 1.20x |" in text
    assert "nf4 without / with gradient checkpointing: step time 0.80x, peak training memory 3.00x" in text


@pytest.mark.parametrize(("config", "checkpointing"), [("nf4", True), ("nf4-nockpt", False)])
def test_adapt_turns_checkpointing_on_or_off_as_the_row_says(config: str, checkpointing: bool) -> None:
    from bench.quantized import _adapt

    model = _adapt(quantized_llama("nf4"), config)
    assert model.get_base_model().is_gradient_checkpointing is checkpointing
    import bitsandbytes as bnb

    four_bit = [m for m in model.modules() if "Linear4bit" in type(m).__name__]
    assert four_bit and all(isinstance(m, bnb.nn.Linear4bit) for m in four_bit)  # the training subclass counts
