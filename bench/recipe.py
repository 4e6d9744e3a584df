"""The default LoRA recipe: searched on the *validation* splits, then measured on the test splits.

Round one's fixed recipe (LoRA r=8 on query/value) missed full fine-tuning by 1.3-1.6 points on TREC
and BBC. Biderman et al. ("LoRA Learns Less and Forgets Less", arXiv 2405.09673) and others report that
LoRA on every linear layer with a learning rate roughly 10x full fine-tuning's closes most of that gap.
This module checks it on deltatune's own tasks, with round one's protocol (bundled MiniLM, first 2,000
training rows, 2 epochs, batch 16, bf16 autocast, :mod:`bench.loop`), so the numbers sit beside the
``full`` suite's full fine-tuning numbers.

``python -m bench.recipe search`` trains each candidate (targets x rank x dropout x learning rate, alpha = 2r,
dropout 0.1 unless given) on TREC, Rotten Tomatoes and BBC and scores it on their validation splits; the candidate
with the best mean validation accuracy is the recipe. ``python -m bench.recipe test`` then measures the
recipe deltatune ships (:meth:`deltatune.LoraConfig.recommended` and the CLI's learning rate for it)
on the test splits with 3 seeds, and on SMS spam, a data set the search never saw (with full
fine-tuning beside it there, as round one did not measure it). Every finished job is kept in
``bench/results/.recipe.jobs.jsonl``; rerunning a command only runs what is missing, and
``bench/results/recipe.md`` / ``recipe.json`` are rewritten after every job.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.cache import finished_jobs, part_cache
from bench.methods import METHODS
from bench.runner import REPO, run_many

RESULTS = REPO / "bench" / "results"
CACHE = RESULTS / ".recipe.jobs.jsonl"
SEARCH_TASKS = ["trec", "rt", "bbc"]
MAX_LENGTH = {"trec": 64, "rt": 64, "bbc": 32, "sms": 64}
TASK_NAMES = {"trec": "TREC", "rt": "Rotten Tomatoes", "bbc": "BBC", "sms": "SMS spam"}
TARGETS = {"qv": ["query", "value"], "all": "all-linear"}
PROTOCOL = {"n_train": 2000, "epochs": 2, "batch_size": 16, "autocast": "bf16"}


def lora_options(targets: str, r: int, dropout: float = 0.1) -> dict[str, Any]:
    """A candidate's LoRA fields: alpha = 2r, ``dropout`` (round one's 0.1 unless given), on ``TARGETS[targets]``."""
    return {"r": r, "lora_alpha": 2 * r, "lora_dropout": dropout, "target_modules": TARGETS[targets]}


SPLITS = ["validation", "test"]


def job(task: str, seed: int, method: str, lr: float, options: dict[str, Any] | None,
        protocol: dict[str, Any] | None = None) -> dict[str, Any]:
    """One classification job (:mod:`bench.classify`, one seed) under round one's protocol.

    Each trained model is scored on the validation *and* the test split, so the search's seed-0 runs
    are also the recipe's seed-0 test runs (the pick reads only the validation numbers).
    """
    out = {"kind": "classify", "model": "minilm", "method": method, "lib": "deltatune", "task": task, "seeds": [seed],
           "max_length": MAX_LENGTH[task], "lr": lr, "eval_splits": SPLITS, "save": False, **(protocol or PROTOCOL)}
    return out | ({"method_options": options} if options else {})


def shipped_recipe() -> tuple[dict[str, Any], float, int]:
    """The fields of ``deltatune.LoraConfig.recommended``, its learning rate and its epochs (what ``deltatune
    train`` uses)."""
    import deltatune as dt

    return dict(dt.LoraConfig.RECOMMENDED_OPTIONS), dt.LoraConfig.RECOMMENDED_LR, dt.LoraConfig.RECOMMENDED_EPOCHS


def protocol_with(epochs: int = PROTOCOL["epochs"], warmup: float | None = None) -> dict[str, Any]:
    """Round one's protocol with another number of epochs or warm-up share (a schedule candidate)."""
    return PROTOCOL | {"epochs": epochs} | ({"warmup_frac": warmup} if warmup is not None else {})


def _schedule_label(j: dict[str, Any]) -> str:
    """``", 3 epochs"`` / ``", warm-up 10%"`` where the job's schedule is not round one's (empty otherwise)."""
    parts = [f", {j['epochs']} epochs"] if j.get("epochs", PROTOCOL["epochs"]) != PROTOCOL["epochs"] else []
    return "".join(parts + ([f", warm-up {100 * j['warmup_frac']:g}%"] if "warmup_frac" in j else []))


def _label(j: dict[str, Any]) -> str:
    if j["method"] == "full":
        return "full fine-tuning" + _schedule_label(j)
    o = j.get("method_options") or {}
    t = "all linear" if o.get("target_modules") == "all-linear" else ",".join(o.get("target_modules", ["query", "value"]))
    drop = o.get("lora_dropout", 0.1)
    return (f"LoRA {t}, r={o.get('r', 8)}, alpha={o.get('lora_alpha', 16)}" + ("" if drop == 0.1 else f", dropout {drop:g}")
            + _schedule_label(j))


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _std(xs: list[float]) -> float:
    m = _mean(xs)
    return (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else 0.0


Key = tuple[str, float]  # (configuration label, learning rate)


def test_jobs(tasks: list[str], full_tasks: list[str], seeds: list[int], protocol: dict[str, Any] | None = None,
              same_schedule_full_tasks: Sequence[str] = ()) -> list[dict[str, Any]]:
    """``test``'s jobs, seed-major: the shipped recipe on ``tasks``, full fine-tuning on ``full_tasks`` and, on
    ``same_schedule_full_tasks``, full fine-tuning at the recipe's epochs (the same-schedule reference).

    ``protocol`` (default: round one's) is full fine-tuning's; the recipe trains for its own epochs unless a
    ``protocol`` is given (the ``quick`` suite's tiny one).
    """
    options, lr, epochs = shipped_recipe()
    own = protocol or protocol_with(epochs)
    out = [job(task, seed, "lora", lr, options, own) for seed in seeds for task in tasks]
    out += [job(task, seed, "full", METHODS["full"].lr, None, protocol) for seed in seeds for task in full_tasks]
    return out + [job(task, seed, "full", METHODS["full"].lr, None, own) for seed in seeds
                  for task in same_schedule_full_tasks if own != (protocol or PROTOCOL)]


def finished(cache: Path | None = None) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Every finished (job, result) pair in the cache file, in the order they finished."""
    return finished_jobs(cache or CACHE)


def accuracies(done: list[tuple[dict[str, Any], dict[str, Any]]]) -> dict[Key, dict[str, dict[str, dict[int, float]]]]:
    """``{(label, lr): {task: {split: {seed: accuracy %}}}}`` of every finished run."""
    out: dict[Key, dict[str, dict[str, dict[int, float]]]] = {}
    for j, res in done:
        for run in res.get("runs", []):
            by_split = run.get("accuracies") or {j.get("eval_split", "test"): run["accuracy"]}
            for split, acc in by_split.items():
                out.setdefault((_label(j), j["lr"]), {}).setdefault(j["task"], {}).setdefault(split, {})[run["seed"]] = 100 * acc
    return out


def round_one_full(path: Path | None = None, n_train: int = PROTOCOL["n_train"]) -> dict[str, dict[int, float]]:
    """Full fine-tuning's test accuracy % per task and seed from round one (``bench/results/full.json``)."""
    path = path or RESULTS / "full.json"
    if not path.exists():
        return {}
    out: dict[str, dict[int, float]] = {}
    for res in json.loads(path.read_text()).get("accuracy", []):
        j = res.get("job", {})
        if j.get("method") == "full" and j.get("lib") == "deltatune" and j.get("n_train") == n_train:
            out[j["task"]] = {r["seed"]: 100 * r["accuracy"] for r in res.get("runs", [])}
    return out


def search_table(acc: dict[Key, Any], tasks: list[str]) -> tuple[list[str], dict[str, Any] | None]:
    """Markdown rows of the validation search and the best candidate (seed-0 mean over ``tasks``).

    The last two columns re-score the candidates that ran more seeds on every task: the validation mean
    over tasks and seeds, and the sample std over seeds of the per-seed task mean (the pick's noise).
    """
    lines = ["| candidate | lr | " + " | ".join(f"{TASK_NAMES[t]} val" for t in tasks)
             + " | mean (seed 0) | mean over seeds | seed std of the mean |",
             "|---|---|" + "---|" * (len(tasks) + 3)]
    best = None
    for (label, lr), by_task in sorted(acc.items()):
        if label.startswith("full fine-tuning"):
            continue
        val = {t: by_task.get(t, {}).get("validation", {}) for t in tasks}
        vals = {t: val[t].get(0) for t in tasks}
        if all(v is None for v in vals.values()):
            continue
        complete = all(v is not None for v in vals.values())
        mean = _mean([v for v in vals.values() if v is not None]) if complete else None
        cells = [f"{v:.2f}" if v is not None else "not run" for v in vals.values()]
        seeds = sorted(set.intersection(*(set(val[t]) for t in tasks)))
        per_seed = [_mean([val[t][s] for t in tasks]) for s in seeds]
        multi = (f"{_mean(per_seed):.2f} (seeds {','.join(map(str, seeds))}) | {_std(per_seed):.2f}"
                 if len(seeds) > 1 else "— | —")
        lines.append(f"| {label} | {lr:g} | {' | '.join(cells)} | {f'{mean:.2f}' if mean is not None else '—'} | {multi} |")
        if mean is not None and (best is None or mean > best["mean"]):
            best = {"label": label, "lr": lr, "mean": mean}
    return lines, best


_SCHEDULE = re.compile(r"(, \d+ epochs)?(, warm-up [\d.]+%)?$")


def _same_schedule_full(acc: dict[Key, Any], label: str, task: str) -> dict[int, float]:
    """Full fine-tuning's test accuracy per seed at ``label``'s schedule, when that is not round one's."""
    suffix = _SCHEDULE.search(label).group(0)  # type: ignore[union-attr]  # the pattern matches the empty string
    if not suffix:
        return {}
    return acc.get(("full fine-tuning" + suffix, METHODS["full"].lr), {}).get(task, {}).get("test", {})


def _gap_cells(a: dict[int, float], full: dict[int, float], source: str, is_full: bool) -> str:
    """``reference | gap`` over the seeds of ``a`` (``— | —`` unless ``full`` has every one of them)."""
    if not full or any(s not in full for s in a):
        return "— | —"
    f = _mean([full[s] for s in a])
    return f"{f:.2f}{source} | " + ("—" if is_full else f"{_mean(list(a.values())) - f:+.2f}")


def test_table(acc: dict[Key, Any], full1: dict[str, dict[int, float]]) -> list[str]:
    """Test accuracy (mean ± sample std over the seeds run) and the gap to full fine-tuning (same seeds): to
    full fine-tuning under round one's protocol (2 epochs), and to full fine-tuning at the row's own schedule
    where that ran (a 3-epoch LoRA beside a 3-epoch full fine-tuning)."""
    lines = [("| task | configuration | lr | seeds | test acc % | full FT, same seeds | gap (pt) "
              "| full FT, same schedule | gap, same schedule (pt) |"), "|---|---|---|---|---|---|---|---|---|"]
    tasks = sorted({t for by_task in acc.values() for t in by_task}, key=lambda t: list(TASK_NAMES).index(t))
    for task in tasks:
        full_here = acc.get(("full fine-tuning", METHODS["full"].lr), {}).get(task, {}).get("test", {})
        full = full_here or full1.get(task, {})
        source = "" if full_here else " (round one)"
        for (label, lr), by_task in sorted(acc.items()):
            test = by_task.get(task, {}).get("test", {})
            if not test:
                continue
            seeds = sorted(test)
            a = {s: test[s] for s in seeds}
            is_full = label.startswith("full fine-tuning")
            same = _gap_cells(a, _same_schedule_full(acc, label, task), "", is_full)
            lines.append(f"| {TASK_NAMES[task]} | {label} | {lr:g} | {','.join(map(str, seeds))} | "
                         f"{_mean(list(a.values())):.2f} ± {_std(list(a.values())):.2f} | "
                         f"{_gap_cells(a, full, source, label == 'full fine-tuning')} | {same} |")
    return lines


def write_report(folder: Path | None = None, stem: str = "recipe", full_json: Path | None = None,
                 n_train: int = PROTOCOL["n_train"]) -> None:
    """``<stem>.md`` (tables) and ``<stem>.json`` (every finished job) from the cache file ``.<stem>.jobs.jsonl``.

    Defaults: ``bench/results/recipe.*``, round one's full fine-tuning from ``full.json``.
    """
    folder = folder or RESULTS
    done = finished(folder / f".{stem}.jobs.jsonl")
    acc = accuracies(done)
    search, best = search_table(acc, SEARCH_TASKS)
    options, lr, epochs = shipped_recipe()
    md = ["# LoRA default recipe (`python -m bench.recipe`)", "",
          ("Bundled MiniLM, round one's accuracy protocol: first 2,000 training rows (BBC 1,701), 2 epochs (3 where a row says so), batch 16, "
          "bf16 autocast, AdamW (no weight decay), 6 % warm-up then linear decay, gradient clipping at 1; "
          "LoRA dropout 0.1, alpha = 2r, classifier head trained. One process at a time, 1 thread. Every "
          "trained model is scored on the validation and the test split; the pick reads only validation."), "",
          "## Search (validation splits; seed 0, then more seeds for the leading candidates)", "", *search, "",
          (f"Best mean validation accuracy: **{best['label']}, lr {best['lr']:g}** ({best['mean']:.2f})." if best else
           "No candidate has finished on every search task yet."),
          f"Shipped as `LoraConfig.recommended` / `deltatune train`'s default: {options}, lr {lr:g}, {epochs} epochs.", "",
          "## Test splits", "",
          ("Gap = configuration − full fine-tuning (lr 1e-4) over the same seeds; full fine-tuning from this run "
          "where it ran here, else from round one's `full` suite (same protocol, `bench/results/full.json`). "
          "SMS spam was not used to pick the recipe."), "",
          *test_table(acc, round_one_full(full_json, n_train)), ""]
    (folder / f"{stem}.md").write_text("\n".join(md))
    (folder / f"{stem}.json").write_text(json.dumps([{"job": j, "result": r} for j, r in done], indent=1) + "\n")


Runner = Callable[[list[dict[str, Any]]], list[dict[str, Any]]]


def run_jobs(jobs: list[dict[str, Any]], run: Runner, report: Callable[[], None]) -> None:
    """Run ``jobs`` one at a time through ``run`` (a cache-aware :func:`bench.runner.run_many`), rewriting the
    report after each job."""
    for one in jobs:
        res = run([one])[0]
        print(json.dumps({"task": one["task"], "config": _label(one), "lr": one["lr"], "seeds": one["seeds"],
                          "acc": [r.get("accuracies") for r in res.get("runs", [])], "error": res.get("error")}),
              flush=True)
        report()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("search", help="candidates on the validation splits")
    s.add_argument("--tasks", nargs="+", default=SEARCH_TASKS)
    s.add_argument("--targets", nargs="+", default=["all", "qv"], choices=sorted(TARGETS))
    s.add_argument("--ranks", nargs="+", type=int, default=[8, 16])
    s.add_argument("--lrs", nargs="+", type=float, default=[1e-3, 2e-3])
    s.add_argument("--seeds", nargs="+", type=int, default=[0])
    s.add_argument("--dropouts", nargs="+", type=float, default=[0.1], help="LoRA dropout of the candidates")
    s.add_argument("--epochs", nargs="+", type=int, default=[PROTOCOL["epochs"]], help="epochs of the candidates")
    s.add_argument("--warmups", nargs="+", type=float, default=[None],
                   help="warm-up share of the candidates (default: the protocol's 6%%)")
    s.add_argument("--with-full", action="store_true",
                   help="also full fine-tuning (its own lr) at each candidate schedule: the same-schedule reference")
    t = sub.add_parser("test", help="the shipped recipe (and full fine-tuning where asked) on the test splits")
    t.add_argument("--tasks", nargs="+", default=["trec", "rt", "bbc", "sms"])
    t.add_argument("--full-tasks", nargs="*", default=["sms"], help="tasks on which full fine-tuning runs too")
    t.add_argument("--same-schedule-full-tasks", nargs="*", default=[],
                   help="tasks on which full fine-tuning also runs at the recipe's epochs")
    t.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    sub.add_parser("report", help="rewrite recipe.md / recipe.json from the finished jobs")
    args = parser.parse_args(argv)
    if args.command == "report":
        write_report()
        return 0
    if args.command == "search":
        jobs = [job(task, seed, "lora", lr, lora_options(tg, r, dropout), protocol_with(epochs, warmup))
                for tg in args.targets for r in args.ranks for dropout in args.dropouts for lr in args.lrs
                for epochs in args.epochs for warmup in args.warmups for seed in args.seeds for task in args.tasks]
        if args.with_full:
            jobs += [job(task, seed, "full", METHODS["full"].lr, None, protocol_with(epochs, warmup))
                     for epochs in args.epochs for warmup in args.warmups for seed in args.seeds for task in args.tasks]
    else:
        jobs = test_jobs(args.tasks, args.full_tasks, args.seeds, same_schedule_full_tasks=args.same_schedule_full_tasks)
    cache = part_cache(CACHE, RESULTS / "recipe.json", resume=True)  # a fresh checkout resumes from the committed file
    run_jobs(jobs, lambda todo: run_many(todo, workers=1, threads=1, cache=cache), write_report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
