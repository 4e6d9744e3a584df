"""Adapter-only saves of a model with a quantized token embedding never dequantize the vocabulary matrix.

A :class:`~deltatune.quant.embedding.QuantizedEmbedding` writes its dequantized float matrix in ``state_dict()``
(what a whole-model save needs). deltatune's adapter saves collect the adapter's own tensors from the wrappers
instead of filtering the whole model's state dict, so they must not pay that dequantization. Counted by wrapping
:func:`deltatune.quant.embedding.dequantize_rows`; the whole-model ``state_dict()`` is the positive control. The
saved tensors are checked against the LoRA parameters read off the modules and HF peft's key names.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import deltatune as dt
from deltatune.quant import embedding as quant_embedding
from deltatune.quant.embedding import QuantizedEmbedding

pytestmark = pytest.mark.filterwarnings("ignore")
VOCAB = 200
TARGETS = ["q_proj", "v_proj"]


def tied_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture
def count_dequantizations(monkeypatch: pytest.MonkeyPatch) -> Callable[[Callable[[], object]], int]:
    """``count(fn)``: how many times ``fn()`` dequantized rows of a quantized embedding."""
    calls = [0]
    original = quant_embedding.dequantize_rows

    def counting(*args: object, **kwargs: object) -> torch.Tensor:
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(quant_embedding, "dequantize_rows", counting)

    def count(fn: Callable[[], object]) -> int:
        calls[0] = 0
        fn()
        return calls[0]

    return count


def _lora_tensors(delta: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors read off the modules, keyed as HF peft names them on disk (adapter name removed)."""
    return {"base_model.model." + name.replace(".default", ""): param.detach()
            for name, param in delta.get_base_model().named_parameters() if "lora_" in name}


def test_adapter_saves_on_a_quantized_embedding_model_do_not_dequantize(
    tmp_path: Path, count_dequantizations: Callable[[Callable[[], object]], int],
) -> None:
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model, get_peft_model_state_dict

    from deltatune.peft_compat import get_peft_model_state_dict as dt_state_dict
    from deltatune.train.resume import save_checkpoint

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = dt.quantize(tied_llama(), "nf4", embeddings=True)
    assert isinstance(model.get_input_embeddings(), QuantizedEmbedding)
    assert count_dequantizations(model.state_dict) == 1  # the positive control: a whole-model state dict pays it
    torch.manual_seed(1)
    delta = dt.get_delta_model(model, dt.LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False))

    assert count_dequantizations(lambda: delta.save_pretrained(tmp_path / "delta")) == 0
    assert count_dequantizations(lambda: delta.get_base_model().save_pretrained(tmp_path / "wrapped")) == 0
    assert count_dequantizations(lambda: dt_state_dict(delta)) == 0
    optimizer = torch.optim.AdamW([p for p in delta.parameters() if p.requires_grad])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    assert count_dequantizations(lambda: save_checkpoint(tmp_path / "run", 1, delta, optimizer, scheduler, {}, 1)) == 0

    # the files hold exactly the adapter's tensors, under HF peft's keys (peft on the float model as reference)
    expected = _lora_tensors(delta)
    peft_keys = set(get_peft_model_state_dict(get_peft_model(tied_llama(), PeftLoraConfig(r=4, target_modules=TARGETS))))
    assert set(expected) == peft_keys and len(peft_keys) == 8  # 2 layers x 2 targets x (A, B)
    for folder in ("delta", "wrapped"):
        saved = load_file(tmp_path / folder / "adapter_model.safetensors")
        assert set(saved) == peft_keys
        for key, tensor in saved.items():
            assert torch.equal(tensor, expected[key]), key
