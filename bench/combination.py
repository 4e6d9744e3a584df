"""Adapter arithmetic on a real model: two LoRA adapters trained on different data, then combined.

SmolLM2-135M-Instruct (bundled) gets one LoRA adapter trained on ChatterBot Q/A pairs (``chat``,
response tokens) and one trained on BBC news text (``news``, causal LM), from the same base, same
settings. Each is combined with ``add_weighted_adapter`` (weights 1 and 1: the sum of both task
vectors) as ``cat`` and full-rank ``svd`` (both exact: the sum of the two deltas), ``svd`` at rank 8
(half the summed rank: the best rank-8 approximation of the sum) and ``ties`` (density 0.5; peft's
factor-wise merge), plus ``linear`` (peft's factor-wise sum, with cross terms). Every model is
evaluated by perplexity on both held-out sets; the base and each single adapter are the references.

    python -m bench.combination            # writes bench/results/combination.{json,md}
    python -m bench.combination --steps 10 --n-eval 16   # a quick harness check
    python -m bench.combination --steps 12 --n-eval 24 --threads 1   # the size run on the loaded shared box

In ``python -m bench --suite full`` the experiment is one job (``{"kind": "combination", "steps", "n_eval"}``,
run by :mod:`bench.worker` with 1 thread); :func:`committed` turns a saved ``combination.json`` back into
that job's result, so a resumed suite reuses it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from bench.loop import epoch_batches, perplexity, train

RESULTS = Path(__file__).resolve().parent / "results"
COMBINATIONS = {  # name -> add_weighted_adapter keywords (weights 1, 1)
    "cat": {"combination_type": "cat"},
    "svd (full rank 16)": {"combination_type": "svd"},
    "svd rank 8": {"combination_type": "svd", "svd_rank": 8},
    "ties (density 0.5)": {"combination_type": "ties", "density": 0.5},
    "linear (peft's, factor-wise)": {"combination_type": "linear"},
}


def _data(tokenizer: Any, max_length: int, n_eval: int) -> tuple[dict[str, list], dict[str, list]]:
    from deltatune.train.data.builtin import load_builtin
    from deltatune.train.data.encoding import encode_causal_lm, encode_instruction

    train_sets = {"chat": encode_instruction(load_builtin("chatterbot", "train"), tokenizer, max_length=max_length),
                  "news": encode_causal_lm(load_builtin("bbc", "train"), tokenizer, max_length=max_length)}
    test_sets = {"chat": encode_instruction(load_builtin("chatterbot", "test")[:n_eval], tokenizer, max_length=max_length),
                 "news": encode_causal_lm(load_builtin("bbc", "test")[:n_eval], tokenizer, max_length=max_length)}
    return train_sets, test_sets


def run(steps: int = 40, n_eval: int = 48, batch_size: int = 8, max_length: int = 64, lr: float = 2e-4) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import deltatune as dt
    from deltatune.bundled import bundled_model_path

    path = bundled_model_path("smollm2")
    tokenizer = AutoTokenizer.from_pretrained(path)
    pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    train_sets, test_sets = _data(tokenizer, max_length, n_eval)
    torch.manual_seed(0)
    model = dt.get_delta_model(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), dt.LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"), "chat")
    model.add_adapter("news", dt.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    started = time.perf_counter()

    def ppl() -> dict[str, float]:
        return {name: perplexity(model, feats, pad_id=pad_id) for name, feats in test_sets.items()}

    with model.disable_adapter():
        table = {"base": ppl()}
    losses = {}
    for name in ("chat", "news"):
        model.set_adapter(name)
        batches = epoch_batches(train_sets[name], seed=0, epochs=1, batch_size=batch_size, pad_id=pad_id)[:steps]
        stats = train(model, batches, lr=lr)
        losses[name] = (stats.losses[0], sum(stats.losses[-5:]) / len(stats.losses[-5:]))
        table[f"{name} adapter"] = ppl()
    for label, options in COMBINATIONS.items():
        name = label.split()[0] + "_" + str(len(table))
        model.add_weighted_adapter(["chat", "news"], [1.0, 1.0], name, **options)
        model.set_adapter(name)
        table[label] = ppl()
    return {"settings": {"model": "SmolLM2-135M-Instruct", "steps": steps, "batch_size": batch_size,
                         "max_length": max_length, "lr": lr, "lora": "r=8, alpha 16, q/v", "n_eval": n_eval},
            "train_loss_first_last": losses, "perplexity": table, "seconds": time.perf_counter() - started}


def report(result: dict[str, Any]) -> str:
    s = result["settings"]
    intro = (f"LoRA {s['lora']}, {s['steps']} steps each (batch {s['batch_size']}, {s['max_length']} tokens, "
             f"lr {s['lr']}); perplexity on {s['n_eval']} held-out examples of each task (lower is better). "
             "Combinations use weights 1 and 1.")
    lines = [f"# Adapter arithmetic: two LoRA adapters combined ({s['model']})", "", intro, "",
             "| model | ChatterBot (chat) | BBC news text (news) |", "|---|---|---|"]
    for name, values in result["perplexity"].items():
        lines.append(f"| {name} | {values['chat']:.2f} | {values['news']:.2f} |")
    lines += ["", f"Total {result['seconds']:.0f} s on this machine."]
    return "\n".join(lines) + "\n"


def job(steps: int = 40, n_eval: int = 48) -> dict[str, Any]:
    """The experiment as a suite job (:mod:`bench.worker` calls :func:`run` with these settings)."""
    return {"kind": "combination", "steps": steps, "n_eval": n_eval}


def committed(path: Path) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """``(job, result)`` of a saved ``combination.json`` (``None`` if there is none)."""
    if not path.exists():
        return None
    result = json.loads(path.read_text(encoding="utf-8"))
    s = result["settings"]
    return job(s["steps"], s["n_eval"]), result | {"ok": True, "wall_seconds": result["seconds"]}


def write(result: dict[str, Any], folder: Path, stem: str = "combination") -> None:
    """``<stem>.json`` (the raw result) and ``<stem>.md`` (the table) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    keep = {k: v for k, v in result.items() if k in ("settings", "train_loss_first_last", "perplexity", "seconds")}
    (folder / f"{stem}.json").write_text(json.dumps(keep, indent=2) + "\n", encoding="utf-8")
    (folder / f"{stem}.md").write_text(report(keep), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--n-eval", type=int, default=48)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (1 on a loaded machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = run(args.steps, args.n_eval)
    write(result, args.out)
    print(report(result))


if __name__ == "__main__":
    main()
