"""From generated token ids to the text a client sees, piece by piece, with stop strings.

The text of a choice is ``decode(generated ids, skip_special_tokens=True)`` cut before the first stop
string. While streaming, a piece is only sent once it is final: not while the text ends in an
incomplete UTF-8 character (``\\ufffd``) and not while its end could still grow into a stop string.
"""

from __future__ import annotations

from typing import Any


class TextTracker:
    """Follows one choice's generated tokens; ``push`` returns the newly final text."""

    def __init__(self, tokenizer: Any, stop: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids: list[int] = []
        self.sent = 0  # characters of the text already handed out
        self.text = ""
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add a token; returns the text that became final. Sets ``stopped`` when a stop string appeared."""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.stopped = text[:cut], True
            return self._take(len(self.text))
        self.text = text
        return self._take(len(text) - self._held_back(text))

    def finish(self) -> str:
        """The rest of the text, once the choice is over."""
        return self._take(len(self.text))

    def _held_back(self, text: str) -> int:
        """Trailing characters not yet final: a partial UTF-8 character or a possible stop-string start."""
        if text.endswith("\ufffd"):
            return len(text) - len(text.rstrip("\ufffd"))
        longest = 0
        for stop in self.stop:
            for k in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:k]):
                    longest = k
                    break
        return longest

    def _take(self, end: int) -> str:
        end = max(end, self.sent)
        piece = self.text[self.sent:end]
        self.sent = end
        return piece
