"""A person's message in, the reply's events out: what the HTTP API and the console share."""

from __future__ import annotations

from collections.abc import AsyncIterator

from libra.contracts import AnyEvent, Origin, TextReceived, conversation_id, make
from libra.runtime.eventlog import EventLog
from libra.runtime.follow import TurnFollower

__all__ = ["converse"]


async def converse(
    log: EventLog,
    *,
    platform: str,
    user: str,
    text: str,
    conversation: str | None = None,
    idle_s: float = 60.0,
) -> AsyncIterator[AnyEvent]:
    """Publishes ``text`` as a ``text.received`` and yields the turn's events to its end.

    The first event yielded is the ``text.received`` itself (its id is the turn's id); then
    ``turn.accepted`` or ``turn.rejected``, the deltas, and ``llm.completed`` or ``llm.failed``.
    """
    conversation = conversation or conversation_id(platform, user)
    said = make(
        TextReceived,
        conversation=conversation,
        user=user,
        text=text,
        origin=Origin(platform=platform, channel=conversation),
    )
    async with TurnFollower(log, conversation, said.id) as follower:
        await log.publish(said)
        yield said
        async for event in follower.events(idle_s=idle_s):
            yield event
