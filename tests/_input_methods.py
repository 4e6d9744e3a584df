"""Helpers shared by the input-method tests (prompt tuning, P-tuning, prefix tuning).

Model kinds are those of ``conftest.tiny_model``; each kind has the task type HF peft would use.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

import deltatune as dt

TASK = {
    "bert_seq_cls": "SEQ_CLS", "roberta_seq_cls": "SEQ_CLS", "distilbert_seq_cls": "SEQ_CLS",
    "gpt2_lm": "CAUSAL_LM", "llama_lm": "CAUSAL_LM", "t5": "SEQ_2_SEQ_LM", "bart": "SEQ_2_SEQ_LM",
}
GENERATIVE = ("gpt2_lm", "llama_lm", "t5", "bart")


def labelled(kind: str, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``inputs`` plus labels of the kind's task (class ids, next tokens, or decoder targets)."""
    out = dict(inputs)
    if TASK[kind] == "SEQ_CLS":
        out["labels"] = torch.tensor([0, 2])
    elif TASK[kind] == "CAUSAL_LM":
        out["labels"] = inputs["input_ids"].clone()
    else:
        out["labels"] = out.pop("decoder_input_ids")
    return out


def frozen_snapshot(model: dt.DeltaModel) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


def check_training_step(model: dt.DeltaModel, kind: str, inputs: dict[str, torch.Tensor]) -> None:
    """Forward + backward + one SGD step: only adapter tensors get gradients and move; the rest is untouched."""
    model.train()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("input_deltas.") or ".modules_to_save." in n for n in trainable), sorted(
        trainable)
    before = frozen_snapshot(model)
    start = {n: p.detach().clone() for n, p in trainable.items()}
    loss = model(**labelled(kind, inputs)).loss
    loss.backward()
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable.values())
    torch.optim.SGD(list(trainable.values()), lr=0.1).step()
    for name, tensor in frozen_snapshot(model).items():
        assert torch.equal(tensor, before[name]), name  # bit-identical
    assert any(not torch.equal(p, start[n]) for n, p in trainable.items())
    model.eval()


def main_output(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def check_save_load(model: dt.DeltaModel, fresh: nn.Module, inputs: dict[str, torch.Tensor], folder: Path) -> None:
    """save -> DeltaModel.from_pretrained on a fresh copy of the base model gives identical outputs."""
    model.eval()
    expected = main_output(model, inputs)
    model.save_pretrained(folder)
    loaded = dt.DeltaModel.from_pretrained(fresh, folder)
    torch.testing.assert_close(main_output(loaded, inputs), expected, atol=1e-6, rtol=0)


def special_ids(model: nn.Module) -> list[int]:
    """Pad / bos / eos / decoder-start ids: suppressed so tiny random models keep generating real tokens."""
    config = model.config
    names = ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id")
    return sorted({i for i in (getattr(config, n, None) for n in names) if isinstance(i, int) and 0 <= i < 100})


def greedy(model: nn.Module, inputs: dict[str, torch.Tensor], new: int = 4, **options: object) -> torch.Tensor:
    """``model.generate`` greedily (with its KV cache), ``new`` tokens, special tokens suppressed."""
    kwargs = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
    kwargs.update(max_new_tokens=new, do_sample=False, num_beams=1, pad_token_id=0, suppress_tokens=special_ids(model),
                  forced_eos_token_id=None, forced_bos_token_id=None)
    kwargs.update(options)
    with torch.no_grad():
        return model.generate(**kwargs)


def reference_greedy(model: nn.Module, input_ids: torch.Tensor, encoder_decoder: bool, new: int = 4,
                     suppress: bool = True) -> torch.Tensor:
    """Greedy decoding by hand: the whole sequence through ``model.forward`` at every step, no cache.

    Output layout as ``generate``: input + new tokens (decoder-only), decoder start + new tokens (seq2seq).
    ``suppress`` masks the special tokens as :func:`greedy` does.
    """
    batch = input_ids.shape[0]
    start = model.config.decoder_start_token_id if encoder_decoder else 0
    seq = torch.full((batch, 1), start, dtype=torch.long) if encoder_decoder else input_ids
    with torch.no_grad():
        for _ in range(new):
            if encoder_decoder:
                logits = model(input_ids=input_ids, decoder_input_ids=seq).logits[:, -1]
            else:
                logits = model(input_ids=seq).logits[:, -1]
            if suppress:
                logits[:, special_ids(model)] = float("-inf")
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
    return seq
