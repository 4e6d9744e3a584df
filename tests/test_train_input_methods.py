"""Input methods (virtual tokens, prefixes) train on the language-model tasks, where the loop computes
the loss from the logits itself: prepended virtual positions must not be scored."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _train_tiny import save_tiny, write_pairs

from deltatune import all_methods
from deltatune.commands.inference import run_evaluation
from deltatune.train.loop import train
from deltatune.train.options import TrainOptions
from deltatune.train.tasks import IGNORE, loss_sum

INPUT_METHODS = [spec.name for spec in all_methods() if spec.kind == "input"]


def test_loss_skips_prepended_virtual_positions() -> None:
    """Reference: next-token cross-entropy over the last T logits only (the real tokens)."""
    torch.manual_seed(0)
    virtual, batch, length, vocab = 3, 2, 5, 7
    logits = torch.randn(batch, virtual + length, vocab)
    labels = torch.randint(0, vocab, (batch, length))
    labels[0, :2] = IGNORE
    total, terms = loss_sum("instruct", logits, {"labels": labels})
    real = logits[:, virtual:]
    expected = F.cross_entropy(real[:, :-1].reshape(-1, vocab), labels[:, 1:].reshape(-1), ignore_index=IGNORE,
                               reduction="sum")
    assert terms == int((labels[:, 1:] != IGNORE).sum())
    torch.testing.assert_close(total, expected)


@pytest.mark.parametrize("method", INPUT_METHODS)
def test_input_method_trains_on_instruction_pairs(method: str, tmp_path: Path) -> None:
    model = save_tiny("llama", tmp_path / "llama", dropout=0.0)
    pairs = write_pairs(tmp_path / "pairs.jsonl", 40)
    out = tmp_path / "run"
    options = TrainOptions(model=str(model), data=str(pairs), task="instruct", method=method, output_dir=str(out),
                           quiet=True, threads=1, batch_size=8, max_steps=3, lr=1e-2,
                           method_options={"num_virtual_tokens": 4})
    summary = train(options)
    again = run_evaluation(str(out), None, None, "test", None, 16, None)  # the saved adapter, reloaded
    assert again["loss"] == pytest.approx(summary["final"]["test"]["loss"], abs=1e-5)
    base = run_evaluation(None, str(model), str(pairs), "test", "instruct", 16, None)
    assert again["loss"] != pytest.approx(base["loss"], abs=1e-6)  # the virtual tokens changed the model
