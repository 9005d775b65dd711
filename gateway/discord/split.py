"""Splitting a reply into Discord messages of at most 2,000 characters.

A cut goes at the last paragraph break that fits, else a line break, else the end of a sentence,
else a space, else anywhere. Discord renders anything between a pair of triple backticks as a
code block, wherever they stand, so a cut inside a block closes it in that message and opens it
again, with its language, at the start of the next one. A footer (the reply's sources, say)
goes under the last message, which is cut shorter when it would not fit there.
"""

from __future__ import annotations

import re

__all__ = ["MESSAGE_LIMIT", "split_message", "with_footer"]

MESSAGE_LIMIT = 2000
FENCE = "```"
_LANGUAGE = re.compile(r"[A-Za-z0-9_+\-.#]+(?=\n)")
_SENTENCE_END = re.compile(r"[.!?。！？…](?=\s)")
_PREFERRED_FROM = 0.5  # a paragraph or line break in the first half would leave a short message


def split_message(text: str, limit: int = MESSAGE_LIMIT) -> list[str]:
    """Returns ``text`` as messages of at most ``limit`` characters, code blocks kept whole."""
    rest = text.strip()
    chunks: list[str] = []
    reopen = ""  # the opening fence (with language) that the next message starts with
    while rest:
        head = f"{reopen}\n" if reopen else ""
        if len(head) + len(rest) <= limit:
            chunks.append(head + rest)
            break
        chunk, reopen, rest = _next_chunk(head, rest, limit)
        chunks.append(chunk)
    return chunks


def with_footer(chunks: list[str], footer: str, limit: int = MESSAGE_LIMIT) -> list[str]:
    """``chunks`` (a split reply) with ``footer`` on a line of its own under the last one.

    A last message too long to take the footer is split again, shorter; a code block it leaves
    open is closed first, so that the footer is not shown as code. No chunks, no footer.
    """
    footer = footer.strip()[: limit // 2]
    if not chunks or not footer:
        return chunks
    room = limit - len(footer) - 1
    last = chunks[-1]
    if _open_fence(last):
        last += f"\n{FENCE}"
    tail = [last] if len(last) <= room else split_message(last, room)
    return [*chunks[:-1], *tail[:-1], f"{tail[-1]}\n{footer}"]


def _next_chunk(head: str, rest: str, limit: int) -> tuple[str, str, str]:
    """Cuts the next message off ``rest``: (message, fence to reopen, what is left)."""
    reserve = len(FENCE) + 1  # room to close a block: "\n```"
    while True:
        budget = max(1, limit - len(head) - reserve)
        cut, skip = _cut(rest, budget)
        piece = rest[:cut].rstrip()
        opening = _open_fence(head + piece)
        chunk = head + piece + (f"\n{FENCE}" if opening else "")
        if len(chunk) <= limit or budget == 1:
            return chunk, opening, rest[cut + skip :].lstrip("\n")
        reserve += len(chunk) - limit


def _cut(text: str, budget: int) -> tuple[int, int]:
    """Where to cut ``text``, keeping at most ``budget`` characters: (index, separator length)."""
    window = text[: budget + 1]
    floor = int(budget * _PREFERRED_FROM)
    for separator in ("\n\n", "\n"):
        at = window.rfind(separator, 0, budget)
        if at >= floor and at > 0:
            return at, len(separator)
    ends = [m.end() for m in _SENTENCE_END.finditer(window, 0, budget)]
    if ends and ends[-1] >= floor // 2:
        return ends[-1], 1
    space = max(window.rfind(" ", 0, budget), window.rfind("\n", 0, budget))
    if space > 0:
        return space, 1
    cut = budget
    while cut > 1 and text[cut - 1] == "`":  # never split a run of backticks
        cut -= 1
    return cut, 0


def _open_fence(text: str) -> str:
    """The fence (with its language) of a code block left open at the end of ``text``, or ""."""
    opening = ""
    at = text.find(FENCE)
    while at != -1:
        if opening:
            opening = ""
        else:
            language = _LANGUAGE.match(text, at + len(FENCE))
            opening = FENCE + (language.group(0) if language else "")
        at = text.find(FENCE, at + len(FENCE))
    return opening
