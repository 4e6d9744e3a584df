"""Held-out general English text for the forgetting benchmark, from Debian packages when installed.

* ``fortunes``: the classic ``fortune`` collections (Debian package ``fortunes``): quotations, jokes,
  aphorisms, modern English on every topic.
* ``kjv``: King James Bible verses (Debian package ``bible-kjv``, read through its ``bible`` command),
  three consecutive verses per passage.
* ``kjv_train``: training text for the forgetting frontier (:mod:`bench.forgetting_frontier`): KJV
  verses from the historical books (Genesis to 2 Kings), two consecutive verses per passage; no book
  of ``kjv`` (Proverbs, Matthew, Ecclesiastes, Psalms) is among them, so ``kjv`` stays held out.
* ``bbc``: fallback when neither package is installed: the first 400 characters of BBC News articles
  from the *test* split of deltatune's built-in ``bbc`` data set.

Passages are picked reproducibly (``random.Random(0)``) and never used for training.
"""

from __future__ import annotations

import random
import shutil
import subprocess
from pathlib import Path

FORTUNE_DIR = Path("/usr/share/games/fortunes")
FORTUNE_FILES = ("fortunes", "wisdom", "literature", "people", "science", "education")
KJV_CHAPTERS = [f"Prov{c}:1-40" for c in range(1, 16)] + [f"Matt{c}:1-50" for c in (5, 6, 7)] + [
    f"Eccl{c}:1-30" for c in range(1, 6)
] + [f"Ps{c}:1-30" for c in range(1, 21)]
#: (book, chapters) of the training text; disjoint from the books in ``KJV_CHAPTERS``.
KJV_TRAIN_BOOKS = (("Gen", 50), ("Exod", 40), ("Josh", 24), ("Judg", 21), ("1Sam", 31), ("2Sam", 24),
                   ("1Kings", 22), ("2Kings", 25))


def _clean(text: str) -> str:
    return " ".join(text.split())


def fortunes(n: int) -> list[str] | None:
    """``n`` fortunes of 80-500 characters, or ``None`` when the package is not installed."""
    texts: list[str] = []
    for name in FORTUNE_FILES:
        path = FORTUNE_DIR / name
        if path.is_file():
            raw = path.read_text(encoding="utf-8", errors="replace")
            texts.extend(_clean(t) for t in raw.split("\n%\n"))
    texts = [t for t in texts if 80 <= len(t) <= 500]
    if not texts:
        return None
    random.Random(0).shuffle(texts)
    return texts[:n]


def _verses(refs: list[str]) -> list[str] | None:
    """The text of the KJV verses ``refs`` (``bible`` references), or ``None`` without the command."""
    if shutil.which("bible") is None:
        return None
    out = subprocess.run(["bible", "-f", *refs], capture_output=True, text=True, timeout=120, check=False).stdout
    return [line.split(" ", 1)[1].strip() for line in out.splitlines() if " " in line and ":" in line.split(" ", 1)[0]]


def kjv(n: int) -> list[str] | None:
    """``n`` passages of three consecutive KJV verses, or ``None`` without the ``bible`` command."""
    verses = _verses(KJV_CHAPTERS)
    if verses is None:
        return None
    passages = [" ".join(verses[i : i + 3]) for i in range(0, len(verses) - 2, 3)]
    if not passages:
        return None
    random.Random(0).shuffle(passages)
    return passages[:n]


def kjv_train(n: int) -> list[str] | None:
    """Up to ``n`` passages of two consecutive verses from ``KJV_TRAIN_BOOKS`` (seeded order), or ``None``."""
    verses = _verses([f"{book}{c}:1-99" for book, chapters in KJV_TRAIN_BOOKS for c in range(1, chapters + 1)])
    if not verses:
        return None
    passages = [" ".join(verses[i : i + 2]) for i in range(0, len(verses) - 1, 2)]
    random.Random(1).shuffle(passages)
    return passages[:n]


def bbc(n: int) -> list[str]:
    from deltatune.train.data.builtin import load_builtin

    return [_clean(r["text"])[:400] for r in load_builtin("bbc", "test")[:n]]


def general_corpora(n: int) -> dict[str, list[str]]:
    """The corpora available here, ``{"fortunes": [...], "kjv": [...]}``, else ``{"bbc": [...]}``."""
    found = {name: texts for name, texts in (("fortunes", fortunes(n)), ("kjv", kjv(n))) if texts}
    return found or {"bbc": bbc(n)}
