"""How the end of a turn shows on Discord: the whole reply and its receipt, or a short notice.

A reply drawn from knowledge documents ends with a line of small text naming them by the
numbers the model cites (``-# Sources: [1] Server rules · [2, 4] FAQ``), and one that called
tools with a line naming those. The lines are Discord's only: the completed event, which history
keeps, holds the reply without them, and a reply chain read back leaves them out
(:func:`without_footer`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from libra.contracts import (
    LlmCompleted,
    LlmFailed,
    ReplyDelivered,
    RetrievedChunk,
    ToolUse,
    TurnRejected,
    derive,
)
from libra.runtime.eventlog import EventLog

from .live_reply import LiveReply
from .strings import say

__all__ = ["deliver", "footer", "notice", "without_footer"]

SUBTEXT = "-# "
_CITED = re.compile(r"\[(\d{1,3}(?:\s*,\s*\d{1,3})*)\]")
_TITLE_CHARS = 60
_MARKDOWN = re.compile(r"([\\*_~`|<>\[\]])")
_SPACES = re.compile(r"\s+")


async def deliver(log: EventLog, reply: LiveReply, done: LlmCompleted, locale: str) -> None:
    """Writes the completed reply, then publishes ``reply.delivered`` with its message ids.

    The receipt's id is derived from the completion, so a gateway that recovers the turn and the
    one that answered it first publish one receipt between them.
    """
    ids = await reply.finish(done.text, footer=footer(done, locale)) or [
        await reply.say(say("empty", locale))
    ]
    await log.publish(
        derive(
            done,
            ReplyDelivered,
            key="delivered",
            message_ids=tuple(str(i) for i in ids),
            origin=done.origin,
        )
    )


def notice(end: TurnRejected | LlmFailed | None, locale: str) -> str:
    """What a turn that ends without a reply says: refused, failed, or (``None``) timed out."""
    match end:
        case TurnRejected():
            return end.message or say("rejected", locale)
        case LlmFailed():
            return end.message or say("failed", locale)
    return say("timeout", locale)


def footer(done: LlmCompleted, locale: str) -> str:
    """The lines of small text under a reply: its sources and the tools it called; or ""."""
    lines = []
    if sources := _sources(done.text, done.knowledge):
        lines.append(SUBTEXT + say("footer.sources", locale, sources=sources))
    if tools := _tools(done.tools):
        lines.append(SUBTEXT + say("footer.tools", locale, tools=tools))
    return "\n".join(lines)


def without_footer(text: str) -> str:
    """A reply of Libra's as Discord shows it, without the small-text lines under it."""
    lines = text.rstrip().split("\n")
    while lines and lines[-1].startswith(SUBTEXT):
        lines.pop()
    return "\n".join(lines).rstrip()


def _sources(text: str, knowledge: Sequence[RetrievedChunk]) -> str:
    """``[1] Title · [2, 4] Other``: each document once, with the numbers of its chunks the
    reply cites (all of them when it cites none)."""
    if not knowledge:
        return ""
    cited = {
        int(n)
        for group in _CITED.findall(text)
        for n in group.split(",")
        if 1 <= int(n) <= len(knowledge)
    }
    numbers: dict[str, list[int]] = {}
    titles: dict[str, str] = {}
    for number, chunk in enumerate(knowledge, start=1):
        if cited and number not in cited:
            continue
        numbers.setdefault(chunk.document, []).append(number)
        titles.setdefault(chunk.document, chunk.title or chunk.document)
    return " · ".join(
        f"[{', '.join(map(str, found))}] {_shown(titles[document])}"
        for document, found in numbers.items()
    )


def _tools(uses: Sequence[ToolUse]) -> str:
    return ", ".join(dict.fromkeys(_shown(use.name) for use in uses))


def _shown(title: str) -> str:
    """A title on one line, shortened, with Discord's markdown escaped (a file name such as
    ``server_rules.md`` is not italics; ``<@1>`` is not a mention)."""
    title = _SPACES.sub(" ", title).strip()
    if len(title) > _TITLE_CHARS:
        title = title[: _TITLE_CHARS - 1].rstrip() + "…"
    return _MARKDOWN.sub(r"\\\1", title)
