"""The word list (``MODERATION_BLOCKLIST``) as a moderation engine: the offline last resort.

It needs no network, so it answers when every classifier is down; it knows one category,
``blocked_word``. Admission's input checks (``processors/turns/checks.py``) match words the same
way, through :func:`blocked_in`.
"""

from __future__ import annotations

from collections.abc import Iterable
from time import perf_counter

from .base import Verdict

__all__ = ["WordListEngine", "blocked_in", "parse_blocklist"]


def parse_blocklist(raw: str) -> frozenset[str]:
    """The words of a comma-separated list, lower case, blanks left out."""
    words = (w.strip().lower() for w in raw.split(","))
    return frozenset(w for w in words if w)


def blocked_in(words: frozenset[str], texts: Iterable[str]) -> frozenset[str]:
    """The blocked ``words`` that any of ``texts`` holds as a whole word, case-insensitively."""
    if not words:
        return frozenset()
    found: set[str] = set()
    for text in texts:
        found |= words & set(text.lower().split())
    return frozenset(found)


class WordListEngine:
    """Flags a text holding a blocked word (category ``blocked_word``)."""

    name = "words"
    covers = frozenset({"blocked_word"})  # what a clean answer from it vouches for

    def __init__(self, words: frozenset[str]) -> None:
        self.words = words

    async def check(self, text: str) -> Verdict:
        """The verdict on ``text``: flagged when it holds a blocked word."""
        began = perf_counter()
        flagged = bool(blocked_in(self.words, (text,)))
        return Verdict(
            flagged=flagged,
            categories=("blocked_word",) if flagged else (),
            scores={"blocked_word": 1.0} if flagged else {},
            engine=self.name,
            latency_ms=(perf_counter() - began) * 1000,
        )

    async def close(self) -> None:
        """Nothing to close; here so every engine closes the same way."""
