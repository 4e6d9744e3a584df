"""Report sections 5 (forgetting), 6 (inference) and the targets summary."""

from __future__ import annotations

from typing import Any

from bench import aggregate as agg
from bench.report import TASK_NAMES, _f, _mean_at, _paired, _table


def forgetting_section(raw: dict[str, Any]) -> list[str]:
    res = [r for r in raw.get("forgetting") or [] if r.get("ok")]
    if not res:
        return []
    corpora = [c for c in res[0]["before"] if c != "chatterbot_test"]
    lines = ["## 5. Forgetting (SmolLM2-135M-Instruct fine-tuned on ChatterBot Q/A)", "",
             f"{res[0]['steps']} steps, batch {raw['settings']['forget_batch_size']}, loss on the answer only. "
             "Perplexity on held-out general text (" + ", ".join(f"{c}: {n} passages" for c, n in res[0]["corpora"].items()) +
             "; see bench/corpus.py) and on the ChatterBot test split, before → after.", ""]
    rows = []
    for r in res:
        row = [r["method"], f"{r['lr']:g}", f"{r['trainable']:,}", _f(1000 * r["step_s"], "{:.0f}"), _f(r["peak_mb"], "{:.0f}"),
               f"{r['before']['chatterbot_test']:.2f} → {r['after']['chatterbot_test']:.2f}"]
        for c in corpora:
            b, a = r["before"][c], r["after"][c]
            row.append(f"{b:.2f} → {a:.2f} ({100 * (a / b - 1):+.1f}%)")
        rows.append(row)
    lines += _table(["method", "lr", "trainable", "step ms", "peak MB", "ChatterBot test ppl"] + [f"{c} ppl" for c in corpora], rows)
    for r in res:
        if "disabled" in r:
            same = all(r["disabled"][c] == r["before"][c] for c in r["before"])
            lines += ["", "LoRA with the adapter disabled: perplexities "
                      + ", ".join(f"{c} {r['disabled'][c]:.4f} (base {r['before'][c]:.4f})" for c in r["before"])
                      + f"; identical to the base: **{'yes' if same else 'NO'}**; max |logit difference| on a probe batch: "
                      f"{r['disabled_logit_max_abs_diff']:.3g}."]
    return lines + [""]


def inference_section(raw: dict[str, Any]) -> list[str]:
    inf = raw.get("inference")
    if not inf or not inf.get("ok"):
        return []
    lines = ["## 6. Inference overhead", "",
             (f"MiniLM forward, batch {inf['batch']} x {inf['length']} tokens, torch.inference_mode, 2 threads; "
             f"{inf['rounds']} interleaved rounds of {inf['reps']} forward(s); ratio = median over rounds of "
             "(variant time / base time in the same round)."), ""]
    rows = [[n, f"{v['median_ms']:.1f}", f"{v['ratio']:.3f}"] for n, v in inf["rows"].items()]
    rows += [[n, "not run", why[:80]] for n, why in inf.get("missing", {}).items()]
    return lines + _table(["variant", "median ms", "x base"], rows) + [""]


def _check(value: float | None, ok: bool | None) -> str:
    return "n/a" if value is None or ok is None else ("met" if ok else "**missed**")


def _peft_accuracy_targets(acc: dict) -> list[list[str]]:
    """deltatune's accuracy within noise of peft's: ``|mean difference| <= 2 x`` the larger of the two seed
    standard deviations (needs at least 2 seeds on both sides; with fewer the status is n/a)."""
    rows = []
    for key, p in sorted(acc.items()):
        m, lib, t, _ = key
        d = acc.get((m, "deltatune", t, key[3]))
        if lib != "peft" or d is None:
            continue
        diff, noise = d["mean"] - p["mean"], 2 * max(d["std"], p["std"])
        ok = None if min(len(d["accs"]), len(p["accs"])) < 2 else abs(diff) <= noise
        rows.append([f"{m}: deltatune - peft accuracy within noise ({TASK_NAMES[t]})",
                     f"{diff:+.2f} pt (noise {noise:.2f})", _check(diff, ok)])
    return rows


def targets_section(raw: dict[str, Any], acc: dict, cost: dict) -> list[str]:
    """Each target of the issue with its measured value; nothing is adjusted to pass."""
    rows: list[list[str]] = []
    tasks = raw["settings"]["tasks"]

    def gap(m: str, t: str) -> float | None:
        a = next((v for k, v in acc.items() if k[:3] == (m, "deltatune", t)), None)
        f = next((v for k, v in acc.items() if k[:3] == ("full", "deltatune", t)), None)
        return a["mean"] - _mean_at(f, a["seeds"]) if a and f else None

    for m, limit in (("lora", 1.0), ("ia3", 2.0), ("houlsby", 2.0), ("pfeiffer", 2.0), ("parallel", 2.0)):
        if not any(k[0] == m for k in acc):  # not among this suite's accuracy runs
            continue
        for t in tasks:
            g = gap(m, t)
            rows.append([f"{m} within {limit:g} pt of full FT on {TASK_NAMES[t]}", _f(g, "{:+.2f} pt"),
                         _check(g, None if g is None else g >= -limit)])
    for t in sorted({k[2] for k in cost}):
        full, lora = cost.get(("full", "deltatune", t), {}), cost.get(("lora", "deltatune", t), {})
        st, mem = lora.get("ratio_full_paired"), agg.ratio(lora.get("peak_mb"), full.get("peak_mb"))
        rows.append([f"LoRA step time <= 0.65x full FT ({TASK_NAMES[t]})", _f(st, "{:.2f}x"), _check(st, None if st is None else st <= 0.65)])
        rows.append([f"LoRA peak memory <= 0.6x full FT ({TASK_NAMES[t]})", _f(mem, "{:.2f}x"), _check(mem, None if mem is None else mem <= 0.6)])
        fr = agg.ratio(full.get("file_bytes"), lora.get("file_bytes"))
        rows.append(["LoRA file >= 250x smaller than the model", _f(fr, "{:.0f}x"), _check(fr, None if fr is None else fr >= 250)])
        for m in sorted({k[0] for k in cost if k[1] == "peft" and k[2] == t}):
            d, p = cost.get((m, "deltatune", t), {}), cost.get((m, "peft", t), {})
            for what, r in (("step time", _paired(d, p)), ("peak memory", agg.ratio(d.get("peak_mb"), p.get("peak_mb")))):
                rows.append([f"{m}: deltatune/peft {what} <= 1.0 ({TASK_NAMES[t]})", _f(r, "{:.3f}x"), _check(r, None if r is None else r <= 1.0)])
    rows += _peft_accuracy_targets(acc)
    inf = (raw.get("inference") or {}).get("rows", {})
    for label, limit in (("LoRA merged", 1.02), ("LoRA unmerged", 1.10)):
        r = inf.get(label, {}).get("ratio")
        rows.append([f"{label} inference <= {limit:.2f}x base", _f(r, "{:.3f}x"), _check(r, None if r is None else r <= limit)])
    return ["## Targets", ""] + _table(["target", "measured", "status"], rows) + [""]
