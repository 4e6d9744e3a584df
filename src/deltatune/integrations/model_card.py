"""``README.md`` model cards for adapter folders, as HF peft writes them: the hub reads the YAML header
(``base_model``, ``library_name``, ``tags``), people read the rest.

:func:`write_model_card` is called by ``DeltaModel.save_pretrained`` (base model, method, targets, trainable
share); :func:`add_training_results` by ``deltatune train`` once ``summary.json`` exists (data, steps, final
metrics). A README.md that deltatune did not write is never touched.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..checkpoint.atomic import atomic_write_text

CARD_NAME = "README.md"
MARKER = "<!-- written by deltatune; edit freely, delete this line to keep deltatune from updating it -->"
RESULTS_HEADING = "## Training"


@dataclass(frozen=True)
class AdapterSummary:
    """What the card says about one adapter of the folder."""

    name: str
    method: str  # registry name, e.g. "lora"
    peft_type: str  # e.g. "LORA"
    task_type: str | None
    targets: Any  # target_modules as configured (list, regex string or None)
    trainable: int  # adapter parameters
    total: int  # base + adapter parameters


def _ours(path: Path) -> bool:
    return not path.exists() or MARKER in path.read_text(encoding="utf-8", errors="replace").splitlines()[:8]


def card_text(base: str | None, adapters: list[AdapterSummary], results: str = "") -> str:
    """The card's text: YAML header, one line per adapter, how to load it, and optional training results."""
    header = ["---", "library_name: peft", "tags:", "- deltatune"]
    header += [f"- {a.method}" for a in adapters] + ([f"base_model: {base}"] if base else []) + ["---"]
    lines = [*header, MARKER, "", "# Adapter", "",
             f"Base model: `{base}`" if base else "Base model: not recorded (pass it when loading).", ""]
    for a in adapters:
        share = 100 * a.trainable / a.total if a.total else 0.0
        where = "" if a.name == "default" else f" (subfolder `{a.name}/`)"
        lines.append(f"- `{a.name}`{where}: {a.method} ({a.peft_type}), task {a.task_type or 'any'}, targets "
                     f"`{a.targets}`; {a.trainable:,} trainable of {a.total:,} parameters ({share:.3f}%)")
    how = ("Load with deltatune (`dt.DeltaModel.from_pretrained(base, folder)`), HF peft "
           "(`AutoPeftModelForCausalLM.from_pretrained(folder)` or `PeftModel.from_pretrained(base, folder)`), or "
           "transformers (`AutoModelForCausalLM.from_pretrained(folder)`, `model.load_adapter(folder)`).")
    lines += ["", how, ""]
    return "\n".join(lines) + (f"\n{results}" if results else "")


def write_model_card(folder: Path, base: str | None, adapters: list[AdapterSummary]) -> None:
    """Write ``folder/README.md`` unless a README.md deltatune did not write is there; keeps training results."""
    path = folder / CARD_NAME
    if not _ours(path):
        return
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    results = old[old.index(RESULTS_HEADING):] if RESULTS_HEADING in old else ""
    atomic_write_text(path, card_text(base, adapters, results))


def summary_from_folder(folder: Path, name: str, method: str, total: int) -> AdapterSummary:
    """An adapter's card line read from its files (config, and the tensor sizes in the safetensors header)."""
    import json

    from safetensors import safe_open

    config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    trainable = 0
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as handle:
        for key in handle.keys():  # noqa: SIM118 (safe_open is not iterable)
            count = 1
            for dim in handle.get_slice(key).get_shape():
                count *= dim
            trainable += count
    return AdapterSummary(name, method, str(config.get("peft_type")), config.get("task_type"),
                          config.get("target_modules"), trainable, total)


def add_training_results(folder: Path, summary: dict[str, Any]) -> None:
    """Append what ``deltatune train`` reports (``summary.json``'s data, steps and final metrics) to the card
    of the adapter in ``folder``, writing the card first if the folder has none."""
    import json

    path = folder / CARD_NAME
    if not _ours(path):
        return
    if not path.exists():
        base = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8")).get("base_model_name_or_path")
        entry = summary_from_folder(folder, "default", str(summary.get("method")), int(summary.get("total_params", 0)))
        write_model_card(folder, base, [entry])
    text = path.read_text(encoding="utf-8")
    text = text[: text.index(RESULTS_HEADING)] if RESULTS_HEADING in text else text
    trained = (f"Trained with `deltatune train` on `{summary.get('data')}` ({summary.get('train_examples')} "
               f"training examples, {summary.get('steps')} optimizer steps, {summary.get('wall_time_s', 0):.0f} s).")
    lines = [RESULTS_HEADING, "", trained, ""]
    for split, metrics in (summary.get("final") or {}).items():
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, (int, float)))
        lines.append(f"- {split}: {shown}")
    atomic_write_text(path, text.rstrip("\n") + "\n\n" + "\n".join(lines) + "\n")
