"""Mixed-adapter batches: latency of one batch of 32 whose rows use 1, 4, 16 or 32 distinct adapters.

    python -m bench.mixed_batch                      # MiniLM and SmolLM2, batch 32 x 32 tokens, 5 rounds
    python -m bench.mixed_batch --models minilm --rounds 3
    python -m bench.mixed_batch --clock wall         # wall-clock time instead of the thread's CPU time

Every variant is timed in the same interleaved rounds (the order rotates each round); a ratio is the
median over rounds of (variant time / reference time in that round), so machine-load drifts cancel.
The clock is, by default, the CPU time of the calling thread (``time.thread_time``): with one intra-op
thread (``--threads 1``, the default) that is all the work of a forward, and unlike wall time it does
not count the time the thread waits for a core that other processes hold (the shared machine these
tables come from runs ~7 agents on 2 cores). Memory-bandwidth contention still shows.
LoRA r=8, alpha 16 on every linear layer (``all-linear``), non-zero ``B``. Variants:

* base forward (adapters disabled), one adapter for the whole batch (``set_adapter``);
* deltatune ``adapter_names`` with 1 / 4 / 16 / 32 distinct LoRA adapters (rows assigned round-robin);
* HF peft ``adapter_names`` on a twin model holding the *same* tensors (outputs compared);
* one forward per example with its own adapter (what users do without mixed batches);
* a mix of LoRA, IA3 and prompt-tuning adapters (deltatune only; peft mixes LoRA only).

Before timing, the mixed outputs are checked against per-adapter runs (max |diff| printed). Writes
``bench/results/mixed_batch.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import deltatune as dt
from deltatune.bundled import resolve_model_path

BATCH, ADAPTERS = 32, 32
RESULTS = Path(__file__).parent / "results"
IA3_TARGETS = {"minilm": (["key", "value", "output.dense"], ["output.dense"]),
               "smollm2": (["k_proj", "v_proj", "down_proj"], ["down_proj"])}


def _load(name: str) -> torch.nn.Module:
    from transformers import AutoModel, AutoModelForCausalLM

    path = resolve_model_path(name)
    cls = AutoModelForCausalLM if name == "smollm2" else AutoModel
    torch.manual_seed(0)
    return cls.from_pretrained(path, dtype=torch.float32).eval()


def _lora() -> dt.LoraConfig:
    return dt.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)


def _models(name: str, mixes: bool) -> tuple[dt.DeltaModel, Any, dt.DeltaModel | None]:
    """deltatune with 32 LoRA adapters, the peft twin with the same tensors, and a LoRA/IA3/prompt mix."""
    import peft

    torch.manual_seed(1)
    ours = dt.get_delta_model(_load(name), _lora(), "a0")
    for k in range(1, ADAPTERS):
        ours.add_adapter(f"a{k}", _lora())
    ours.eval()
    theirs = peft.get_peft_model(_load(name), peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"),
                                 adapter_name="a0")
    for k in range(1, ADAPTERS):
        theirs.add_adapter(f"a{k}", peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    mine = {n: p for n, p in ours.named_parameters() if ".lora_" in n}
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if ".lora_" in n:
                p.copy_(mine[n.replace("base_model.model.", "base_model.", 1)])
    theirs.eval()
    mix = None
    if mixes:
        mix = dt.get_delta_model(_load(name), _lora(), "lora0")
        for k in range(1, 11):
            mix.add_adapter(f"lora{k}", _lora())
        targets, ff = IA3_TARGETS[name]  # explicit: default targets are inferred before any wrapper is in place
        for k in range(11):
            mix.add_adapter(f"ia3_{k}", dt.IA3Config(target_modules=targets, feedforward_modules=ff,
                                                      init_ia3_weights=False))
        for k in range(10):
            mix.add_adapter(f"prompt{k}", dt.PromptTuningConfig(num_virtual_tokens=4 + k % 3 * 4))
        mix.eval()
    return ours, theirs, mix


def _names(distinct: int) -> list[str]:
    return [f"a{i % distinct}" for i in range(BATCH)]


def _check(ours: dt.DeltaModel, theirs: Any, inputs: dict[str, torch.Tensor]) -> dict[str, float]:
    """max |diff| of the 32-adapter batch against per-adapter runs (deltatune) and against peft."""
    names = _names(ADAPTERS)
    with torch.no_grad():
        mixed = _main(ours(**inputs, adapter_names=names))
        peft_mixed = _main(theirs(**inputs, adapter_names=names))
        worst = 0.0
        for i in range(0, BATCH, 8):
            ours.set_adapter(names[i])
            one = _main(ours(**{k: v[i : i + 1] for k, v in inputs.items()}))
            worst = max(worst, float((mixed[i : i + 1] - one).abs().max()))
    return {"vs_per_adapter": worst, "vs_peft": float((mixed - peft_mixed).abs().max())}


def _main(out: Any) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") and out.logits is not None else out.last_hidden_state


def _variants(ours: dt.DeltaModel, theirs: Any, mix: dt.DeltaModel | None,
              inputs: dict[str, torch.Tensor]) -> dict[str, Callable[[], Any]]:
    def base() -> Any:
        with ours.disable_adapter():
            return ours(**inputs)

    def single() -> Any:
        ours.set_adapter("a0")
        return ours(**inputs)

    def per_example() -> Any:
        names = _names(ADAPTERS)
        for i in range(BATCH):
            ours.set_adapter(names[i])
            ours(**{k: v[i : i + 1] for k, v in inputs.items()})

    variants: dict[str, Callable[[], Any]] = {"base": base, "single adapter": single}
    for n in (1, 4, 16, 32):
        variants[f"deltatune {n}"] = lambda n=n: ours(**inputs, adapter_names=_names(n))
        variants[f"peft {n}"] = lambda n=n: theirs(**inputs, adapter_names=_names(n))
    variants["one forward per example (32 adapters)"] = per_example
    if mix is not None:
        kinds = [f"lora{i}" for i in range(11)] + [f"ia3_{i}" for i in range(11)] + [f"prompt{i}" for i in range(10)]
        variants["deltatune mix LoRA/IA3/prompt"] = lambda: mix(**inputs, adapter_names=kinds)
    return variants


def _time(variants: dict[str, Callable[[], Any]], rounds: int, clock: Callable[[], float]) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {k: [] for k in variants}
    order = list(variants)
    with torch.no_grad():
        for fn in variants.values():  # warm-up (builds the cached stacks)
            fn()
        for r in range(rounds):
            for label in order[r % len(order):] + order[: r % len(order)]:
                t0 = clock()
                variants[label]()
                times[label].append(clock() - t0)
    return times


def _ratio(times: dict[str, list[float]], a: str, b: str) -> float:
    return statistics.median(x / y for x, y in zip(times[a], times[b]))


CLOCKS = {"thread": time.thread_time, "wall": time.perf_counter}


def run_model(name: str, seq: int, rounds: int, clock: str = "thread") -> dict[str, Any]:
    ours, theirs, mix = _models(name, mixes=True)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 1000, (BATCH, seq), generator=gen)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    check = _check(ours, theirs, inputs)
    times = _time(_variants(ours, theirs, mix, inputs), rounds, CLOCKS[clock])
    rows = []
    for label in times:
        row = {"variant": label, "median_s": statistics.median(times[label]),
               "vs_base": _ratio(times, label, "base"), "vs_single": _ratio(times, label, "single adapter")}
        if label.startswith("deltatune ") and label.split()[-1].isdigit():
            row["peft_over_deltatune"] = _ratio(times, "peft " + label.split()[-1], label)
        rows.append(row)
    return {"model": name, "batch": BATCH, "seq": seq, "rounds": rounds, "clock": clock, "check": check, "rows": rows}


def render(results: list[dict[str, Any]]) -> str:
    lines = ["# Mixed-adapter batches (batch 32, LoRA r=8 on every linear layer)", ""]
    for res in results:
        c = res["check"]
        clock = {"thread": "thread CPU time", "wall": "wall time"}[res.get("clock", "wall")]
        lines += [f"## {res['model']} ({res['batch']} x {res['seq']} tokens, median of {res['rounds']} rounds, {clock})", "",
                  (f"Outputs: 32-adapter batch vs per-adapter runs max |diff| {c['vs_per_adapter']:.2e}; "
                   f"vs peft {c['vs_peft']:.2e}."), "",
                  "| variant | median s | x base forward | x single-adapter batch | peft time / deltatune time |",
                  "|---|---|---|---|---|"]
        for r in res["rows"]:
            peft_ratio = f"{r['peft_over_deltatune']:.2f}" if "peft_over_deltatune" in r else ""
            lines.append(f"| {r['variant']} | {r['median_s']:.3f} | {r['vs_base']:.2f} | {r['vs_single']:.2f} | "
                         f"{peft_ratio} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["minilm", "smollm2"])
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS") or 1))
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="thread",
                        help="thread: CPU time of the calling thread (default; exact with --threads 1); wall: wall time")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.clock == "thread" and args.threads != 1:
        parser.error("--clock thread counts the calling thread only; use it with --threads 1 (or --clock wall)")
    results = [run_model(name, args.seq, args.rounds, args.clock) for name in args.models]
    text = render(results)
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "mixed_batch.md").write_text(text + "\n", encoding="utf-8")
    (RESULTS / "mixed_batch.json").write_text(json.dumps({"threads": args.threads, "results": results}, indent=2) + "\n",
                                              encoding="utf-8")


if __name__ == "__main__":
    main()
