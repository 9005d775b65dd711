"""A person's message in, the reply's events out: what the HTTP API and the console share."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import nats.errors

from libra.contracts import AnyEvent, Origin, TextReceived, conversation_id, make, user_id
from libra.runtime.eventlog import EventLog
from libra.runtime.follow import ReplyTimeout, TurnFollower

__all__ = ["NoDecision", "converse"]


class NoDecision(ReplyTimeout):
    """The message was not admitted or refused in time: the log or admission is not working."""


async def converse(
    log: EventLog,
    *,
    platform: str,
    user: str,
    text: str,
    conversation: str | None = None,
    idle_s: float = 60.0,
    decide_s: float | None = None,
) -> AsyncIterator[AnyEvent]:
    """Publishes ``text`` as a ``text.received`` and yields the turn's events to its end.

    The first event yielded is the ``text.received`` itself (its id is the turn's id); then
    ``turn.accepted`` or ``turn.rejected``, the deltas, and ``llm.completed`` or ``llm.failed``.
    ``user`` is the person's id on ``platform`` (``alice``); events carry ``<platform>:alice``.
    With ``decide_s``, publishing and the decision together take at most that long, or
    :class:`NoDecision` is raised before anything is yielded.
    """
    conversation = conversation or conversation_id(platform, user)
    said = make(
        TextReceived,
        conversation=conversation,
        user=user_id(platform, user),
        text=text,
        origin=Origin(platform=platform, channel=conversation),
    )
    async with TurnFollower(log, conversation, said.id) as follower:
        events = follower.events(idle_s=idle_s)
        if decide_s is None:  # as soon as it is in the log (the benchmark times each stage)
            await log.publish(said)
            yield said
        else:
            try:
                async with asyncio.timeout(decide_s):
                    await log.publish(said)
                    decision = await anext(events)
            except (TimeoutError, nats.errors.Error) as exc:
                await events.aclose()
                late = f"turn {said.id} was neither admitted nor refused in time"
                raise NoDecision(late) from exc
            yield said
            yield decision
        async for event in events:
            yield event
