"""``--quantize`` on the CLI: train / eval / generate / merge on a quantized base, and bad input.

A tiny Llama folder (dimensions multiples of 64, as bitsandbytes' CPU kernels want) with the offline
word-level tokenizer of :mod:`_train_tiny`. The merged model written by ``merge --dtype float32`` is
checked against the quantized adapter model it came from (dequantized in the test).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from _quant_models import count_dequantizations
from _train_tiny import VOCAB, save_quantizable_llama, write_pairs

from deltatune.cli import main

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def qrun(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("qcli")
    model, pairs = save_quantizable_llama(root / "llama"), write_pairs(root / "pairs.jsonl", 40)
    assert main(["train", "--model", str(model), "--data", str(pairs), "--max-steps", "3", "--quantize", "nf4",
                 "--output-dir", str(root / "run"), "--method-opt", "target_modules=all-linear", "--quiet",
                 "--threads", "1", "--batch-size", "8", "--lr", "2e-2"]) == 0
    return {"model": model, "pairs": pairs, "run": root / "run", "root": root}


def test_quantized_run_records_its_quantization_and_eval_reuses_it(qrun: dict, capsys: pytest.CaptureFixture) -> None:
    from deltatune.checkpoint.state import read_fingerprint

    folder = qrun["run"] / "adapter"
    fingerprint = read_fingerprint(folder, json.loads((folder / "adapter_config.json").read_text()))
    assert fingerprint["quantization"] == "nf4"
    capsys.readouterr()
    assert main(["eval", str(qrun["run"]), "--json"]) == 0  # loads the base as nf4 (fingerprint check passes)
    result = json.loads(capsys.readouterr().out)
    assert result["examples"] > 0 and result["perplexity"] > 1
    assert main(["eval", str(qrun["run"]), "--quantize", "int8"]) == 2
    assert "quantization: adapter was trained on a nf4 base, this model is int8" in capsys.readouterr().err
    assert main(["generate", str(qrun["run"]), "--prompt", "the city is", "--max-new-tokens", "3", "--json"]) == 0
    assert "response" in json.loads(capsys.readouterr().out)


def test_merge_dtype_float32_writes_a_full_precision_model_equal_to_the_adapter(
        qrun: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from transformers import AutoModelForCausalLM

    import deltatune as dt
    from deltatune.train.tasks import load_base_model

    capsys.readouterr()
    assert main(["merge", str(qrun["run"]), str(tmp_path / "merged"), "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert "merge error on a probe batch" in out and "float weights" in out  # merged in float after dequantizing
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    assert getattr(merged.config, "quantization_config", None) is None
    adapter = dt.DeltaModel.from_pretrained(load_base_model("instruct", str(qrun["model"]), quantize="nf4"),
                                         qrun["run"] / "adapter")
    adapter.train()  # bitsandbytes' float32 path (its CPU inference kernel computes in bfloat16)
    ids = torch.randint(4, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, adapter(input_ids=ids).logits, atol=1e-4)


def test_merge_into_the_quantized_base_reports_and_reloads(qrun: dict, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    from transformers import AutoModelForCausalLM

    from deltatune.quant import quantization

    capsys.readouterr()
    assert main(["merge", str(qrun["run"]), str(tmp_path / "merged4")]) == 0
    out = capsys.readouterr().out
    assert "14 quantized layers re-quantized" in out and "max |logit difference|" in out
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged4", device_map="cpu")
    assert quantization(merged.model.layers[0].self_attn.q_proj) == "nf4"


def test_bad_quantize_input_fails_before_anything_is_written(qrun: dict, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    common = ["train", "--model", str(qrun["model"]), "--data", str(qrun["pairs"]), "--max-steps", "1", "--quiet"]
    capsys.readouterr()
    assert main([*common, "--quantize", "nf4", "--fsdp", "--output-dir", str(tmp_path / "a")]) == 2
    assert "--quantize cannot be combined with --fsdp" in capsys.readouterr().err
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a))
    assert main([*common, "--quantize", "torchao-int8", "--output-dir", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "pip install 'torchao>=0.10'" in err
    assert main([*common, "--quantize", "int4", "--output-dir", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err  # one check (parse_kind): what was wrong, and every kind to choose from
    assert err.count("error:") == 1
    assert ("quantize: Unknown quantization 'int4'; choose one of nf4, fp4, int8, torchao-int8 (nf4 and fp4 also "
            "as KIND:BLOCKSIZE, e.g. nf4:32)") in err
    assert main([*common, "--quantize", "nf4:7", "--output-dir", str(tmp_path / "d")]) == 2
    assert "quantize: Block size 7 is not supported" in capsys.readouterr().err
    assert not any((tmp_path / d).exists() for d in "abcd")


def test_serve_loads_a_quantized_base_and_decodes_a_mixed_batch(qrun: dict) -> None:
    """``serve --quantize nf4`` with the nf4-trained adapter: one decoding step of a batch whose rows use the
    adapter and the base alone equals each row run on its own (train-mode float32 kernel, see above)."""
    pytest.importorskip("fastapi")
    from deltatune.cli import build_parser
    from deltatune.quant import quantization
    from deltatune.serve.mixed_forward import BASE, prefill_rows
    from deltatune.serve.server import build_server

    args = build_parser().parse_args(["serve", "--model", str(qrun["model"]), "--quantize", "nf4",
                                      "--adapter", f"qa={qrun['run']}"])
    server = build_server(args)
    model = server.registry.model
    assert quantization(model.base_model.model.model.layers[0].mlp.down_proj.get_base_layer()) == "nf4"
    model.train()
    ids = torch.randint(4, VOCAB, (2, 5), generator=torch.Generator().manual_seed(1))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        logits, _, _ = prefill_rows(model, ["qa", BASE], inputs)
        alone = model(input_ids=ids[:1]).logits[:, -1]
        with model.disable_adapter():
            base = model(input_ids=ids).logits[:, -1]
    assert torch.allclose(logits[0], alone[0], atol=1e-5) and torch.allclose(logits[1], base[1], atol=1e-5)
    assert (alone[0] - base[0]).abs().max() > 1e-3  # the adapter does change row 0


def test_training_loads_the_quantized_base_so_evaluations_between_steps_leave_gradients_intact(qrun: dict) -> None:
    """On AVX512-BF16 CPUs bitsandbytes re-lays-out a 4-bit weight at its first inference call, after which its
    training path computes other gradients; the training loops load the base with ``for_training=True``, so
    gradients after an evaluation equal those of a model that was never evaluated."""
    from bitsandbytes.functional import has_avx512bf16

    import deltatune as dt
    from deltatune.train.tasks import load_base_model

    if not has_avx512bf16():
        pytest.skip("bitsandbytes re-lays-out 4-bit weights only on CPUs with AVX512-BF16")
    batch = {"input_ids": torch.randint(4, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))}

    def grads(evaluate_first: bool) -> torch.Tensor:
        base = load_base_model("causal_lm", str(qrun["model"]), quantize="nf4", for_training=True)
        torch.manual_seed(0)
        model = dt.get_delta_model(base, dt.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
        if evaluate_first:
            model.eval()
            with torch.no_grad():
                model(**batch)
        model.train()
        model(**batch, labels=batch["input_ids"]).loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])

    assert torch.equal(grads(True), grads(False))


def test_training_with_gradient_checkpointing_flags_the_layers_so_backward_dequantizes_nothing(
        qrun: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--quantize nf4 --gradient-checkpointing``: the training loop turns checkpointing on after the base was
    readied, and flags the new checkpointed layers (quant.bnb_training), so one step dequantizes each 4-bit
    weight twice, in forward and recompute, where unflagged layers would dequantize it a third time in backward."""
    pytest.importorskip("bitsandbytes")
    from deltatune.quant import bnb_training
    from deltatune.train.distributed.runtime import Distributed
    from deltatune.train.loop import _setup_speed_options, build_run
    from deltatune.train.options import build_options

    options = build_options({}, {"model": str(qrun["model"]), "data": str(qrun["pairs"]), "quantize": "nf4",
                                 "gradient_checkpointing": True, "output_dir": str(tmp_path / "run"),
                                 "method_options": {"r": 4, "target_modules": "all-linear"}})
    run = build_run(options)
    module = _setup_speed_options(run, Distributed())
    layers = run.model.get_base_model().model.layers
    assert all(isinstance(layer.__dict__.get("_gradient_checkpointing_func"), bnb_training._FlaggedCheckpoint)
               for layer in layers)
    calls = count_dequantizations(monkeypatch)
    ids = torch.randint(4, VOCAB, (2, 7), generator=torch.Generator().manual_seed(2))
    module.train()
    loss = module(input_ids=ids, labels=ids).loss
    in_forward = calls[0]
    loss.backward()
    assert in_forward > 0 and calls[0] == 2 * in_forward
