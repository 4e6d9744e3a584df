"""``deltatune demo`` on the real bundled MiniLM and TREC data, shortened to a few steps."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from deltatune.cli import main
from deltatune.train.data.builtin import load_builtin


@pytest.mark.integration
def test_demo_trains_minilm_and_compares_with_baselines(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "demo"
    code = main(["demo", "--output-dir", str(out), "--max-steps", "6", "--max-train-examples", "96",
                 "--max-eval-examples", "64", "--quiet"])
    printed = capsys.readouterr().out
    assert code == 0
    test = load_builtin("trec", "test")[:64]
    train = load_builtin("trec", "train")[:96]
    majority = Counter(r["label"] for r in train).most_common(1)[0][0]
    expected = sum(r["label"] == majority for r in test) / len(test)
    assert f"majority class ({majority})" in printed
    assert f"{expected:8.3f}" in printed.splitlines()[1]
    assert "untrained model" in printed and "fine-tuned, 6 steps" in printed
    assert "trainable parameters:" in printed and "adapter size:" in printed
    summary = json.loads((out / "summary.json").read_text())
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 32 and config["lora_alpha"] == 64  # the default recipe (LoraConfig.recommended)
    assert config["modules_to_save"] == ["classifier"]
    # LoRA r=32 on every linear layer: per layer q, k, v, attention output (384 -> 384), intermediate
    # (384 -> 1536), output (1536 -> 384); the pooler (384 -> 384); plus the 6-class head.
    r = 32
    per_layer = 4 * r * (384 + 384) + 2 * r * (384 + 1536)
    assert summary["trainable_params"] == 6 * per_layer + r * (384 + 384) + (384 * 6 + 6)
    assert f"{summary['final']['test']['accuracy']:8.3f}" in printed
    for name in ("report.md", "loss.png", "metric.png"):
        assert (out / name).is_file()
    # The adapter re-evaluated through 'deltatune eval' gives the demo's number.
    code = main(["eval", str(out), "--max-examples", "64", "--json"])
    assert code == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == pytest.approx(summary["final"]["test"]["accuracy"])
