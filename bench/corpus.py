"""Held-out general English text for the forgetting benchmark, from Debian packages when installed.

* ``fortunes``: the classic ``fortune`` collections (Debian package ``fortunes``): quotations, jokes,
  aphorisms, modern English on every topic.
* ``kjv``: King James Bible verses (Debian package ``bible-kjv``, read through its ``bible`` command),
  three consecutive verses per passage.
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


def kjv(n: int) -> list[str] | None:
    """``n`` passages of three consecutive KJV verses, or ``None`` without the ``bible`` command."""
    if shutil.which("bible") is None:
        return None
    out = subprocess.run(["bible", "-f", *KJV_CHAPTERS], capture_output=True, text=True, timeout=60, check=False).stdout
    verses = [line.split(" ", 1)[1].strip() for line in out.splitlines() if " " in line and ":" in line.split(" ", 1)[0]]
    passages = [" ".join(verses[i : i + 3]) for i in range(0, len(verses) - 2, 3)]
    if not passages:
        return None
    random.Random(0).shuffle(passages)
    return passages[:n]


def bbc(n: int) -> list[str]:
    from deltatune.train.data.builtin import load_builtin

    return [_clean(r["text"])[:400] for r in load_builtin("bbc", "test")[:n]]


def general_corpora(n: int) -> dict[str, list[str]]:
    """The corpora available here, ``{"fortunes": [...], "kjv": [...]}``, else ``{"bbc": [...]}``."""
    found = {name: texts for name, texts in (("fortunes", fortunes(n)), ("kjv", kjv(n))) if texts}
    return found or {"bbc": bbc(n)}
