"""Learning vs forgetting: SmolLM2-135M trained on one narrow domain (KJV verses), full FT vs LoRA ranks.

Biderman et al. ("LoRA Learns Less and Forgets Less", arXiv 2405.09673) plot, for each fine-tuning
method, how well the model learned the target domain against how much it lost elsewhere. This runs
the same experiment at the size this machine allows: bundled SmolLM2-135M-Instruct trained as a
causal LM on King James verses of the historical books (Genesis to 2 Kings, :func:`bench.corpus.kjv_train`),
with perplexity measured every ``eval_every`` steps on

* the target domain: held-out KJV passages from *other* books (Proverbs, Matthew, Ecclesiastes, Psalms);
* general text: ``fortunes`` (modern English quotations and jokes) and the ChatterBot test split (answers).

Perplexity of a set = ``exp(mean token negative log-likelihood)``. One process per configuration
(:mod:`bench.forgetting`), the same batches in the same order for each; every finished job is kept in
``bench/results/.forgetting.jobs.jsonl`` so that rerunning the command runs only what is missing, and
``forgetting.md`` / ``forgetting.json`` / ``forgetting_frontier.png`` are rewritten after each job.

    python -m bench.forgetting_frontier --workers 4   # full FT and LoRA r=16, 64, 4 at once, 1 thread each
    python -m bench.forgetting_frontier report     # re-render from the finished jobs
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from pathlib import Path
from typing import Any

from bench.cache import finished_jobs, job_key, part_cache
from bench.runner import REPO, run_many

RESULTS = REPO / "bench" / "results"
CACHE = RESULTS / ".forgetting.jobs.jsonl"
#: Shared settings: batch 4 x at most 32 tokens, 100 steps (400 two-verse passages, one epoch), bf16 autocast.
#: Sized for a 2-core machine shared by seven agents (a process got ~6 % of a core): a step of full
#: fine-tuning costs ~2 CPU-seconds, the whole run ~4 CPU-minutes.
COMMON: dict[str, Any] = {"kind": "forgetting", "lib": "deltatune", "domain": "kjv", "steps": 100, "epochs": 1,
                          "n_eval": 24, "batch_size": 4, "max_length": 32, "autocast": "bf16", "eval_every": 50}
FULL_LR = 1e-4  # high for SFT on purpose: the run is short, and full fine-tuning must move far enough to show forgetting
LORA_LR = 1e-3  # 10x full fine-tuning's, the ratio of the recipe shipped when this ran (r=16 at 1e-3 vs 1e-4 on MiniLM)
RANKS = (16, 64, 4)
GENERAL = ("fortunes", "chatterbot_test")
TARGET = "kjv"


def jobs(ranks: tuple[int, ...] = RANKS, steps: int | None = None, n_eval: int | None = None) -> list[dict[str, Any]]:
    """Full fine-tuning first, then LoRA (all linear layers, alpha = 2r, dropout 0.1) at each rank."""
    common = COMMON | ({"steps": steps, "eval_every": max(1, steps // 2)} if steps else {})
    common |= {"n_eval": n_eval} if n_eval else {}
    out = [common | {"method": "full", "lr": FULL_LR}]
    out += [common | {"method": "lora", "lr": LORA_LR, "method_options": {
        "r": r, "lora_alpha": 2 * r, "lora_dropout": 0.1, "target_modules": "all-linear"}} for r in ranks]
    return out


def label(job: dict[str, Any]) -> str:
    """``full FT`` or ``LoRA r=16`` (all linear layers)."""
    return "full FT" if job["method"] == "full" else f"LoRA r={job['method_options']['r']}"


def finished(cache: Path | None = None) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Every finished (job, result) pair in the cache file."""
    return finished_jobs(cache or CACHE)


def _pct(after: float, before: float) -> str:
    return f"{100 * (after / before - 1):+.1f}%"


def table(done: list[tuple[dict[str, Any], dict[str, Any]]]) -> list[str]:
    """One row for the base model, then one per (configuration, evaluated step)."""
    if not done:
        return ["No configuration has finished yet."]
    base = done[0][1]["before"]
    head = ["configuration", "lr", "trainable", "step", f"{TARGET} (target) ppl", *[f"{c} ppl" for c in GENERAL]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
             "| base model | — | 0 | 0 | " + " | ".join(f"{base[c]:.2f}" for c in (TARGET, *GENERAL)) + " |"]
    for job, res in done:
        for point in res.get("curve", [])[1:] or [{"step": res["steps"], "ppl": res["after"]}]:
            ppl = point["ppl"]
            cells = [f"{ppl[c]:.2f} ({_pct(ppl[c], base[c])})" for c in (TARGET, *GENERAL)]
            lines.append(f"| {label(job)} | {job['lr']:g} | {res['trainable']:,} | {point['step']} | " + " | ".join(cells) + " |")
    return lines


def chart(done: list[tuple[dict[str, Any], dict[str, Any]]], path: Path) -> Path | None:
    """Target-domain perplexity (x, lower = learned more) against each general perplexity (y, higher = forgot more)."""
    if not done:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(GENERAL), figsize=(6 * len(GENERAL), 4.5))
    base = done[0][1]["before"]
    for ax, corpus in zip(axes, GENERAL):
        for job, res in done:
            curve = res.get("curve") or [{"step": 0, "ppl": res["before"]}, {"step": res["steps"], "ppl": res["after"]}]
            xs, ys = [p["ppl"][TARGET] for p in curve], [p["ppl"][corpus] for p in curve]
            ax.plot(xs, ys, marker="o", label=label(job))
            ax.annotate(str(curve[-1]["step"]), (xs[-1], ys[-1]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.scatter([base[TARGET]], [base[corpus]], marker="*", s=160, color="black", zorder=5, label="base model")
        ax.axhline(base[corpus], color="gray", lw=0.8, ls="--")
        ax.set_xlabel(f"{TARGET} held-out perplexity (target domain; lower = learned more)")
        ax.set_ylabel(f"{corpus} perplexity (higher = forgot more)")
        ax.set_title(f"learning vs forgetting: {corpus}")
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(folder: Path | None = None, stem: str = "forgetting") -> None:
    """``<stem>.md``, ``<stem>.json`` and ``<stem>_frontier.png`` from the finished jobs in ``.<stem>.jobs.jsonl``
    (default: ``bench/results/forgetting.*``). Settings in the text are the first finished job's."""
    folder = folder or RESULTS
    done = finished(folder / f".{stem}.jobs.jsonl")
    order = {job_key(j): i for i, j in enumerate(jobs())}
    done = sorted(done, key=lambda jr: order.get(job_key(jr[0]), len(order)))
    c = COMMON | {k: v for k, v in (done[0][0] if done else {}).items() if k in COMMON}
    md = ["# Learning vs forgetting (`python -m bench.forgetting_frontier`)", "",
          (f"SmolLM2-135M-Instruct trained as a causal LM on KJV verses of Genesis to 2 Kings ({c['steps']} steps, batch "
           f"{c['batch_size']} x at most {c['max_length']} tokens = {c['steps'] * c['batch_size']} two-verse passages, one "
           "epoch; AdamW, 6 % warm-up then linear decay, clipping 1, CPU bf16 autocast; evaluation in float32). "
           f"Perplexity every {c['eval_every']} steps on {c['n_eval']} held-out KJV passages of other books (target), "
           f"{c['n_eval']} fortunes and the first {c['n_eval']} ChatterBot test answers (general text). LoRA on every linear "
           f"layer, alpha = 2r, dropout 0.1, lr {LORA_LR:g} (10x full fine-tuning's {FULL_LR:g}, the recipe's ratio); "
           "learning rates not swept. Percentages: change against the base model."), "",
          *table(done), "", f"![frontier]({stem}_frontier.png)", ""]
    for job, res in done:
        if "disabled" in res:
            same = all(res["disabled"][k] == res["before"][k] for k in res["before"])
            md.append(f"{label(job)} with the adapter disabled gives the base model's perplexities exactly: "
                      f"**{'yes' if same else 'NO'}** (max |logit difference| on a probe batch "
                      f"{res['disabled_logit_max_abs_diff']:.3g}).")
    (folder / f"{stem}.md").write_text("\n".join(md) + "\n")
    (folder / f"{stem}.json").write_text(json.dumps([{"job": j, "result": r} for j, r in done], indent=1) + "\n")
    chart(done, folder / f"{stem}_frontier.png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", nargs="?", default="run", choices=["run", "report"])
    parser.add_argument("--ranks", nargs="*", type=int, default=list(RANKS), help="LoRA ranks (none: full FT only)")
    parser.add_argument("--no-full", action="store_true", help="run only the LoRA configurations")
    parser.add_argument("--workers", type=int, default=1, help="configurations trained at once (1 thread each)")
    args = parser.parse_args(argv)
    if args.command == "run":
        cache = part_cache(CACHE, RESULTS / "forgetting.json", resume=True)  # fresh checkout: resume from the committed file
        todo = [j for j in jobs(tuple(args.ranks)) if not (args.no_full and j["method"] == "full")]
        lock = threading.Lock()

        def progress(message: str) -> None:  # after each finished job: log it, rewrite the report
            with lock:
                print(message, flush=True)
                write_report()

        for one, res in zip(todo, run_many(todo, workers=args.workers, threads=1, cache=cache, timeout=7200,
                                           progress=progress)):
            print(json.dumps({"config": label(one), "ok": res.get("ok"), "error": res.get("error"),
                              "after": res.get("after")}), flush=True)
    write_report()
    return 0


if __name__ == "__main__":
    sys.exit(main())
