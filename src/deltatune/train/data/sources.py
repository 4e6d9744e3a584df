"""Where the rows of a run come from: a built-in data set or local files, resolved into three splits.

* built-in name (``trec``, ``rt``, ``bbc``, ``sms``, ``chatterbot``): the documented seeded 80/10/10 split
  of :mod:`deltatune.train.data.builtin`.
* one local file: validated by :func:`deltatune.train.data.files.load_file` and split 80/10/10 the same way
  (stratified by label for classification, grouped by prompt for pairs).
* local files for ``validation_data`` / ``test_data`` too: the main file is used whole for training.

The task decides the row shape: ``seq_cls`` reads ``{"text", "label"}``, ``instruct``/``seq2seq`` read
``{"prompt", "response"}``, ``causal_lm`` reads ``{"text"}`` (a built-in pairs set becomes
``prompt + "\\n" + response``).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..fields import option
from .builtin import BUILTIN_DATASETS, DataError, label_names, load_builtin, split_rows
from .files import infer_label_names, load_file

ROW_KIND = {"seq_cls": "classification", "instruct": "pairs", "seq2seq": "pairs", "causal_lm": "text"}
Row = dict[str, str]


@dataclass
class DataSpec:
    """What to read. Column names apply to local files only; each field's help is in its metadata."""

    data: str = option("trec",
        "built-in data set (trec, rt, bbc, sms, chatterbot) or a local .jsonl/.csv/.tsv/.txt file (a lone "
        "file is split 80/10/10 by --split-seed)")
    validation_data: str | None = option(None,
        "local file used as the validation split (then --data is used whole for training)")
    test_data: str | None = option(None, "local file used as the test split")
    text_column: str = option("text", "column/field holding the text")
    label_column: str = option("label", "column/field holding the label")
    prompt_column: str = option("prompt", "column/field holding the prompt")
    response_column: str = option("response", "column/field holding the response")
    split_seed: int = option(0, "seed of the train/validation/test split")

    @classmethod
    def from_options(cls, options: Any) -> DataSpec:
        return cls(**{k: getattr(options, k) for k in cls.__dataclass_fields__})

    @property
    def is_builtin(self) -> bool:
        return self.data in BUILTIN_DATASETS


@dataclass
class Splits:
    """Rows per split plus the label names (label id = position) for classification."""

    train: list[Row]
    validation: list[Row]
    test: list[Row]
    labels: list[str] | None

    def get(self, split: str) -> list[Row]:
        if split == "all":
            return self.train + self.validation + self.test
        if split not in ("train", "validation", "test"):
            raise DataError(f"Unknown split {split!r}; use train, validation, test or all.")
        return getattr(self, split)


def infer_task(spec: DataSpec) -> str:
    """The task a data source suits: from the built-in set's kind, or a local file's first record."""
    if spec.is_builtin:
        return "seq_cls" if BUILTIN_DATASETS[spec.data].task == "classification" else "instruct"
    path = Path(spec.data)
    if not path.is_file():
        raise DataError(
            f"Data {spec.data!r} is neither a built-in data set ({sorted(BUILTIN_DATASETS)}) nor an existing file."
        )
    if path.suffix.lower() == ".txt":
        return "causal_lm"
    keys = _first_record_keys(path)
    if spec.label_column in keys and spec.text_column in keys:
        return "seq_cls"
    if spec.prompt_column in keys and spec.response_column in keys:
        return "instruct"
    others = sorted(keys - {spec.text_column})
    if spec.text_column in keys and others:
        raise DataError(
            f"{path} has a {spec.text_column!r} column and {others}, but no {spec.label_column!r} column, so the task "
            f"is unclear. For classification name the label column: --label-column {others[0]} (the task is then "
            "seq_cls); to train a language model on the text alone pass --task causal_lm."
        )
    if spec.text_column in keys:
        return "causal_lm"
    raise DataError(
        f"{path}: cannot tell the task from its fields {sorted(keys)}; pass --task and the column names "
        "(--text-column/--label-column or --prompt-column/--response-column)."
    )


def _first_record_keys(path: Path) -> set[str]:
    with path.open(encoding="utf-8-sig", newline="") as handle:
        if path.suffix.lower() in (".jsonl", ".ndjson"):
            for line in handle:
                if line.strip():
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        return set()
                    return set(record) if isinstance(record, dict) else set()
            return set()
        delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
        header = next(csv.reader(handle, delimiter=delimiter), None) or []
        return {name.strip() for name in header}


def _builtin_rows(spec: DataSpec, kind: str, split: str) -> list[Row]:
    dataset = BUILTIN_DATASETS[spec.data]
    rows = load_builtin(spec.data, split, seed=spec.split_seed)
    if kind == ("classification" if dataset.task == "classification" else "pairs"):
        return rows
    if kind == "text":
        return [{"text": r["text"]} if "text" in r else {"text": f"{r['prompt']}\n{r['response']}"} for r in rows]
    raise DataError(
        f"Built-in data set {spec.data!r} holds {dataset.task} rows, which do not suit a task that needs {kind} "
        f"rows. Use a classification set (trec, rt, bbc, sms) for seq_cls and chatterbot for instruct/seq2seq."
    )


def _file(spec: DataSpec, path: str, kind: str, labels: list[str] | None) -> list[Row]:
    return load_file(
        path, kind,  # type: ignore[arg-type]
        text_column=spec.text_column, label_column=spec.label_column,
        prompt_column=spec.prompt_column, response_column=spec.response_column, label_set=labels,
    )


def load_splits(spec: DataSpec, task: str, labels: list[str] | None = None) -> Splits:
    """Read every split for ``task``. ``labels`` (e.g. from a trained run) fixes the label set and order."""
    kind = ROW_KIND[task]
    if spec.is_builtin:
        parts = {split: _builtin_rows(spec, kind, split) for split in ("train", "validation", "test")}
        if kind == "classification" and labels is None:
            labels = label_names(spec.data)
    else:
        train = _file(spec, spec.data, kind, labels)
        if kind == "classification" and labels is None:
            labels = infer_label_names(train)
        if spec.validation_data or spec.test_data:
            parts = {"train": train, "validation": [], "test": []}
            for split, path in (("validation", spec.validation_data), ("test", spec.test_data)):
                if path:
                    parts[split] = _file(spec, path, kind, labels)
        else:
            parts = split_rows(
                train, seed=spec.split_seed,
                stratify=(lambda r: r["label"]) if kind == "classification" else None,
                group=(lambda r: " ".join(r["prompt"].split()).casefold()) if kind == "pairs" else None,
            )
    if kind == "classification" and labels is not None:
        _check_labels(parts, labels, spec.data)
    return Splits(parts["train"], parts["validation"], parts["test"], labels)


def _check_labels(parts: dict[str, list[Row]], labels: list[str], source: str) -> None:
    known = set(labels)
    for split, rows in parts.items():
        bad = sorted({r["label"] for r in rows} - known)
        if bad:
            raise DataError(f"{source} ({split}): labels {bad} are not among the model's labels {labels}.")


def limit(rows: list[Row], n: int | None) -> list[Row]:
    """The first ``n`` rows (all when ``n`` is ``None``)."""
    return rows if n is None else rows[:n]
