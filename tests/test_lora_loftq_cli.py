"""LoftQ from the command line: ``deltatune train --quantize KIND --method-opt init_lora_weights=loftq``.

A tiny Llama folder (widths multiples of 64) trained one step at a learning rate of 1e-9, so the saved adapter is
LoftQ's initialisation (Adam moves each value by about 1e-9). References: the alternation written out with
bitsandbytes' own ``quantize_4bit`` / ``dequantize_4bit`` (block size 32 here) on the float weights read
from the model folder, and plain ``quant(W)`` for the layers LoRA does not target.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _loftq_reference import quantize_roundtrip, reference_loftq
from _train_tiny import save_quantizable_llama, write_pairs

from deltatune.cli import main

pytestmark = pytest.mark.filterwarnings("ignore")
bnb_functional = pytest.importorskip("bitsandbytes.functional")
TARGETS = ("q_proj", "v_proj")
OTHERS = ("k_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("loftq_cli")
    return {"model": save_quantizable_llama(root / "llama"), "pairs": write_pairs(root / "pairs.jsonl", 24)}


def train_args(files: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["train", "--model", str(files["model"]), "--data", str(files["pairs"]), "--max-steps", "1", "--quiet",
            "--threads", "1", "--batch-size", "8", "--max-eval-examples", "4", "--output-dir", str(out), *extra]


@pytest.mark.parametrize(("quantize", "blocksize", "iters"), [("nf4:32", 32, 1), ("nf4", 64, 2)])
def test_loftq_run_fits_the_quantize_kind_and_reloads_for_eval(files: dict, tmp_path: Path, quantize: str,
                                                               blocksize: int, iters: int,
                                                               capsys: pytest.CaptureFixture) -> None:
    """T=1: Q is the usual --quantize load; T=2: the run folder also keeps the LoftQ layers, and the reload
    writes them into the usual load (the fingerprint check passes only if the codes are Q_2's)."""
    from transformers import LlamaForCausalLM

    from deltatune.checkpoint.state import read_fingerprint
    from deltatune.commands.inference import load_for_inference
    from deltatune.train.loftq_base import LOFTQ_BASE_FILE

    run = tmp_path / "run"
    assert main(train_args(files, run, "--quantize", quantize, "--lr", "1e-9", "--method-opt", "r=4",
                           "--method-opt", "lora_alpha=8", "--method-opt", "init_lora_weights=loftq",
                           "--method-opt", f"loftq_config={{loftq_iter: {iters}}}")) == 0
    options = json.loads((run / "train_options.json").read_text())
    assert options["method_options"]["loftq_config"] == {"loftq_bits": 4, "loftq_iter": iters,
                                                         "loftq_quantization": quantize}
    folder = run / "adapter"
    saved = json.loads((folder / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] is True and saved["loftq_config"] == {}  # plain LoRA on disk, as peft saves it
    assert read_fingerprint(folder, saved)["quantization"] == quantize
    assert (folder / LOFTQ_BASE_FILE).is_file() == (iters > 1)

    floats = {p: m.weight.detach() for p, m in LlamaForCausalLM.from_pretrained(files["model"]).named_modules()
              if p.endswith(TARGETS + OTHERS)}
    model = load_for_inference(str(run)).model  # the base reloaded as recorded: nf4, block size 32
    layers = {p: m for p, m in model.get_base_model().named_modules() if p.endswith(TARGETS + OTHERS)}
    assert set(layers) == set(floats)
    for path, layer in layers.items():
        base = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
        assert base.weight.blocksize == blocksize and base.weight.quant_type == "nf4"
        codes, state = base.weight.data, base.weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):  # an inference load may have repacked them
            from deltatune.quant.bnb import _codes_and_state

            codes, state = _codes_and_state(base.weight)
        got_q = bnb_functional.dequantize_4bit(codes, state).float()
        if path.endswith(OTHERS):  # not targeted: the plain quantization of the float weight
            torch.testing.assert_close(got_q, quantize_roundtrip(floats[path], blocksize)[1], atol=1e-6, rtol=0)
            continue
        want_codes, q, a, b = reference_loftq(floats[path], 4, 2.0, iters, blocksize)
        assert torch.equal(codes, want_codes)
        # T=2 reloads by re-quantizing the saved dequant(Q_2): the same codes, while the double-quantised block
        # scales are rounded afresh (relative change up to 7e-4 on this model's large random weights)
        torch.testing.assert_close(got_q, q, atol=1e-6 if iters == 1 else 0, rtol=0 if iters == 1 else 1e-3)
        torch.testing.assert_close(layer.lora_A["default"].weight, a, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(layer.lora_B["default"].weight, b, atol=1e-5, rtol=1e-4)
    capsys.readouterr()
    assert main(["eval", str(run), "--json", "--max-examples", "4"]) == 0
    assert json.loads(capsys.readouterr().out)["perplexity"] > 1


@pytest.mark.parametrize(("extra", "message"), [
    ((), "needs the quantization: add --quantize nf4"),
    (("--quantize", "torchao-int8"), "LoftQ fits a bitsandbytes quantization"),
    (("--quantize", "nf4", "--method", "ia3"), "method 'ia3' has none. Use --method lora"),
    (("--quantize", "nf4", "--method-opt", "loftq_config={loftq_bits: 8}"), "disagrees with --quantize nf4 (4-bit)"),
])
def test_bad_loftq_combinations_fail_before_anything_is_written(files: dict, tmp_path: Path, extra: tuple,
                                                                message: str, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "bad"
    capsys.readouterr()
    assert main(train_args(files, out, "--method-opt", "init_lora_weights=loftq", *extra)) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and message in err, err
    assert not out.exists()


def test_loftq_with_the_embedding_quantized_too(tmp_path: Path) -> None:
    """``--quantize-embeddings`` with LoftQ (T=2, on a Llama whose LM head is tied to its embedding): the
    embedding is stored in nf4 like any --quantize-embeddings run, LoftQ's layers hold the reference ``Q_2``
    codes, and the run reloads for eval (its fingerprint, which hashes the embedding's codes, matches)."""
    from transformers import LlamaForCausalLM

    from deltatune.checkpoint.state import read_fingerprint
    from deltatune.commands.inference import load_for_inference
    from deltatune.quant.embedding import QuantizedEmbedding, TiedQuantizedHead

    model_dir = save_quantizable_llama(tmp_path / "tied", tied=True)
    run, pairs = tmp_path / "run", write_pairs(tmp_path / "pairs.jsonl", 16)
    files = {"model": model_dir, "pairs": pairs}
    assert main(train_args(files, run, "--quantize", "nf4", "--quantize-embeddings", "--lr", "1e-9",
                           "--method-opt", "r=4", "--method-opt", "lora_alpha=8", "--method-opt",
                           "init_lora_weights=loftq", "--method-opt", "loftq_config={loftq_iter: 2}")) == 0
    folder = run / "adapter"
    saved = json.loads((folder / "adapter_config.json").read_text())
    assert read_fingerprint(folder, saved)["quantization"] == "embedding-nf4+nf4"
    model = load_for_inference(str(run)).model
    base = model.get_base_model()
    assert isinstance(base.model.embed_tokens, QuantizedEmbedding) and isinstance(base.lm_head, TiedQuantizedHead)
    weight = LlamaForCausalLM.from_pretrained(model_dir).model.layers[1].self_attn.q_proj.weight.detach()
    layer = base.model.layers[1].self_attn.q_proj
    codes, state = layer.get_base_layer().weight.data, layer.get_base_layer().weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):  # an inference load may have repacked them
        from deltatune.quant.bnb import _codes_and_state

        codes, state = _codes_and_state(layer.get_base_layer().weight)
    want_codes, _, a, b = reference_loftq(weight, 4, 2.0, 2, 64)
    assert torch.equal(codes, want_codes)
    torch.testing.assert_close(layer.lora_A["default"].weight, a, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(layer.lora_B["default"].weight, b, atol=1e-5, rtol=1e-4)


def test_loftq_jobs_and_quantization_setting_are_checked(files: dict, tmp_path: Path) -> None:
    import deltatune as dt
    from deltatune.train.jobs import make_jobs

    shared = {"model": str(files["model"]), "data": str(files["pairs"]), "quantize": "nf4",
              "output_dir": str(tmp_path / "jobs")}
    with pytest.raises(dt.ConfigError, match="jobs of one run share one base"):
        make_jobs(shared, [{"name": "a", "method_options": {"init_lora_weights": "loftq"}}, {"name": "b"}])
    assert not (tmp_path / "jobs").exists()
    assert dt.LoftQConfig(loftq_quantization="nf4:64").quantization() == "nf4"  # the default block size, written plain
    assert dt.LoftQConfig(loftq_bits=8, loftq_quantization="int8").quantization() == "int8"
    with pytest.raises(dt.ConfigError, match="is 8-bit but loftq_bits=4"):
        dt.LoftQConfig(loftq_quantization="int8")
    with pytest.raises(dt.ConfigError, match="torchao's int8 is not supported"):
        dt.LoftQConfig(loftq_bits=8, loftq_quantization="torchao-int8")
    config = dt.LoraConfig(init_lora_weights="loftq", loftq_config=dt.LoftQConfig())
    assert config.loftq_config == {"loftq_bits": 4, "loftq_iter": 1}  # peft's keys only, unless set


def test_loftq_gpt2_run_through_the_cli_reloads_its_conv1d_base(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """GPT-2's Conv1D layers: LoftQ (int8 here) on c_attn, plain int8 on the others; the run folder reloads
    through transformers' BitsAndBytesConfig, which quantizes each Conv1D transposed as LoftQ did, and
    ``merge --dtype float32`` writes Conv1D layers again: transformers reloads it and computes what the
    dequantized, unmerged adapter model computes."""
    import transformers as tf
    from _train_tiny import make_tokenizer

    from deltatune.commands.inference import load_for_inference
    from deltatune.quant import quantization

    torch.manual_seed(0)
    cfg = tf.GPT2Config(vocab_size=len(make_tokenizer()), n_embd=64, n_layer=2, n_head=4, n_positions=128,
                        bos_token_id=2, eos_token_id=3, pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0)
    tf.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "gpt2")
    make_tokenizer().save_pretrained(tmp_path / "gpt2")
    files = {"model": tmp_path / "gpt2", "pairs": write_pairs(tmp_path / "pairs.jsonl", 16)}
    run = tmp_path / "run"
    assert main(train_args(files, run, "--quantize", "int8", "--method-opt", "init_lora_weights=loftq",
                           "--method-opt", "target_modules=[c_attn]", "--method-opt", "r=4")) == 0
    model = load_for_inference(str(run)).model
    attn = model.get_base_model().transformer.h[0].attn
    assert quantization(attn.c_attn.get_base_layer()) == "int8" and quantization(attn.c_proj) == "int8"
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["fan_in_fan_out"] is False
    capsys.readouterr()
    assert main(["eval", str(run), "--json", "--max-examples", "4"]) == 0
    assert json.loads(capsys.readouterr().out)["perplexity"] > 1
    assert main(["merge", str(run), str(tmp_path / "merged"), "--dtype", "float32"]) == 0
    merged = tf.GPT2LMHeadModel.from_pretrained(tmp_path / "merged").eval()
    assert type(merged.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    import deltatune as dt

    unmerged = model.eval()
    dt.dequantize(unmerged.get_base_model())
    ids = torch.randint(4, cfg.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, unmerged(input_ids=ids).logits, atol=1e-4, rtol=0)


def test_loftq_run_model_trains_with_the_4bit_training_forward(files: dict, tmp_path: Path) -> None:
    """The run's model: LoftQ's layers and the plainly quantized ones alike use prepare_for_kbit_training's
    CPU training forward (quant.bnb_training), and only LoRA's factors train."""
    from deltatune.quant.bnb_training import TrainingLinear4bit
    from deltatune.train.loop import build_run
    from deltatune.train.options import build_options

    options = build_options({}, {"model": str(files["model"]), "data": str(files["pairs"]), "quantize": "nf4",
                                 "output_dir": str(tmp_path / "run"),
                                 "method_options": {"init_lora_weights": "loftq", "r": 4}})
    model = build_run(options).model
    four_bit = [m for m in model.modules() if "Linear4bit" in {c.__name__ for c in type(m).__mro__}]
    assert len(four_bit) == 14 and all(type(m) is TrainingLinear4bit for m in four_bit)
    assert {n.split(".")[-3] for n, p in model.named_parameters() if p.requires_grad} == {"lora_A", "lora_B"}
