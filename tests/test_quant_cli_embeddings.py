"""``--quantize-embeddings`` on the CLI: a run trained with it records it with the adapter, and eval /
generate / merge reload the base the same way; the flag without ``--quantize`` is refused before any work.

A tiny Llama whose LM head is tied to its token embedding (width 64, one 4-bit block per row chunk), with
the offline word-level tokenizer of :mod:`_train_tiny`. The references are independent of the CLI's loader:
the training run's own final evaluation of the in-memory model (``summary.json``), and a base quantized in
memory with ``dt.quantize(..., embeddings=True)`` carrying the saved adapter.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _train_tiny import VOCAB, save_quantizable_llama, write_pairs

from deltatune.cli import main

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def erun(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("qemb")
    model, pairs = save_quantizable_llama(root / "llama", tied=True), write_pairs(root / "pairs.jsonl", 40)
    assert main(["train", "--model", str(model), "--data", str(pairs), "--max-steps", "3", "--quantize", "nf4",
                 "--quantize-embeddings", "--output-dir", str(root / "run"), "--method-opt",
                 "target_modules=all-linear", "--quiet", "--threads", "1", "--batch-size", "8", "--lr", "2e-2"]) == 0
    return {"model": model, "pairs": pairs, "run": root / "run", "root": root}


def test_run_records_the_quantized_embedding_and_reloads_it(erun: dict) -> None:
    import deltatune as dt
    from deltatune.checkpoint.state import read_fingerprint
    from deltatune.commands.inference import load_for_inference
    from deltatune.quant.embedding import QuantizedEmbedding, TiedQuantizedHead
    from deltatune.quant.load import recorded_quantization

    folder = erun["run"] / "adapter"
    fingerprint = read_fingerprint(folder, json.loads((folder / "adapter_config.json").read_text()))
    assert fingerprint["quantization"] == "embedding-nf4+nf4"
    assert recorded_quantization(folder) == ("nf4", True)
    assert json.loads((erun["run"] / "train_options.json").read_text())["quantize_embeddings"] is True

    loaded = load_for_inference(str(erun["run"]))  # no flags: as recorded
    base = loaded.model.get_base_model()
    assert isinstance(base.model.embed_tokens, QuantizedEmbedding) and base.model.embed_tokens.kind == "nf4"
    assert isinstance(base.lm_head, TiedQuantizedHead) and base.lm_head.embedding is base.model.embed_tokens

    # the same adapter on a base quantized in memory by dt.quantize (not the CLI's loader): equal logits
    from transformers import AutoModelForCausalLM

    ref_base = dt.quantize(AutoModelForCausalLM.from_pretrained(erun["model"], dtype=torch.float32), "nf4",
                           embeddings=True)
    ref = dt.DeltaModel.from_pretrained(ref_base, folder)
    ids = torch.randint(4, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    loaded.model.train()  # bitsandbytes' float32 path on both (its CPU inference kernel computes in bfloat16)
    ref.train()
    with torch.no_grad():
        ours, theirs = loaded.model(input_ids=ids).logits, ref(input_ids=ids).logits
        with ref.disable_adapter():
            plain = ref(input_ids=ids).logits
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert (ours - plain).abs().max() > 1e-3  # the trained adapter is there and changes the output


def test_eval_of_the_run_matches_the_in_memory_model(erun: dict, capsys: pytest.CaptureFixture,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The run's final test loss (its in-memory model, ``summary.json``) equals the evaluation of the saved run.

    Exactly when the reloaded base computes with bitsandbytes' training-layout kernel, as the run did; the CLI's
    ``eval`` loads for inference, where bitsandbytes may pick its bfloat16 CPU kernel (AVX512-BF16 CPUs): within
    1% then (0.2% measured here).
    """
    from deltatune.commands import inference
    from deltatune.train.tasks import load_base_model

    final = json.loads((erun["run"] / "summary.json").read_text())["final"]["test"]
    capsys.readouterr()
    assert main(["eval", str(erun["run"]), "--json", "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["loss"] == pytest.approx(final["loss"], rel=1e-2)
    monkeypatch.setattr(inference, "load_base_model", lambda *a, **k: load_base_model(*a, **{**k, "for_training": True}))
    same_kernel = inference.run_evaluation(str(erun["run"]), None, None, "test", None, 32, None)
    assert same_kernel["loss"] == pytest.approx(final["loss"], rel=1e-6)
    monkeypatch.undo()
    # a float embedding is a different base: the fingerprint check says so
    assert main(["eval", str(erun["run"]), "--quantize", "nf4", "--quiet"]) == 2
    assert "this model is nf4" in capsys.readouterr().err
    assert main(["eval", str(erun["run"]), "--quantize", "nf4", "--quantize-embeddings", "--json", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["loss"] == pytest.approx(result["loss"], rel=1e-6)
    assert main(["generate", str(erun["run"]), "--prompt", "the city is", "--max-new-tokens", "3", "--json"]) == 0
    assert "response" in json.loads(capsys.readouterr().out)


def test_quantize_embeddings_without_quantize_is_refused_before_any_work(
        erun: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    capsys.readouterr()
    train = ["train", "--model", str(erun["model"]), "--data", str(erun["pairs"]), "--max-steps", "1", "--quiet",
             "--quantize-embeddings", "--output-dir", str(tmp_path / "t")]
    commands = [train, ["eval", str(erun["run"]), "--quantize-embeddings"],
                ["predict", str(erun["run"]), "--quantize-embeddings", "--text", "hello"],
                ["generate", str(erun["run"]), "--quantize-embeddings", "--prompt", "hello"],
                ["merge", str(erun["run"]), str(tmp_path / "m"), "--quantize-embeddings"],
                ["serve", "--model", str(erun["model"]), "--quantize-embeddings"]]
    for argv in commands:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("error:") == 1 and "--quantize-embeddings needs --quantize KIND" in err, (argv, err)
    assert not (tmp_path / "t").exists() and not (tmp_path / "m").exists()


@pytest.mark.parametrize("kind", ["nf4", "fp4", "int8", "torchao-int8"])
def test_state_dict_of_a_quantized_embedding_is_the_float_embedding_and_loads_back(kind: str) -> None:
    """A state dict holds the dequantized float matrix (what nn.Embedding saves); loading it re-quantizes to the
    same values (the module's own dequantized rows and codes before the round trip)."""
    from torch import nn

    from deltatune.quant.embedding import QuantizedEmbedding

    weight = torch.randn(70, 128) * torch.linspace(0.05, 3.0, 70)[:, None]
    module = QuantizedEmbedding(nn.Embedding.from_pretrained(weight), kind)
    state = module.state_dict()
    assert list(state) == ["weight"] and state["weight"].dtype == torch.float32
    assert torch.equal(state["weight"], module.dequantized())
    other = QuantizedEmbedding(nn.Embedding.from_pretrained(torch.randn(70, 128)), kind)
    other.load_state_dict(state)
    assert torch.equal(other.dequantized(), module.dequantized()) and torch.equal(other.scales, module.scales)
    if kind != "fp4":  # FP4 has two codes for zero (+0, -0): the same values, possibly other codes
        assert torch.equal(other.weight, module.weight)
    with pytest.raises(RuntimeError, match="a quantized embedding loads the float"):
        other.load_state_dict({"weight": module.weight.data})  # the raw codes are not a saved embedding


def test_save_pretrained_of_a_merged_model_with_a_quantized_embedding_reloads(tmp_path: Path) -> None:
    """merge_and_unload() on an nf4 base with an nf4 embedding/tied head, then transformers' save_pretrained:
    the folder reloads with plain from_pretrained (nf4 linears, float embedding tied to the head) and computes
    the merged model's logits; quantizing its embedding again gives the same codes."""
    from transformers import LlamaForCausalLM

    import deltatune as dt
    from deltatune.quant import quantization, quantize_embeddings
    from deltatune.quant.load import from_pretrained_quantized

    source = save_quantizable_llama(tmp_path / "llama", tied=True)
    base = from_pretrained_quantized(LlamaForCausalLM, str(source), "nf4", embeddings=True)
    codes = base.model.embed_tokens.weight.detach().clone()
    torch.manual_seed(1)
    delta = dt.get_delta_model(base, dt.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    merged = delta.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "merged", device_map="cpu")
    assert quantization(reloaded.model.layers[0].self_attn.q_proj) == "nf4"
    assert type(reloaded.model.embed_tokens) is torch.nn.Embedding
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    ids = torch.randint(4, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    merged.train()  # bitsandbytes' float32 path on both
    reloaded.train()
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-5)
    quantize_embeddings(reloaded, "nf4")
    assert torch.equal(reloaded.model.embed_tokens.weight, codes)


def test_merge_of_the_run_into_its_quantized_base_writes_a_folder_that_reloads(
        erun: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from transformers import AutoModelForCausalLM

    from deltatune.quant import quantization
    from deltatune.quant.load import from_pretrained_quantized

    capsys.readouterr()
    assert main(["merge", str(erun["run"]), str(tmp_path / "merged")]) == 0
    out = capsys.readouterr().out
    assert "max |logit difference|" in out and "note: the quantized token embedding (model.embed_tokens" in out
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", device_map="cpu")
    assert quantization(merged.model.layers[0].mlp.up_proj) == "nf4"
    source = from_pretrained_quantized(AutoModelForCausalLM, str(erun["model"]), "nf4", embeddings=True)
    assert torch.equal(merged.model.embed_tokens.weight, source.model.embed_tokens.dequantized())
