"""Admission's input checks: what refuses a person's input before the rate limit is asked.

They are pure (no Redis, no database), so the llm's prefetch (``processors/llm/prefetch.py``)
runs the same ones to read a prompt's context only for input that admission will not refuse.
A text file attached to a message is input too: its text counts toward ``max_chars`` and is
read for blocked words, since the model reads it with the message.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from libra.contracts import Attachment
from libra.processors.moderation.words import blocked_in, parse_blocklist
from libra.runtime.config import Settings

__all__ = ["InputChecks", "Refusal"]


class Refusal(NamedTuple):
    """Why an input is refused (a ``turn.rejected`` reason) and the details its message shows."""

    reason: str
    detail: dict[str, int]


@dataclass(frozen=True)
class InputChecks:
    """Empty, not valid UTF-8, too long (with its files) or holding a blocked word."""

    max_chars: int = 4000
    blocked_words: frozenset[str] = frozenset()

    @classmethod
    def from_settings(cls, settings: Settings) -> InputChecks:
        """The checks as ``MAX_INPUT_CHARS`` and ``MODERATION_BLOCKLIST`` set them."""
        return cls(
            max_chars=settings.max_input_chars,
            blocked_words=parse_blocklist(settings.moderation_blocklist),
        )

    def refusal(self, text: str, attachments: Sequence[Attachment] = ()) -> Refusal | None:
        """The reason to refuse ``text`` sent with ``attachments``, or None to let it through."""
        parts = [text, *(a.text for a in attachments if a.text)]
        try:
            for part in parts:
                part.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates: what is left of bytes that were not UTF-8
            return Refusal("invalid", {})
        if not text.strip() and not attachments:
            return Refusal("empty", {})
        length = sum(map(len, parts))
        if length > self.max_chars:
            return Refusal("too_long", {"length": length, "limit": self.max_chars})
        if blocked_in(self.blocked_words, parts):
            return Refusal("moderated", {})
        return None
