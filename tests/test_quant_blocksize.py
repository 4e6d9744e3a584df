"""4-bit block size: ``dt.quantize(model, "nf4", blocksize=32)``, ``from_pretrained_quantized(..., "nf4:32")`` and
``--quantize nf4:32`` on the CLI.

The reference for the stored weight is bitsandbytes' own ``quantize_4bit`` / ``dequantize_4bit`` called in the
test on the float weight. Fingerprints must tell block sizes apart (an adapter trained on an nf4:32 base is refused
on the default nf4 base, with both named), and a block size bitsandbytes cannot do is refused before any work.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _quant_models import inputs, tiny_llama
from _train_tiny import save_quantizable_llama, write_pairs
from torch import nn

import deltatune as dt
from deltatune.cli import main
from deltatune.quant import QuantizationError

pytestmark = pytest.mark.filterwarnings("ignore")


def _bnb_roundtrip(weight: torch.Tensor, blocksize: int) -> torch.Tensor:
    import bitsandbytes.functional as F

    codes, state = F.quantize_4bit(weight, blocksize=blocksize, compress_statistics=True, quant_type="nf4")
    return F.dequantize_4bit(codes, state).float()  # (out, in)


def test_layers_store_the_block_size_and_dequantize_as_bitsandbytes() -> None:
    from deltatune.weights import model_quantization, read_weight

    floats = {p: m.weight.detach().clone() for p, m in tiny_llama().named_modules() if type(m) is nn.Linear}
    errors: dict[int, float] = {}
    for blocksize in (32, 64, 128):
        model = dt.quantize(tiny_llama(), "nf4", blocksize=blocksize)
        layer = model.model.layers[1].mlp.down_proj
        assert layer.weight.blocksize == blocksize and layer.weight.quant_state.blocksize == blocksize
        assert layer.weight.quant_state.absmax.numel() == floats["model.layers.1.mlp.down_proj"].numel() // blocksize
        for path, weight in floats.items():
            if path == "lm_head":
                continue
            assert torch.equal(read_weight(model.get_submodule(path)), _bnb_roundtrip(weight, blocksize)), path
        w = floats["model.layers.0.mlp.up_proj"]
        errors[blocksize] = float((read_weight(model.model.layers[0].mlp.up_proj) - w).abs().mean())
        assert model_quantization(model) == ("nf4" if blocksize == 64 else f"nf4:{blocksize}")
        before = read_weight(model.model.layers[0].self_attn.q_proj)  # (64, 64): blocks of 128 straddle rows
        with torch.no_grad():
            logits = model.eval()(**inputs()).logits  # an inference call may repack 4-bit weights for the CPU kernel
        assert torch.isfinite(logits).all()
        assert model_quantization(model) == ("nf4" if blocksize == 64 else f"nf4:{blocksize}")
        after = read_weight(model.model.layers[0].self_attn.q_proj)  # repacked: block scales rounded to bfloat16
        assert torch.allclose(after, before, rtol=1e-2, atol=1e-6)
    assert errors[32] < errors[64] < errors[128]  # smaller blocks: a scale closer to each block's largest value


def test_the_spec_string_and_the_keyword_are_the_same_setting() -> None:
    a = dt.quantize(tiny_llama(), "nf4:32")
    b = dt.quantize(tiny_llama(), "nf4", blocksize=32)
    assert torch.equal(a.model.layers[0].self_attn.q_proj.weight.data, b.model.layers[0].self_attn.q_proj.weight.data)
    assert a.model.layers[0].self_attn.q_proj.weight.blocksize == 32


def test_fingerprint_tells_block_sizes_apart(tmp_path: Path) -> None:
    delta = dt.get_delta_model(dt.quantize(tiny_llama(), "nf4", blocksize=32),
                               dt.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    delta.save_pretrained(tmp_path)
    dt.DeltaModel.from_pretrained(dt.quantize(tiny_llama(), "nf4:32"), tmp_path)  # same block size: loads
    with pytest.raises(dt.BaseModelMismatchError, match="adapter was trained on a nf4:32 base, this model is nf4\\b"):
        dt.DeltaModel.from_pretrained(dt.quantize(tiny_llama(), "nf4"), tmp_path)
    with pytest.raises(dt.BaseModelMismatchError, match="this model is nf4:128"):
        dt.DeltaModel.from_pretrained(dt.quantize(tiny_llama(), "nf4", blocksize=128), tmp_path)


@pytest.mark.parametrize(("kind", "blocksize", "message"), [
    ("nf4", 48, "Block size 48 is not supported.*32, 64, 128"),
    ("nf4:16", None, "Block size 16 is not supported"),
    ("nf4:x", None, "must be a whole number"),
    ("nf4:32", 64, "disagree"),
    ("int8", 32, "int8 has no block size"),
    ("torchao-int8:32", None, "torchao-int8 has no block size"),
    ("nf5", None, "Unknown quantization 'nf5'"),
])
def test_bad_block_size_is_refused_before_any_work(tmp_path: Path, kind: str, blocksize: int | None,
                                                   message: str) -> None:
    from transformers import AutoModelForCausalLM

    from deltatune.quant.load import from_pretrained_quantized

    model = tiny_llama()
    before = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    with pytest.raises(QuantizationError, match=message):
        dt.quantize(model, kind, blocksize=blocksize)
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear  # untouched
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, before)
    with pytest.raises(QuantizationError, match=message):  # refused before the (missing) folder is read
        from_pretrained_quantized(AutoModelForCausalLM, str(tmp_path / "no-such-model"), kind, blocksize=blocksize)


def test_cli_refuses_a_bad_block_size_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", str(tmp_path / "no-run"), "--quantize", "nf4:48"])
    assert exit_info.value.code == 2 and "Block size 48 is not supported" in capsys.readouterr().err
    code = main(["train", "--model", str(tmp_path / "no-model"), "--data", str(tmp_path / "no.jsonl"),
                 "--quantize", "nf4:48", "--output-dir", str(out), "--quiet"])
    assert code == 2 and "Block size 48 is not supported" in capsys.readouterr().err
    assert not out.exists()


def test_cli_run_records_the_block_size_and_eval_reloads_it(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from transformers import AutoModelForCausalLM

    from deltatune.checkpoint.state import read_fingerprint
    from deltatune.commands.inference import load_for_inference
    from deltatune.quant.load import from_pretrained_quantized, recorded_quantization

    model, pairs = save_quantizable_llama(tmp_path / "llama"), write_pairs(tmp_path / "pairs.jsonl", 24)
    assert main(["train", "--model", str(model), "--data", str(pairs), "--max-steps", "2", "--quantize", "nf4:32",
                 "--output-dir", str(tmp_path / "run"), "--method-opt", "target_modules=all-linear", "--quiet",
                 "--threads", "1", "--batch-size", "8", "--lr", "2e-2"]) == 0
    folder = tmp_path / "run" / "adapter"
    fingerprint = read_fingerprint(folder, json.loads((folder / "adapter_config.json").read_text()))
    assert fingerprint["quantization"] == "nf4:32"
    assert recorded_quantization(folder) == ("nf4:32", False)
    loaded = load_for_inference(str(tmp_path / "run"))  # no flags: reloaded as recorded (fingerprint check passes)
    q_proj = loaded.model.get_base_model().model.layers[0].self_attn.q_proj
    assert q_proj.base_layer.weight.blocksize == 32
    reference = dt.quantize(AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32), "nf4", blocksize=32)
    assert torch.equal(q_proj.base_layer.weight.data, reference.model.layers[0].self_attn.q_proj.weight.data)
    assert from_pretrained_quantized(AutoModelForCausalLM, str(model), "nf4", blocksize=32).model.layers[0] \
        .self_attn.q_proj.weight.blocksize == 32
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run"), "--quantize", "nf4"]) == 2  # the default block size: another base
    assert "adapter was trained on a nf4:32 base, this model is nf4" in capsys.readouterr().err
