"""Data sets for training and evaluation: the built-in real data sets, local files, and fixed splits.

Rows are plain dicts of strings:

* classification: ``{"text": str, "label": str}``
* question/answer pairs (instruction tuning, seq2seq): ``{"prompt": str, "response": str}``
* causal-LM text: ``{"text": str}``

Built-in data sets (read from installed packages by :mod:`deltatune.train.data.readers`):

==============  =======================================  =====================================
name            content                                  labels
==============  =======================================  =====================================
``trec``        TREC questions (5,381 distinct)          ABBR DESC ENTY HUM LOC NUM
``rt``          Rotten Tomatoes snippets, rating != 0    negative positive
``bbc``         BBC News articles (2,225 files)          business entertainment politics sports tech
``sms``         SMS messages (4,837)                     ham spam
``chatterbot``  ChatterBot English Q/A turn pairs        (pairs, no labels)
==============  =======================================  =====================================

How the splits are made (the same for every built-in data set, see :func:`split_rows`):

1. Deduplicate: rows whose text (whitespace collapsed) repeats an earlier row are dropped, keeping the
   first. For pairs the key is (prompt, response). None of the packaged sets has one text under two
   labels, so this drops only true repeats.
2. Seeded 80/10/10 split into ``train`` / ``validation`` / ``test``. Classification sets are
   stratified by label (each class split 80/10/10 on its own), so rare classes (TREC's ABBR) reach every
   split. Pairs are grouped by prompt (case-insensitive), so one question never sits in two splits.
3. Each split is shuffled with the same seed. ``max_examples`` takes a prefix of that split, so a small
   run uses a subset of exactly the rows a full run would use.

None of these sets ships an official test split (the TREC file is its training part only), hence the
seeded split. Splits are the same on every machine for a given seed (Python's ``random.Random``).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal, TypeVar

from ...errors import DeltaError
from . import readers

__all__ = [
    "BUILTIN_DATASETS",
    "SPLITS",
    "BuiltinDataset",
    "DataError",
    "dedupe_rows",
    "label_names",
    "load_builtin",
    "split_rows",
]

T = TypeVar("T")
Row = dict[str, str]
Split = Literal["train", "validation", "test"]
SPLITS: tuple[str, ...] = ("train", "validation", "test")


class DataError(DeltaError, ValueError):
    """A data set name, split or file is invalid; the message says which rows and what to fix."""


@dataclass(frozen=True)
class BuiltinDataset:
    """One built-in data set.

    Attributes:
        name: key for :func:`load_builtin` and the CLI.
        task: ``"classification"`` (rows ``{"text", "label"}``) or ``"pairs"`` (``{"prompt", "response"}``).
        read: returns every raw row in file order (see :mod:`deltatune.train.data.readers`).
        labels: the class names in a fixed order (label id = position), or ``None`` for pairs.
        description: one line for help texts.
    """

    name: str
    task: Literal["classification", "pairs"]
    read: Callable[[], list[Row]]
    labels: tuple[str, ...] | None
    description: str


BUILTIN_DATASETS: dict[str, BuiltinDataset] = {
    d.name: d
    for d in (
        BuiltinDataset(
            "trec",
            "classification",
            readers.read_trec,
            ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"),
            "TREC question classification, 6 coarse classes",
        ),
        BuiltinDataset(
            "rt",
            "classification",
            readers.read_rt,
            ("negative", "positive"),
            "Rotten Tomatoes review snippets, sentiment from human ratings",
        ),
        BuiltinDataset(
            "bbc",
            "classification",
            readers.read_bbc,
            ("business", "entertainment", "politics", "sports", "tech"),
            "BBC News articles, 5 topics",
        ),
        BuiltinDataset("sms", "classification", readers.read_sms, ("ham", "spam"), "SMS spam detection"),
        BuiltinDataset(
            "chatterbot",
            "pairs",
            readers.read_chatterbot,
            None,
            "ChatterBot English conversations as prompt/response pairs",
        ),
    )
}


def _builtin(name: str) -> BuiltinDataset:
    if name not in BUILTIN_DATASETS:
        raise DataError(
            f"Unknown built-in data set {name!r}; known: {sorted(BUILTIN_DATASETS)}. "
            "For your own data, pass a .jsonl, .csv, .tsv or .txt file."
        )
    return BUILTIN_DATASETS[name]


def _norm(text: str) -> str:
    return " ".join(text.split())


def _row_key(row: Row) -> tuple[str, ...]:
    """Identity of a row for deduplication: its whitespace-normalised text, or (prompt, response)."""
    if "prompt" in row:
        return (_norm(row["prompt"]), _norm(row["response"]))
    return (_norm(row["text"]),)


def dedupe_rows(rows: Sequence[Row]) -> list[Row]:
    """Drop rows whose text (or prompt/response pair) repeats an earlier row; keep first occurrences.

    Raises:
        DataError: the same text appears with two different labels (there is no right one to keep).
    """
    seen: dict[tuple[str, ...], Row] = {}
    for row in rows:
        key = _row_key(row)
        first = seen.setdefault(key, row)
        if first.get("label") != row.get("label"):
            raise DataError(
                f"The same text has two labels ({first['label']!r} and {row['label']!r}): {key[0][:80]!r}"
            )
    return list(seen.values())


def split_rows(
    rows: Sequence[T],
    *,
    seed: int = 0,
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    stratify: Callable[[T], Hashable] | None = None,
    group: Callable[[T], Hashable] | None = None,
) -> dict[str, list[T]]:
    """Split ``rows`` into ``train`` / ``validation`` / ``test`` reproducibly.

    Args:
        rows: the items, in a fixed order (the result depends on it).
        seed: seed of the ``random.Random`` that shuffles.
        fractions: train, validation, test shares; they must sum to 1. Sizes are rounded per stratum:
            validation = round(n * f_val), test = round(n * f_test), train = the rest.
        stratify: maps a row to its stratum (e.g. its label); each stratum is split on its own.
        group: maps a row to its group; all rows of a group land in the same split (counted as one unit).

    Returns:
        ``{"train": [...], "validation": [...], "test": [...]}``, each shuffled with the same seed.
    """
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-9:
        raise DataError(f"fractions must be three non-negative numbers summing to 1, got {fractions}")
    units: dict[Hashable, list[T]] = {}
    for index, row in enumerate(rows):
        units.setdefault(group(row) if group else index, []).append(row)
    strata: dict[Hashable, list[list[T]]] = {}
    for members in units.values():
        strata.setdefault(stratify(members[0]) if stratify else None, []).append(members)

    rng = random.Random(seed)
    out: dict[str, list[T]] = {split: [] for split in SPLITS}
    for key in sorted(strata, key=repr):  # a fixed stratum order keeps the rng stream reproducible
        members_list = strata[key]
        rng.shuffle(members_list)
        n = len(members_list)
        n_val, n_test = round(n * fractions[1]), round(n * fractions[2])
        bounds = {"train": (0, n - n_val - n_test), "validation": (n - n_val - n_test, n - n_test)}
        bounds["test"] = (n - n_test, n)
        for split, (lo, hi) in bounds.items():
            out[split].extend(row for members in members_list[lo:hi] for row in members)
    for split in SPLITS:
        rng.shuffle(out[split])
    return out


@lru_cache(maxsize=16)
def _cached_splits(name: str, seed: int) -> dict[str, tuple[Row, ...]]:
    dataset = _builtin(name)
    rows = dedupe_rows(dataset.read())
    if dataset.task == "classification":
        splits = split_rows(rows, seed=seed, stratify=lambda r: r["label"])
    else:
        splits = split_rows(rows, seed=seed, group=lambda r: _norm(r["prompt"]).casefold())
    return {split: tuple(part) for split, part in splits.items()}


def load_builtin(name: str, split: str, seed: int = 0, max_examples: int | None = None) -> list[Row]:
    """Rows of one split of a built-in data set (see the module docstring for how splits are made).

    Args:
        name: one of :data:`BUILTIN_DATASETS` (``trec``, ``rt``, ``bbc``, ``sms``, ``chatterbot``).
        split: ``"train"``, ``"validation"`` or ``"test"``.
        seed: split seed; the same seed gives the same splits everywhere.
        max_examples: keep only the first ``max_examples`` rows of the (shuffled) split.

    Returns:
        Fresh dicts (safe to modify): ``{"text", "label"}`` or ``{"prompt", "response"}``.
    """
    if split not in SPLITS:
        raise DataError(f"Unknown split {split!r}; use one of {list(SPLITS)}.")
    if max_examples is not None and max_examples < 0:
        raise DataError(f"max_examples must be >= 0, got {max_examples}")
    rows = _cached_splits(name, int(seed))[split]
    if max_examples is not None:
        rows = rows[:max_examples]
    return [dict(row) for row in rows]


def label_names(name: str) -> list[str]:
    """Class names of a built-in classification data set; label id ``i`` is ``label_names(name)[i]``."""
    dataset = _builtin(name)
    if dataset.labels is None:
        raise DataError(f"Built-in data set {name!r} is {dataset.task!r}, it has no labels.")
    return list(dataset.labels)
