"""Quantized bases: LoRA on SmolLM2-135M-Instruct in float32 vs nf4 / int8 (bitsandbytes) / int8 (torchao),
and HF peft's QLoRA (nf4) beside deltatune's, all trained on ChatterBot with the same recipe in one run.

    python -m bench.quantized                 # writes bench/results/quantized.{md,json}
    python -m bench.quantized --steps 4 --configs float32 nf4   # a harness check

Recipe (every configuration): LoRA r=8, alpha 16, dropout 0.05 on every linear layer of the decoder
(q/k/v/o, gate/up/down), AdamW lr 2e-4, batch 8, ChatterBot Q/A pairs (chat template, loss on the
answer), the same batches in the same order, float32 compute. What differs per configuration (each row
of the report says it): the base's quantization; gradient checkpointing (``float32``: off, as plain
LoRA; ``float32-ckpt``: on, the fair reference for memory; the quantized rows: on, the default of
``prepare_for_kbit_training`` and of peft's ``prepare_model_for_kbit_training``, except ``nf4-nockpt``:
off, ``prepare_for_kbit_training(model, use_gradient_checkpointing=False)``, which shows what the
checkpointing costs in time and saves in memory on the 4-bit base); and whether the tied
embedding / LM head stays float32 (default) or is quantized too (``nf4-emb``: ``embeddings=True``); the nf4
block size (``nf4-b32``: 32 values per scale, ``--quantize nf4:32``; every other row: 64); and the
LoRA initialisation (``nf4-loftq``: LoftQ, ``init_lora_weights="loftq"`` with ``--loftq-iter`` alternations, on
the float32 model, which it turns into the nf4 base Q; every other row: ``B = 0``).
Each configuration runs in its own process, one after another (:func:`bench.runner.run_one`):

* **weight memory**: bytes of every parameter and buffer as stored (4-bit codes plus their block
  scales, int8 values plus row scales; a float32 embedding counts in full), before the adapter;
* **peak training memory**: the process's RSS high-water mark during training minus its RSS before
  the model was loaded (every library imported first, in every configuration): the model as held
  plus everything training adds; also the part above the loaded model (:class:`bench.measure.PeakMemory`);
  ``nf4-loftq`` loads the float32 model first, so its high-water mark includes that load;
* **base perplexity**: ChatterBot test perplexity of the base alone (adapter switched off, after training);
* **untrained perplexity**: the same with the adapter on, before training (the model training starts from:
  the base itself where ``B = 0``, ``Q + s B A`` for LoftQ); not measured for peft's row, whose
  ``prepare_model_for_kbit_training`` does not keep bitsandbytes' training layout through an inference call;
* **step time**: median step after 3 warm-up steps (forward, backward, clip, AdamW step);
* **test perplexity**: ChatterBot test split, answer tokens, after training, in eval mode;
* **merge error**: max / mean |logit difference| of the merged vs the unmerged model on a probe batch
  (:func:`deltatune.merge_check.default_probe`, 4 x 32 seeded token ids): deltatune's
  ``merge_report``; for HF peft the same two forwards measured here around its ``merge_and_unload``.

Ratios are to the float32 LoRA run of the same invocation, and deltatune/peft compares the two nf4 runs.
bitsandbytes' CPU backend computes 4-bit layers in float32 when training and (on CPUs with AVX512-BF16)
with a bfloat16 kernel at inference, so the perplexity and merge numbers of nf4 include that kernel.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from bench.loop import epoch_batches, perplexity, train
from bench.measure import PeakMemory, machine_info, median_after_warmup

CONFIGS = ("float32", "float32-ckpt", "nf4", "nf4-nockpt", "nf4-b32", "nf4-loftq", "nf4-emb", "peft-nf4", "int8",
           "torchao-int8")  # this order
#: config -> (base quantization or None, gradient checkpointing, embedding / tied head quantized too)
SETUP: dict[str, tuple[str | None, bool, bool]] = {
    "float32": (None, False, False), "float32-ckpt": (None, True, False), "nf4": ("nf4", True, False),
    "nf4-nockpt": ("nf4", False, False),
    "nf4-b32": ("nf4:32", True, False), "nf4-loftq": ("nf4", True, False),
    "nf4-emb": ("nf4", True, True), "peft-nf4": ("nf4", True, False), "int8": ("int8", True, False),
    "torchao-int8": ("torchao-int8", True, False),
}
LOFTQ = ("nf4-loftq",)  #: rows that start from the float32 model and let LoftQ quantize it
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RESULTS = Path(__file__).resolve().parent / "results"


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers as stored (quantized ones: values plus scales)."""
    from deltatune.weights import param_tensors

    seen: set[int] = set()
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        parts = list(param_tensors(tensor))
        state = getattr(tensor, "quant_state", None)  # bitsandbytes 4-bit: block scales (nested: 8-bit + their own)
        if state is not None:
            parts += [state.absmax] + ([state.state2.absmax] if getattr(state, "nested", False) else [])
        scb = getattr(tensor, "SCB", None)  # bitsandbytes int8: one scale per row
        if scb is not None:
            parts.append(scb)
        total += sum(t.numel() * t.element_size() for t in parts)
    return total


def _load(config: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    from deltatune.bundled import bundled_model_path
    from deltatune.quant.load import from_pretrained_quantized

    path = bundled_model_path("smollm2")
    kind, _, embeddings = SETUP[config]
    if kind is None or config in LOFTQ:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return from_pretrained_quantized(AutoModelForCausalLM, str(path), kind, embeddings=embeddings)


def _adapt(model: torch.nn.Module, config: str, loftq_iter: int = 1) -> torch.nn.Module:
    if config == "peft-nf4":
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
        return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=TARGETS,
                                                task_type="CAUSAL_LM"))
    import deltatune as dt

    kind, checkpointing, _ = SETUP[config]
    init: dict[str, Any] = {}
    if config in LOFTQ:
        init = {"init_lora_weights": "loftq", "loftq_config": dt.LoftQConfig(loftq_bits=4, loftq_iter=loftq_iter)}
    if kind is not None:
        # checkpointing on by default, as peft's; off for the rows that say so
        model = dt.prepare_for_kbit_training(model, use_gradient_checkpointing=None if checkpointing else False)
    elif checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if bool(getattr(model, "is_gradient_checkpointing", False)) != checkpointing:
        raise RuntimeError(f"{config}: gradient checkpointing is not {'on' if checkpointing else 'off'} as intended")
    return dt.get_delta_model(model, dt.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=TARGETS,
                                                   task_type="CAUSAL_LM", **init))


@torch.no_grad()
def _merge_error(model: torch.nn.Module, config: str) -> dict[str, float]:
    from deltatune.merge_check import default_probe, probe_outputs

    if config != "peft-nf4":
        model.merge_and_unload(probe=default_probe(model.get_base_model()))
        report = model.merge_report
        return {"merge_max": report.max_logit_error, "merge_mean": report.mean_logit_error}
    probe = default_probe(model.base_model.model)
    before = probe_outputs(model, probe)
    merged = model.merge_and_unload()
    diff = (probe_outputs(merged, probe) - before).abs()
    return {"merge_max": float(diff.max()), "merge_mean": float(diff.mean())}


def run(job: dict[str, Any]) -> dict[str, Any]:
    """One configuration (``job["config"]``): load, adapt, train ``job["steps"]`` steps, evaluate, merge."""
    import bitsandbytes  # noqa: F401  (every library imported before the RSS baseline, in every configuration)
    import peft  # noqa: F401
    import torchao  # noqa: F401
    from transformers import AutoTokenizer

    from bench.measure import _malloc_trim, _status_kb
    from deltatune.bundled import bundled_model_path
    from deltatune.train.data.builtin import load_builtin
    from deltatune.train.data.encoding import encode_instruction

    config = job["config"]
    tokenizer = AutoTokenizer.from_pretrained(bundled_model_path("smollm2"))
    pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    train_feats = encode_instruction(load_builtin("chatterbot", "train"), tokenizer, max_length=job["max_length"])
    test_feats = encode_instruction(load_builtin("chatterbot", "test"), tokenizer,
                                    max_length=job["max_length"])[: job["n_test"]]
    batches = epoch_batches(train_feats, seed=0, epochs=1, batch_size=job["batch_size"], pad_id=pad_id)[: job["steps"]]
    import gc

    gc.collect()
    _malloc_trim()
    before_load_kb = _status_kb("VmRSS")
    torch.manual_seed(0)
    model = _load(config)
    weights = weight_bytes(model)
    model = _adapt(model, config, job.get("loftq_iter", 1))
    if config in LOFTQ:  # the base is quantized now: its bytes without the adapter's
        weights = weight_bytes(model) - sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    torch.manual_seed(0)  # the same LoRA initialisation draws in every configuration
    from deltatune.weights import param_tensors

    with torch.no_grad():  # make every weight page resident (what PeakMemory.start does; torchao tensors have no sum)
        for tensor in [*model.parameters(), *model.buffers()]:
            for part in param_tensors(tensor):
                part.sum()
    untrained = None if config == "peft-nf4" else perplexity(model, test_feats, pad_id=pad_id)
    memory = PeakMemory()
    memory.start()
    stats = train(model, batches, lr=job["lr"])
    hwm_kb = _status_kb("VmHWM")
    total = (hwm_kb - before_load_kb) / 1024.0 if hwm_kb is not None and before_load_kb is not None else None
    out: dict[str, Any] = {
        "config": config, "setup": dict(zip(("quantization", "checkpointing", "embeddings"), SETUP[config], strict=True)),
        "weight_mb": weights / 2**20, "peak_total_mb": total, "peak_mb": memory.peak_mb(), "mem_method": memory.method,

        "step_s": median_after_warmup(stats.step_times, 3), "steps": len(batches),
        "first_loss": stats.losses[0], "final_loss": sum(stats.losses[-5:]) / len(stats.losses[-5:]),
        "test_ppl": perplexity(model, test_feats, pad_id=pad_id), "untrained_ppl": untrained,
    }
    # the base alone, after training: an inference call before training would make bitsandbytes re-lay-out
    # its 4-bit weights for the CPU kernel, which corrupts later training gradients where nothing undoes it
    with model.disable_adapter():
        out["base_ppl"] = perplexity(model, test_feats, pad_id=pad_id)
    out.update(_merge_error(model, config))
    return out


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a is not None and b else "-"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _setup_text(config: str) -> str:
    kind, checkpointing, embeddings = SETUP[config]
    emb = "float32" if kind is None or not embeddings else kind
    return f"{'on' if checkpointing else 'off'} | {emb}"


def report(results: dict[str, dict[str, Any]], settings: dict[str, Any]) -> str:
    ref, ckpt = results.get("float32", {}), results.get("float32-ckpt", {})
    lines = ["# Quantized bases: LoRA on SmolLM2-135M-Instruct, ChatterBot", "",
             f"Settings: {json.dumps(settings)}", "",
             ("Ratios are to the `float32` row (plain LoRA, no checkpointing); peak memory also to `float32-ckpt` "
              "(float32 with gradient checkpointing, the fair reference for the checkpointed quantized rows). "
              "Peak total: RSS high-water in training minus RSS before loading the model; above model: the part "
              "above the loaded model."), "",
             ("| config | ckpt | embedding+head | weight MB | vs fp32 | peak total MB | vs fp32 | vs fp32-ckpt "
              "| above model MB | step s | vs fp32 | base ppl | untrained ppl | test ppl | vs fp32 "
              "| merge max / mean logit error |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for config in CONFIGS:
        r = results.get(config)
        if r is None:
            continue
        if not r.get("ok"):
            lines.append(f"| {config} | {_setup_text(config)} | failed: {r.get('error')} |")
            continue
        total = r.get("peak_total_mb")
        lines.append(
            f"| {config} | {_setup_text(config)} | {r['weight_mb']:.1f} | {_ratio(r['weight_mb'], ref.get('weight_mb'))} "
            f"| {f'{total:.0f}' if total is not None else '-'} | {_ratio(total, ref.get('peak_total_mb'))} "
            f"| {_ratio(total, ckpt.get('peak_total_mb'))} | {r['peak_mb']:.0f} "
            f"| {r['step_s']:.3f} | {_ratio(r['step_s'], ref.get('step_s'))} | {r.get('base_ppl', float('nan')):.3f} "
            f"| {_number(r.get('untrained_ppl'))} | {r['test_ppl']:.3f} | {_ratio(r['test_ppl'], ref.get('test_ppl'))} "
            f"| {r['merge_max']:.3g} / {r['merge_mean']:.3g} |")
    ours, theirs = results.get("nf4", {}), results.get("peft-nf4", {})
    if ours.get("ok") and theirs.get("ok"):
        summary = (f"deltatune/peft (nf4, both checkpointed): step time {_ratio(ours['step_s'], theirs['step_s'])}, "
                   f"peak training memory {_ratio(ours.get('peak_total_mb'), theirs.get('peak_total_mb'))}, test "
                   f"perplexity {_ratio(ours['test_ppl'], theirs['test_ppl'])}")
        lines += ["", summary]
    nockpt = results.get("nf4-nockpt", {})
    if ours.get("ok") and nockpt.get("ok"):
        lines += ["", (f"nf4 without / with gradient checkpointing: step time {_ratio(nockpt['step_s'], ours['step_s'])}, "
                       f"peak training memory {_ratio(nockpt.get('peak_total_mb'), ours.get('peak_total_mb'))}")]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from bench.runner import run_one

    parser = argparse.ArgumentParser(prog="python -m bench.quantized", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=32, help="training steps per configuration")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=96)
    parser.add_argument("--n-test", type=int, default=123, help="ChatterBot test rows for the perplexity")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--loftq-iter", type=int, default=1, help="LoftQ's alternations T for the nf4-loftq row")
    parser.add_argument("--output", type=Path, default=RESULTS / "quantized",
                        help="where to write the report: OUTPUT.md and OUTPUT.json")
    args = parser.parse_args(argv)
    settings = {"steps": args.steps, "batch_size": args.batch_size, "max_length": args.max_length,
                "n_test": args.n_test, "lr": args.lr, "threads": args.threads, "loftq_iter": args.loftq_iter}
    results: dict[str, dict[str, Any]] = {}
    start = time.perf_counter()
    machine = machine_info(RESULTS.parent.parent)
    for config in args.configs:  # one process each, one at a time (memory and timing are per process)
        result = run_one({"kind": "quantized", "config": config, **settings}, threads=args.threads)
        results[config] = result
        print(f"  {config}: {result.get('process_seconds', 0):.0f} s, {'ok' if result.get('ok') else result.get('error')}",
              flush=True)
        text = report(results, settings)  # saved after every configuration: an interrupted run keeps what it has
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.with_suffix(".md").write_text(text, encoding="utf-8")
        payload = {"settings": settings, "results": results, "machine": machine,
                   "wall_seconds": time.perf_counter() - start}
        args.output.with_suffix(".json").write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
