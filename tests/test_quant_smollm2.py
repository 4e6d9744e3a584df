"""Integration: QLoRA-style training on the bundled SmolLM2-135M-Instruct loaded in nf4 (short).

The nf4 base loads through the CLI's loader (transformers' BitsAndBytesConfig), LoRA trains for a few
steps with the base untouched, and a verified merge reports its error and is undone bit for bit.
"""

from __future__ import annotations

import pytest
import torch

import deltatune as dt

pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore")]


def test_smollm2_nf4_lora_trains_and_its_merge_is_measured() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deltatune.bundled import resolve_model_path
    from deltatune.quant import quantization
    from deltatune.quant.load import from_pretrained_quantized
    from deltatune.weights import param_tensors

    path = resolve_model_path("smollm2")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = from_pretrained_quantized(AutoModelForCausalLM, path, "nf4")
    layer = model.model.layers[0]
    assert quantization(layer.self_attn.q_proj) == "nf4" and quantization(model.lm_head) is None
    torch.manual_seed(0)
    delta = dt.get_delta_model(model, dt.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    base_codes = [t.clone() for t in param_tensors(layer.self_attn.q_proj.weight)]
    batch = tokenizer(["The capital of France is Paris.", "Two plus two equals four."], return_tensors="pt",
                      padding=True)
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW([p for p in delta.parameters() if p.requires_grad], lr=3e-3)
    delta.train()
    losses = []
    for _ in range(4):
        loss = delta(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    assert all(torch.equal(a, b) for a, b in zip(base_codes, param_tensors(layer.self_attn.q_proj.weight)))

    probe = {k: v for k, v in batch.items() if k != "labels"}
    delta.eval()
    with torch.no_grad():
        before = delta(**probe).logits
    report = delta.verify_merge(probe=probe)
    assert report.quantized_layers == 2 * model.config.num_hidden_layers
    assert 0 < report.mean_logit_error <= report.max_logit_error < before.abs().max()
    delta.unmerge_adapter()
    with torch.no_grad():
        assert torch.equal(delta(**probe).logits, before)
