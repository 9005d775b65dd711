"""Cutting a streamed reply into sentences, each as soon as it is complete.

Speech starts on the first sentence, so a sentence is handed out the moment its end is known:
a terminator (``. ! ? …``) followed by a space, a full-width terminator (``。！？``), or a line
break. The cut depends on the text alone, never on timing, so a redelivered turn is cut the same
way and its clips get the same ids. A run-on sentence is cut at a comma or space once it grows
past ``max_chars``. Markdown that would be read out (``**``, backticks, ``#`` headings, list
bullets) is dropped from what is spoken; with ``as_written`` (the llm's output moderation, which
releases the reply a sentence at a time) every character is kept, so the sentences joined are the
reply.
"""

from __future__ import annotations

import re

__all__ = ["SentenceSplitter", "speakable"]

_END = re.compile(r"[.!?…]+[\"'”’)\]]*(?=\s)|[。！？]+[」』）]*|\n+")
_ABBREVIATIONS = frozenset({"mr", "mrs", "ms", "dr", "st", "vs", "etc", "e.g", "i.e", "no"})
_MARKUP = re.compile(r"(\*\*|__|`+|^\s*#{1,6}\s+|^\s*[-*+]\s+)", re.M)
_WORD = re.compile(r"\w")
_MIN_WORD_CHARS = 2


def speakable(text: str) -> str:
    """Returns ``text`` without the Markdown a voice would read out, spaces tidied."""
    return " ".join(_MARKUP.sub("", text).split())


class SentenceSplitter:
    """Takes a reply piece by piece and hands out each sentence once it is complete."""

    def __init__(self, *, max_chars: int = 300, as_written: bool = False) -> None:
        self.max_chars = max_chars
        self.as_written = as_written
        self._buffer = ""
        self._scanned = 0

    def push(self, text: str) -> list[str]:
        """Adds a piece of the reply; returns the sentences it completed."""
        self._buffer += text
        out: list[str] = []
        while (sentence := self._next()) is not None:
            if sentence:
                out.append(sentence)
        return out

    def flush(self) -> list[str]:
        """Returns what is left, at the end of the reply."""
        if self.as_written:
            rest, self._buffer, self._scanned = self._buffer, "", 0
            return [rest] if rest else []
        rest, self._buffer, self._scanned = speakable(self._buffer), "", 0
        return [rest] if _WORD.search(rest) else []

    def _next(self) -> str | None:
        """Cuts one sentence off the buffer ("" for one too short to speak alone), or None."""
        for match in _END.finditer(self._buffer, max(self._scanned - 2, 0)):
            head = self._buffer[: match.end()]
            if _abbreviation(head) or len(_WORD.findall(head)) < _MIN_WORD_CHARS:
                continue  # "Dr." or "1." alone is not a sentence: read on
            return self._cut(match.end())
        self._scanned = len(self._buffer)
        if len(self._buffer) > self.max_chars:
            at = self._buffer.rfind(", ", 0, self.max_chars)
            if at < self.max_chars // 3:  # no comma, or so early that the piece would be a word
                at = self._buffer.rfind(" ", 0, self.max_chars)
            return self._cut(at + 1 if at > 0 else self.max_chars)
        return None

    def _cut(self, end: int) -> str:
        head, self._buffer, self._scanned = self._buffer[:end], self._buffer[end:], 0
        return head if self.as_written else speakable(head)


def _abbreviation(head: str) -> bool:
    words = head.rstrip(".").rsplit(None, 1)
    return bool(words) and head.endswith(".") and words[-1].lower() in _ABBREVIATIONS
