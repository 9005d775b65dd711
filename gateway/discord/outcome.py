"""How the end of a turn shows on Discord: the whole reply and its receipt, or a short notice."""

from __future__ import annotations

from libra.contracts import LlmCompleted, LlmFailed, ReplyDelivered, TurnRejected, derive
from libra.runtime.eventlog import EventLog

from .live_reply import LiveReply
from .strings import say

__all__ = ["deliver", "notice"]


async def deliver(log: EventLog, reply: LiveReply, done: LlmCompleted, locale: str) -> None:
    """Writes the completed reply, then publishes ``reply.delivered`` with its message ids.

    The receipt's id is derived from the completion, so a gateway that recovers the turn and the
    one that answered it first publish one receipt between them.
    """
    ids = await reply.finish(done.text) or [await reply.say(say("empty", locale))]
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
