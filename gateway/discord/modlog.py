"""A server's moderation log: flagged messages and stopped replies, reported to its admins.

Where a server's admins chose a log channel (``/moderation log``), each Discord turn that
moderation refused (``turn.rejected``, ``moderated``) and each reply it stopped (``llm.completed``
with a flagged ``moderation``) is reported there: who, where, the categories and scores, the
engine, and a link to the message. Never the text: the channel may be read by more people than
the message's own, and the link shows it to those who may see it.

It runs on the gateway's durable consumer (``discord``), so across gateway processes each report
is made once; a Redis claim per report keeps a redelivery (after a crash between posting and
the ack) from posting it again. A channel Libra cannot post in is logged and skipped.
"""

from __future__ import annotations

import logging

import hikari
from redis.exceptions import RedisError

from libra.contracts import CONSUMERS, AnyEvent, Event, LlmCompleted, Moderation, TurnRejected
from libra.processors.moderation.policy import LOG_KEY
from libra.runtime.sessions import SessionView

from .claims import TurnClaims
from .strings import say

__all__ = ["ModerationLog", "report_text"]

log = logging.getLogger("libra.discord.modlog")

_NO_PINGS = {"mentions_everyone": False, "user_mentions": False, "role_mentions": False}


def report_text(event: TurnRejected | LlmCompleted, moderation: Moderation, locale: str) -> str:
    """The report of one flagged turn, without its text."""
    origin = event.origin
    person = event.user.removeprefix("discord:")
    where = origin.thread or origin.channel
    scores = ", ".join(
        f"{c} {moderation.scores[c]:.2f}" if c in moderation.scores else c
        for c in moderation.categories
    )
    key = "modlog.reply" if isinstance(event, LlmCompleted) else f"modlog.{event.modality}"
    text = say(key, locale, person=person, channel=where, categories=scores or "?")
    text += " " + say("modlog.engine", locale, engine=moderation.engine)
    if moderation.policy:
        text += " " + say("modlog.policy", locale, policy=moderation.policy)
    if origin.message and origin.guild:
        text += f"\nhttps://discord.com/channels/{origin.guild}/{where}/{origin.message}"
    return text


class ModerationLog:
    """Posts the reports of flagged Discord turns to their servers' log channels."""

    spec = CONSUMERS["discord"]

    def __init__(self, rest: hikari.api.RESTClient, view: SessionView, claims: TurnClaims):
        self.rest = rest
        self.view = view
        self.claims = claims

    async def handle(self, event: AnyEvent) -> list[Event]:
        match event:
            case TurnRejected(reason="moderated", moderation=Moderation() as m):
                await self._report(event, m)
            case LlmCompleted(moderation=Moderation(flagged=True) as m):
                await self._report(event, m)
        return []

    async def _report(self, event: TurnRejected | LlmCompleted, moderation: Moderation) -> None:
        origin = event.origin
        if origin.platform != "discord" or not origin.guild:
            return
        channel = self.view.setting(f"guild:{origin.guild}", LOG_KEY)
        if not channel.isdigit():
            return
        key = f"modlog:{event.id}"
        try:
            if not await self.claims.claim(key):
                return  # reported already, by this gateway or another, before a redelivery
        except (RedisError, OSError) as exc:
            log.warning("no claim on the report of %s (%r); reporting it anyway", event.id, exc)
        text = report_text(event, moderation, origin.locale)
        try:
            await self.rest.create_message(int(channel), text, **_NO_PINGS)
        except (hikari.ForbiddenError, hikari.NotFoundError) as exc:
            log.warning("cannot post to the moderation log channel %s: %s", channel, exc)
        except BaseException:
            await self.claims.release(key)  # not posted: the redelivery must be free to
            raise
