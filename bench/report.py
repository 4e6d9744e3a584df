"""Markdown tables for a suite's raw results, plus the targets the issue sets (measured, never adjusted)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from bench import aggregate as agg
from bench.methods import METHODS

TASK_NAMES = {"trec": "TREC", "rt": "Rotten Tomatoes", "bbc": "BBC"}


def _f(x: float | None, fmt: str = "{:.2f}") -> str:
    return "n/a" if x is None else fmt.format(x)


def _size(n: int | None) -> str:
    if n is None:
        return "n/a"
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"] + [
        "| " + " | ".join(r) + " |" for r in rows
    ]


def _methods_in(keys: Any, lib: str) -> list[str]:
    present = {k[0] for k in keys if k[1] == lib}
    return [m for m in METHODS if m in present]


def _mean_at(full: dict[str, Any], seeds: list[int]) -> float:
    """Full fine-tuning's mean over ``seeds`` (a gap compares the same seeds), or over all its seeds."""
    at = [a for a, seed in zip(full["accs"], full.get("seeds", [])) if seed in seeds]
    return sum(at) / len(at) if len(at) == len(seeds) else full["mean"]


def accuracy_section(raw: dict[str, Any], acc: dict, s: dict[str, Any]) -> list[str]:
    tasks = [t for t in s["tasks"] if any(k[2] == t for k in acc)]
    done = [r for r in raw.get("accuracy") or [] if r.get("ok")]
    size = {t: next(((r["n_train"], r.get("n_test", 0)) for r in done if r["job"]["task"] == t), (0, 0)) for t in tasks}
    sizes = "; ".join(f"{TASK_NAMES[t]} {size[t][0]:,} train / {size[t][1]:,} test" for t in tasks)
    lines = ["## 1. Accuracy vs full fine-tuning", "",
             (f"Bundled MiniLM (all-MiniLM-L6-v2), the first {s['n_train']:,} training examples per task ({sizes}), "
             f"{s['epochs']} epochs, batch {s['batch_size']}, seeds {s['seeds']}; test accuracy in %, "
             "mean ± sample std over seeds; gap = method − full fine-tuning over the same seeds (points)."), ""]
    header = ["method", "trainable", "% of model"] + [f"{TASK_NAMES[t]} {c}" for t in tasks for c in ("acc", "gap")]
    marked = any(any(v.get("reused_from", [""])) for v in acc.values())
    if marked:  # rows a narrower run kept from an earlier one (bench/run.py ``_carried``): say which run, per row
        header.append("measured")
    rows = []
    for m in _methods_in(acc, "deltatune"):
        some = next(v for k, v in acc.items() if k[0] == m and k[1] == "deltatune")
        row = [METHODS[m].label, f"{some['trainable']:,}", f"{100 * some['trainable'] / some['base_params']:.3f}"]
        for t in tasks:
            cell = next((v for k, v in acc.items() if k[:3] == (m, "deltatune", t)), None)
            full = next((v for k, v in acc.items() if k[:3] == ("full", "deltatune", t)), None)
            if cell is None:
                row += ["n/a", "n/a"]
                continue
            gap = f"{cell['mean'] - _mean_at(full, cell['seeds']):+.2f}" if full and m != "full" else "—"
            short = f" (seeds {cell['seeds']})" if len(cell["seeds"]) < len(s["seeds"]) else ""
            row += [f"{cell['mean']:.2f} ± {cell['std']:.2f}{short}", gap]
        if marked:
            marks = {mark for k, v in acc.items() if k[:2] == (m, "deltatune") for mark in v.get("reused_from", [""])}
            row.append("; ".join(_when_measured(mark) for mark in sorted(marks)))
        rows.append(row)
    return lines + _table(header, rows) + [""]


def _when_measured(reused_from: str) -> str:
    """A row's "measured" cell: ``this run``, or the date and commit a kept result's ``reused_from`` names."""
    if not reused_from:
        return "this run"
    date = re.search(r"\d{4}-\d\d-\d\d", reused_from)
    commit = re.search(r"\b[0-9a-f]{7,40}\b", reused_from)
    return "earlier run" + (f", {date.group()}" if date else "") + (f" ({commit.group()})" if commit else "")


def cost_section(cost: dict, s: dict[str, Any]) -> list[str]:
    lines = ["## 2. Cost: step time, peak training memory, file size", "",
             (f"Step time: median over {s['timing_rounds'] * s['timing_per_round']} steps per configuration after "
              f"{s['timing_warmup']} warm-up steps, all configurations in one process taking turns ({s['timing_rounds']} "
              f"rounds of {s['timing_per_round']} steps, rotating order, same batches), {s.get('cost_threads', 2)} thread(s); x full = median over "
              "rounds of the per-round time ratio. Peak memory: one process per configuration, "
              f"{s['memory_steps']} steps, peak RSS above the RSS after the model and method are loaded (see "
              "bench/README.md). Loaded = that baseline RSS. File: what must be stored (adapter folder incl. the "
              "trained head; the whole model for full fine-tuning)."), ""]
    for task in sorted({k[2] for k in cost}):
        full = cost.get(("full", "deltatune", task), {})
        model_bytes = full.get("file_bytes")
        rows = []
        for lib in ("deltatune", "peft"):
            for m in _methods_in([k for k in cost if k[2] == task], lib):
                c = cost[(m, lib, task)]
                rows.append([METHODS[m].label, lib, _f(1000 * c["step_s"] if c["step_s"] else None, "{:.1f}"),
                             _f(c["ratio_full_paired"]), _f(c["peak_mb"], "{:.0f}"),
                             _f(agg.ratio(c["peak_mb"], full.get("peak_mb"))), _f(c["baseline_mb"], "{:.0f}"),
                             _size(c["file_bytes"]), _f(agg.ratio(model_bytes, c["file_bytes"]), "{:.0f}x")])
        lines += [f"**{TASK_NAMES[task]}**", ""]
        header = ["method", "library", "step ms", "x full", "peak MB", "x full", "loaded MB", "file", "model / file"]
        lines += _table(header, rows) + [""]
    return lines


def _paired(d: dict[str, Any], p: dict[str, Any]) -> float | None:
    """deltatune/peft step-time ratio: paired round by round, else via the paired ratios to full FT, else the medians."""
    if d.get("ratio_peft_paired") is not None:
        return d["ratio_peft_paired"]
    paired = agg.ratio(d.get("ratio_full_paired"), p.get("ratio_full_paired"))
    return paired if paired is not None else agg.ratio(d.get("step_s"), p.get("step_s"))


def peft_section(acc: dict, cost: dict, raw: dict[str, Any] | None = None) -> list[str]:
    lines = ["## 3. deltatune vs HF peft (same hyper-parameters, data order and run)", "",
             ("Ratios are deltatune / peft (below 1 = deltatune cheaper); accuracy difference is deltatune − peft "
             "in points (mean over seeds), with the larger of the two seed spreads for scale."), ""]
    rows = []
    for m in _methods_in(list(cost) + list(acc), "peft"):
        for task in sorted({k[2] for k in cost if k[0] == m and k[1] == "peft"} | {k[2] for k in acc if k[0] == m and k[1] == "peft"}):
            d, p = cost.get((m, "deltatune", task), {}), cost.get((m, "peft", task), {})
            da = next((v for k, v in acc.items() if k[:3] == (m, "deltatune", task)), None)
            pa = next((v for k, v in acc.items() if k[:3] == (m, "peft", task)), None)
            diff = f"{da['mean'] - pa['mean']:+.2f} (± {max(da['std'], pa['std']):.2f})" if da and pa else "n/a"
            rows.append([METHODS[m].label, TASK_NAMES[task], _f(_paired(d, p)),
                         _f(agg.ratio(d.get("peak_mb"), p.get("peak_mb"))), diff,
                         _f(agg.ratio(d.get("file_bytes"), p.get("file_bytes")))])
    failed = {}
    for res in (raw or {}).get("memory") or []:
        job = res.get("job", {})
        if not res.get("ok") and job.get("lib") == "peft":
            failed[job["method"]] = res.get("error", "")
    rows += [[METHODS[m].label, "all", "peft fails", "", why[:90], ""] for m, why in failed.items()]
    return lines + _table(["method", "task", "step time", "peak memory", "accuracy diff", "file size"], rows) + [""]


def lowdata_section(raw: dict[str, Any], acc: dict, s: dict[str, Any]) -> list[str]:
    low = agg.accuracy(raw, "lowdata")
    if not low:
        return []
    task, sizes = s["lowdata_task"], sorted({k[3] for k in low})
    big = {k[0]: v for k, v in acc.items() if k[1] == "deltatune" and k[2] == task}
    lines = ["## 4. Low-data regime", "",
             (f"{TASK_NAMES[task]}, first n training examples of the fixed split, at least {s['lowdata_min_steps']} steps "
             f"(small sets repeat epochs), seeds {s['lowdata_seeds']}; accuracy % mean ± std, (gap to full FT)."), ""]
    rows = []
    for m in [m for m in METHODS if any(k[0] == m for k in low)]:
        row = [METHODS[m].label]
        for n in sizes + ([s["n_train"]] if big else []):
            cell = low.get((m, "deltatune", task, n)) or (big.get(m) if n == s["n_train"] else None)
            full = low.get(("full", "deltatune", task, n)) or (big.get("full") if n == s["n_train"] else None)
            gap = f" ({cell['mean'] - full['mean']:+.1f})" if cell and full and m != "full" else ""
            row.append(f"{cell['mean']:.1f} ± {cell['std']:.1f}{gap}" if cell else "n/a")
        rows.append(row)
    return lines + _table(["method"] + [f"n={n}" for n in sizes + ([s["n_train"]] if big else [])], rows) + [""]


def header_section(raw: dict[str, Any]) -> list[str]:
    m = raw["machine"]
    lines = [f"# deltatune benchmarks: suite `{raw['suite']}`", "",
             (f"Command: `{raw.get('command', 'python -m bench --suite ' + raw['suite'])}` — started {raw['started']}."
             + (" Minutes per part (each part's own span, not a total: parts of one run overlap, and a part kept "
                "from an earlier run keeps its time; see Measured): "
                + ", ".join(f"{k} {v / 60:.1f}" for k, v in raw["part_seconds"].items()) + "."
                if raw.get("part_seconds") else "")), "",
             (f"Machine: {m['cpu']}, {m['cpu_count']} cores, {m['memory_gb']} GB; {m['platform']}. torch threads: {raw['settings'].get('cost_threads', 2)} (cost jobs). "
             f"Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, peft {m['peft']}, "
             f"deltatune {m['deltatune']} (commit {m['commit']})."), ""]
    results = agg.job_results(raw)
    earlier = sorted({r["reused_from"] for _, r in results if r.get("reused_from")})
    if earlier:
        lines += ["Some jobs are the same jobs (identical settings) run by an earlier suite, reused: "
                  + "; ".join(earlier) + ".", ""]
    reused = sum(1 for _, r in results if r.get("reused"))
    if reused:
        lines += [(f"Resumed run (`--resume`): {reused} of {len(results)} jobs were reused from the interrupted run; "
                   "their time is not in the total above."), ""]
    precision = raw["settings"].get("accuracy_autocast")
    lines += [("Precision: accuracy and low-data runs train under " + (
        f"CPU {precision} autocast (mixed precision; weights, gradients and optimiser state stay float32)"
        if precision else "float32") + "; the cost, forgetting and inference measurements run in float32."), ""]
    if raw["suite"] == "quick":
        lines += [("**`quick` checks the harness end to end** (every method, a few steps, small data): its accuracies "
                  "are not results, and its timings rest on a handful of steps. The published numbers come from "
                  "`full`."), ""]
    if len(set(raw.get("measured", {}).values())) > 1:
        lines += ["Measured (parts re-run separately): " + "; ".join(f"{k} {v}" for k, v in raw["measured"].items()), ""]
    if raw.get("skipped"):
        lines += ["Not run: " + "; ".join(f"{k} ({v})" for k, v in raw["skipped"].items()), ""]
    return lines


def write_report(raw: dict[str, Any], folder: Path) -> Path:
    """Write ``<suite>.md`` and the charts into ``folder``; returns the markdown path."""
    from bench.charts import write_charts
    from bench.report_extra import forgetting_section, inference_section, targets_section

    acc, cost, s = agg.accuracy(raw), agg.cost(raw), raw["settings"]
    charts = write_charts(raw, acc, cost, folder)
    lines = header_section(raw)
    lines += targets_section(raw, acc, cost)
    if acc:
        lines += accuracy_section(raw, acc, s)
    if cost:
        lines += cost_section(cost, s)
    if any(k[1] == "peft" for k in list(cost) + list(acc)):
        lines += peft_section(acc, cost, raw)
    lines += lowdata_section(raw, acc, s) + forgetting_section(raw) + inference_section(raw)
    lines += [f"![{c.stem}]({c.name})" for c in charts] + [""]
    failed = agg.failures(raw)
    if failed:
        lines += ["## Failed configurations", ""] + [f"- {f}" for f in failed] + [""]
    path = folder / f"{raw['suite']}.md"
    path.write_text("\n".join(lines))
    return path
