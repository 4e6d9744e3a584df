"""``deltatune export ADAPTER --format gguf``: a GGUF LoRA file as llama.cpp reads it.

The file is read back with the ``gguf`` package and checked against the adapter: metadata keys, tensor
names (written out here, in llama.cpp's naming), the shapes llama.cpp checks against the base weight, and
values (A as is; B with the query/key rows reordered per head, by the rule written in this test). One
integration test checks that reordering against the bundled SmolLM2 GGUF file itself.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import safetensors.torch
import torch

import deltatune as dt
from deltatune.cli import main

gguf = pytest.importorskip("gguf")
tf = pytest.importorskip("transformers")
from _tiny_lm import save_tiny_lm

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GGUF_NAME = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
             "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
HEADS = {"q_proj": 4, "k_proj": 2}  # the tiny Llama: 4 query heads, 2 key/value heads, head size 8


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    return save_tiny_lm(tmp_path_factory.mktemp("tiny_lm"))


def saved(base_dir: Path, folder: Path, **options) -> Path:
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_pretrained(base_dir)
    config = {"r": 4, "lora_alpha": 8, "target_modules": ALL, "init_lora_weights": False} | options
    dt.get_delta_model(model, dt.LoraConfig(**config)).save_pretrained(folder)
    return folder


def llama_cpp_rows(b: torch.Tensor, heads: int) -> torch.Tensor:
    """Reference: within each head of size d, llama.cpp's row 2i is HF's row i and row 2i+1 is HF's row d/2+i."""
    d = b.shape[0] // heads
    out = torch.empty_like(b)
    for h in range(heads):
        for i in range(d // 2):
            out[h * d + 2 * i] = b[h * d + i]
            out[h * d + 2 * i + 1] = b[h * d + d // 2 + i]
    return out


def read(path: Path) -> tuple[dict, dict]:
    reader = gguf.GGUFReader(path)
    fields = {name: field.contents() for name, field in reader.fields.items()}
    tensors = {t.name: t for t in reader.tensors}
    return fields, tensors


def test_gguf_names_shapes_alpha_and_values(base_dir, tmp_path) -> None:
    folder = saved(base_dir, tmp_path / "adapter")
    out = tmp_path / "adapter.gguf"
    assert main(["export", str(folder), "--format", "gguf", "--out", str(out)]) == 0
    fields, tensors = read(out)
    assert fields["general.architecture"] == "llama" and fields["general.type"] == "adapter"
    assert fields["adapter.type"] == "lora" and fields["adapter.lora.alpha"] == 8.0
    assert fields["general.base_model.count"] == 1 and fields["general.base_model.0.name"] == str(base_dir.resolve())
    weights = safetensors.torch.load_file(folder / "adapter_model.safetensors")
    expected_names = {f"blk.{i}.{GGUF_NAME[m]}.weight.lora_{ab}" for i in range(2) for m in ALL for ab in "ab"}
    assert set(tensors) == expected_names
    base = tf.AutoModelForCausalLM.from_pretrained(base_dir).state_dict()
    for layer in range(2):
        for module in ALL:
            path = f"model.layers.{layer}.{'self_attn' if module.endswith(('q_proj', 'k_proj', 'v_proj', 'o_proj')) else 'mlp'}.{module}"
            a = weights[f"base_model.model.{path}.lora_A.weight"]
            b = weights[f"base_model.model.{path}.lora_B.weight"]
            ta, tb = tensors[f"blk.{layer}.{GGUF_NAME[module]}.weight.lora_a"], tensors[f"blk.{layer}.{GGUF_NAME[module]}.weight.lora_b"]
            out_f, in_f = base[f"{path}.weight"].shape
            # What llama.cpp checks: a.ne[0] == W.ne[0] (in), b.ne[1] == W.ne[1] (out), a.ne[1] == b.ne[0] (r).
            assert list(ta.shape) == [in_f, 4] and list(tb.shape) == [4, out_f]
            torch.testing.assert_close(torch.from_numpy(ta.data.copy()).reshape(a.shape), a, atol=0, rtol=0)
            want_b = llama_cpp_rows(b, HEADS[module]) if module in HEADS else b
            torch.testing.assert_close(torch.from_numpy(tb.data.copy()).reshape(b.shape), want_b, atol=0, rtol=0)
            assert b.abs().sum() > 0  # a non-zero adapter: the comparison means something


def test_rslora_alpha_keeps_the_scale(base_dir, tmp_path) -> None:
    folder = saved(base_dir, tmp_path / "adapter", target_modules=["v_proj"], use_rslora=True)
    out = tmp_path / "a.gguf"
    assert main(["export", str(folder), "--format", "gguf", "--out", str(out)]) == 0
    alpha = read(out)[0]["adapter.lora.alpha"]
    assert alpha / 4 == pytest.approx(8 / math.sqrt(4))  # llama.cpp's alpha/r equals rsLoRA's alpha/sqrt(r)


@pytest.mark.parametrize(("options", "message"), [
    ({"use_dora": True}, "DoRA"),
    ({"rank_pattern": {"q_proj": 2}}, "rank_pattern"),
    ({"bias": "lora_only"}, "trains biases"),
])
def test_refuses_what_llama_cpp_cannot_express(base_dir, tmp_path, capsys, options, message) -> None:
    folder = saved(base_dir, tmp_path / "adapter", **options)
    out = tmp_path / "a.gguf"
    assert main(["export", str(folder), "--format", "gguf", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and str(folder) in err and not out.exists()


def test_refuses_other_methods_and_architectures(base_dir, tmp_path, capsys, make_model) -> None:
    torch.manual_seed(0)
    ia3 = dt.get_delta_model(tf.AutoModelForCausalLM.from_pretrained(base_dir),
                             dt.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]))
    ia3.save_pretrained(tmp_path / "ia3")
    assert main(["export", str(tmp_path / "ia3"), "--format", "gguf", "--out", str(tmp_path / "x.gguf")]) == 2
    assert "LoRA adapters only" in capsys.readouterr().err
    gpt2 = make_model("gpt2_lm")
    gpt2.save_pretrained(tmp_path / "gpt2")
    gpt2 = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "gpt2")
    dt.get_delta_model(gpt2, dt.LoraConfig(r=2, target_modules=["c_attn"])).save_pretrained(tmp_path / "g")
    assert main(["export", str(tmp_path / "g"), "--format", "gguf", "--out", str(tmp_path / "x.gguf")]) == 2
    assert "'gpt2' is not supported" in capsys.readouterr().err and not (tmp_path / "x.gguf").exists()


def test_base_not_found_offline_names_the_adapter_and_the_fix(base_dir, tmp_path, capsys) -> None:
    folder = saved(base_dir, tmp_path / "adapter", target_modules=["v_proj"])
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": "org/not-here"}))
    out = tmp_path / "a.gguf"
    assert main(["export", str(folder), "--format", "gguf", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(folder) in err and "'org/not-here'" in err and "--model" in err and not out.exists()
    assert main(["export", str(folder), "--format", "gguf", "--out", str(out), "--model", str(base_dir)]) == 0
    assert read(out)[0]["general.base_model.0.name"] == str(base_dir)


@pytest.mark.integration
def test_query_key_order_matches_the_bundled_smollm2_gguf(tmp_path) -> None:
    """The row order the export gives B is the order llama.cpp's own SmolLM2 file has for the base weights:
    the bundled export's q/k weights (de-quantised from that file), reordered by ``permute``, equal the file's."""
    from gguf.quants import dequantize

    from deltatune.bundled import BUNDLED_MODELS, bundled_model_path, installed_package_dir
    from deltatune.integrations.gguf_lora import permute

    entry = BUNDLED_MODELS["smollm2"]
    source = installed_package_dir(entry.package, entry.pip_name) / entry.relpath
    exported = bundled_model_path("smollm2")
    config = json.loads((exported / "config.json").read_text())
    file_tensors = {t.name: t for t in gguf.GGUFReader(source).tensors}
    with safetensors.safe_open(str(next(exported.glob("*.safetensors"))), "pt") as handle:
        for module, heads in (("q_proj", config["num_attention_heads"]), ("k_proj", config["num_key_value_heads"])):
            hf = handle.get_tensor(f"model.layers.0.self_attn.{module}.weight")
            t = file_tensors[f"blk.0.{GGUF_NAME[module]}.weight"]
            in_file = torch.from_numpy(dequantize(t.data, t.tensor_type).copy()).reshape(hf.shape)
            torch.testing.assert_close(permute(hf, heads), in_file, atol=1e-6, rtol=0)
            assert not torch.equal(hf, in_file)  # the reordering is needed, not a no-op
