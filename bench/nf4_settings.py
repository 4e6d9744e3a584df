"""Which nf4 settings close the perplexity gap on the bundled SmolLM2-135M-Instruct (forward only, no training).

    python -m bench.nf4_settings [--n-test 32] [--max-length 48] [--only NAME ...]

The bundled weights are a de-quantized Q4_1 GGUF (blocks of 32 values); nf4's default blocks hold 64.
Each row loads the float32 model, quantizes some linear layers with bitsandbytes ``Linear4bit`` directly
(block size, double quantisation and which projection types are the row's settings; the LM head and
embedding stay float32), or lets LoftQ (``init_lora_weights="loftq"``) quantize all seven projection types,
and reports the ChatterBot test perplexity of the untrained model (adapter on, B != 0 for LoftQ) and the
weight memory as stored (bench.quantized.weight_bytes: codes plus block scales, float tensors in full).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import torch
from torch import nn

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

#: name -> settings: ("bnb", quant_type, blocksize, double_quant, projection types) or ("loftq", rank, iters)
ROWS: dict[str, tuple[Any, ...]] = {
    "float32": ("float",),
    "nf4 b64 dq (default)": ("bnb", "nf4", 64, True, PROJ),
    "nf4 b64": ("bnb", "nf4", 64, False, PROJ),
    "nf4 b32 dq": ("bnb", "nf4", 32, True, PROJ),
    "nf4 b32": ("bnb", "nf4", 32, False, PROJ),
    "nf4 b128 dq": ("bnb", "nf4", 128, True, PROJ),
    "fp4 b32 dq": ("bnb", "fp4", 32, True, PROJ),
    **{f"nf4 b64 dq, {p} only": ("bnb", "nf4", 64, True, (p,)) for p in PROJ},
    "loftq r8 iter2": ("loftq", 8, 2),
    "loftq r8 iter4": ("loftq", 8, 4),
    "loftq r32 iter1": ("loftq", 32, 1),
    "loftq r32 iter4": ("loftq", 32, 4),
}


def quantize_bnb(model: nn.Module, quant_type: str, blocksize: int, double_quant: bool, types: tuple[str, ...]) -> None:
    import bitsandbytes as bnb

    for path, module in list(model.named_modules()):
        if type(module) is not nn.Linear or path.rpartition(".")[2] not in types:
            continue
        layer = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                  compute_dtype=torch.float32, compress_statistics=double_quant,
                                  quant_type=quant_type, quant_storage=torch.uint8, device="meta")
        layer.weight = bnb.nn.Params4bit(module.weight.detach().clone(), requires_grad=False, blocksize=blocksize,
                                         compress_statistics=double_quant, quant_type=quant_type, module=layer)
        if module.in_features % blocksize:
            layer.support_avx512bf16_for_cpu = False  # bnb's CPU re-layout fails on blocks straddling rows
        if module.bias is not None:
            layer.bias = nn.Parameter(module.bias.detach().clone(), requires_grad=False)
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent), child, layer.to("cpu"))
        assert layer.weight.blocksize == blocksize


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-test", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=48)
    parser.add_argument("--only", nargs="*", help="row names to run (default: all)")
    args = parser.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import deltatune as dt
    from bench.loop import perplexity
    from bench.quantized import weight_bytes
    from deltatune.bundled import bundled_model_path
    from deltatune.train.data.builtin import load_builtin
    from deltatune.train.data.encoding import encode_instruction

    path = bundled_model_path("smollm2")
    tokenizer = AutoTokenizer.from_pretrained(path)
    pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    test = encode_instruction(load_builtin("chatterbot", "test"), tokenizer, max_length=args.max_length)[: args.n_test]
    print("| setting | weight bytes | untrained ppl | vs float32 | s |")
    print("|---|---:|---:|---:|---:|")
    ref = None
    for name, row in ROWS.items():
        if args.only and name not in args.only and name != "float32":
            continue
        start = time.perf_counter()
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        if row[0] == "bnb":
            quantize_bnb(model, *row[1:])
            weights = weight_bytes(model)
        elif row[0] == "loftq":
            config = dt.LoraConfig(r=row[1], lora_alpha=2 * row[1], target_modules=list(PROJ), task_type="CAUSAL_LM",
                                   init_lora_weights="loftq", loftq_config=dt.LoftQConfig(loftq_bits=4, loftq_iter=row[2]))
            model = dt.get_delta_model(model, config)
            weights = weight_bytes(model) - sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        else:
            weights = weight_bytes(model)
        with torch.no_grad():
            ppl = perplexity(model, test, pad_id=pad_id)
        ref = ppl if ref is None else ref
        print(f"| {name} | {weights:,} | {ppl:.2f} | {ppl / ref:.3f} | {time.perf_counter() - start:.0f} |", flush=True)
        del model
    return 0


if __name__ == "__main__":
    sys.exit(main())
