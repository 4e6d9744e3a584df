"""Read training data from local files: JSONL, CSV/TSV, or plain text (one example per line).

Every bad row is collected and reported together, by file and line number, in one
:class:`~deltatune.train.data.builtin.DataError`; nothing is dropped silently and nothing fails half-way through
a training run. What counts as bad: a line that is not valid JSON (or not a JSON object), a CSV row with
the wrong number of fields, a missing or empty text/prompt/response, a missing label, or a label that
is not in the ``label_set`` you gave. Blank lines are ignored in every format.

Columns are configurable; values that are numbers or booleans are turned into strings (``1`` -> ``"1"``),
lists/objects/null are bad rows. Line numbers are 1-based lines of the file (for a CSV record that spans
several lines, the line where it starts).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

from .builtin import DataError

__all__ = ["Task", "infer_label_names", "load_file"]

Task = Literal["classification", "pairs", "text"]
Row = dict[str, str]
FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "tsv", ".txt": "text"}
MAX_SHOWN = 5
ROLES: dict[str, tuple[str, ...]] = {
    "classification": ("text", "label"),
    "pairs": ("prompt", "response"),
    "text": ("text",),
}


def _detect_format(path: Path, file_format: str | None) -> str:
    if file_format is not None:
        if file_format not in set(FORMATS.values()):
            raise DataError(
                f"file_format must be one of {sorted(set(FORMATS.values()))}, got {file_format!r}"
            )
        return file_format
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(
            f"{path}: cannot tell the format from the suffix {path.suffix!r}; use one of "
            f"{sorted(FORMATS)} or pass file_format=('jsonl' | 'csv' | 'tsv' | 'text')."
        )
    return fmt


def _records_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any] | str]]:
    """(line number, parsed object) per non-blank line, or (line, problem text) for a bad line."""
    with path.open(encoding="utf-8-sig") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                yield number, f"invalid JSON ({exc.msg} at column {exc.colno})"
                continue
            yield (
                number,
                record if isinstance(record, dict) else f"expected a JSON object, got {record!r:.40}",
            )


def _records_csv(
    path: Path, delimiter: str, needed: Sequence[str]
) -> Iterator[tuple[int, dict[str, Any] | str]]:
    """(line number, record) per CSV row; the header row names the columns."""
    with path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle, delimiter=delimiter)
        header = next(reader, None)
        if header is None:
            return
        header = [name.strip() for name in header]
        missing = [name for name in needed if name not in header]
        if missing:
            raise DataError(
                f"{path}: the header has no column {missing[0]!r} (columns: {header}). "
                "Name the right column with text_column / label_column / prompt_column / response_column."
            )
        while True:
            start = reader.line_num + 1
            try:
                fields = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                yield start, f"unreadable CSV ({exc})"
                continue
            if not fields or all(not f.strip() for f in fields):
                continue
            if len(fields) != len(header):
                yield start, f"expected {len(header)} fields, found {len(fields)}"
                continue
            yield start, dict(zip(header, fields))


def _records_text(path: Path) -> Iterator[tuple[int, dict[str, Any] | str]]:
    with path.open(encoding="utf-8-sig") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                yield number, {"text": line.rstrip("\r\n")}


def _field(record: dict[str, Any], column: str, role: str) -> tuple[str | None, str | None]:
    """(value, None) for a usable string field, else (None, problem)."""
    if column not in record:
        return None, f"no {role} field {column!r} (fields: {sorted(record)[:8]})"
    value = record[column]
    if isinstance(value, bool | int | float):
        value = str(value)
    if not isinstance(value, str):
        return None, f"{role} field {column!r} is {type(value).__name__}, not text"
    if not value.strip():
        return None, f"empty {role} field {column!r}"
    return value, None


def _convert(
    record: dict[str, Any], task: Task, columns: dict[str, str], label_set: frozenset[str] | None
) -> tuple[Row | None, str | None]:
    """Turn one parsed record into a row for ``task``, or return the problem with it."""
    row: Row = {}
    for role in ROLES[task]:
        value, problem = _field(record, columns[role], role)
        if problem:
            return None, problem
        row[role] = value.strip() if role == "label" else value  # type: ignore[union-attr]
    if label_set is not None and row["label"] not in label_set:
        return None, f"label {row['label']!r} is not one of {sorted(label_set)}"
    return row, None


def _raise_if_bad(path: Path, problems: list[tuple[int, str]], total: int) -> None:
    if not problems:
        return
    shown = "\n".join(f"  {path}:{line}: {text}" for line, text in problems[:MAX_SHOWN])
    more = f"\n  ... and {len(problems) - MAX_SHOWN} more" if len(problems) > MAX_SHOWN else ""
    raise DataError(
        f"{path}: {len(problems)} bad row(s) out of {total}:\n{shown}{more}\n"
        "Fix or remove these rows (deltatune does not drop rows silently), or adjust the column names."
    )


def load_file(
    path: str | os.PathLike[str],
    task: Task,
    *,
    text_column: str = "text",
    label_column: str = "label",
    prompt_column: str = "prompt",
    response_column: str = "response",
    label_set: Iterable[str] | None = None,
    file_format: str | None = None,
    max_examples: int | None = None,
) -> list[Row]:
    """Read and validate a local data file.

    Args:
        path: a ``.jsonl``/``.ndjson``, ``.csv``, ``.tsv`` or ``.txt`` file (or set ``file_format``).
        task: ``"classification"`` -> rows ``{"text", "label"}``; ``"pairs"`` (instruction tuning or
            seq2seq) -> ``{"prompt", "response"}``; ``"text"`` (causal LM) -> ``{"text"}``. A ``.txt`` file
            holds one example per line and suits only ``"text"``.
        text_column, label_column, prompt_column, response_column: names of the fields/columns to read.
        label_set: allowed labels; a row with any other label is a bad row. ``None`` accepts any label.
        file_format: ``"jsonl"``, ``"csv"``, ``"tsv"`` or ``"text"``; by default from the suffix.
        max_examples: keep the first ``max_examples`` rows (the whole file is still validated).

    Returns:
        The rows, in file order. Labels are stripped strings; texts are kept as written.

    Raises:
        DataError: unreadable file, unknown format, missing column, no rows, or bad rows (all of them
            counted, the first few shown with ``file:line``).
    """
    path = Path(path)
    if task not in ROLES:
        raise DataError(f"task must be 'classification', 'pairs' or 'text', got {task!r}")
    if not path.is_file():
        raise DataError(f"Data file {path} does not exist.")
    fmt = _detect_format(path, file_format)
    columns = {
        "text": text_column,
        "label": label_column,
        "prompt": prompt_column,
        "response": response_column,
    }
    if fmt == "text" and task != "text":
        raise DataError(
            f"{path}: a plain-text file holds one example per line, which only suits task='text'; "
            f"use JSONL or CSV for {task!r} data."
        )
    roles = ROLES[task]
    if fmt == "jsonl":
        records = _records_jsonl(path)
    elif fmt in ("csv", "tsv"):
        records = _records_csv(path, "," if fmt == "csv" else "\t", [columns[r] for r in roles])
    else:
        records = _records_text(path)
        columns = {**columns, "text": "text"}
    allowed = frozenset(label_set) if label_set is not None else None

    rows: list[Row] = []
    problems: list[tuple[int, str]] = []
    total = 0
    try:
        for line, record in records:
            total += 1
            if isinstance(record, str):
                problems.append((line, record))
                continue
            row, problem = _convert(record, task, columns, allowed)
            if problem:
                problems.append((line, problem))
            else:
                rows.append(row)  # type: ignore[arg-type]
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc}); re-save the file as UTF-8.") from exc
    _raise_if_bad(path, problems, total)
    if not rows:
        raise DataError(f"{path}: no examples found (the file is empty or has only a header/blank lines).")
    return rows[:max_examples] if max_examples is not None else rows


def infer_label_names(rows: Iterable[Row]) -> list[str]:
    """The sorted distinct labels of classification rows (label id = position in this list)."""
    return sorted({row["label"] for row in rows})
