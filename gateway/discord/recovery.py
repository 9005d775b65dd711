"""Replies that a stopped gateway left undelivered: found in the log, delivered once.

A gateway answers a message in three steps: it publishes the ``text.received`` (the first
publisher of its id answers it), writes the reply to Discord, then publishes
``reply.delivered``. One that stops between the first step and the last leaves a turn no one
follows. A gateway that starts reads the Discord turns of the last ``DISCORD_RECOVER_SEC`` from
the log and takes those of its shards without a ``reply.delivered``: for each it publishes a
``reply.claimed`` whose id is derived from the turn, and only the gateway whose publish is not a
duplicate goes on (the duplicate window is the claim's lease). It follows the turn to its end,
waits ``grace_s`` in case a gateway still running delivers it after all, then looks in the
channel for what the stopped gateway posted in reply to the person's message: it edits that
message rather than post a second one, and a notice already there is not said again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import hikari

from libra.contracts import (
    LOG_STREAM,
    LlmCompleted,
    LlmFailed,
    ReplyClaimed,
    ReplyDelivered,
    TextReceived,
    TurnRejected,
    derive,
)
from libra.runtime.eventlog import EventLog
from libra.runtime.follow import ReplyTimeout, TurnFollower
from libra.runtime.logs import bind
from libra.runtime.projection import read_log

from .live_reply import LiveReply
from .outcome import deliver, notice

__all__ = ["Recovery", "undelivered"]

log = logging.getLogger("libra.discord.recovery")

_SCAN_MESSAGES = 200  # how far after the person's message the stopped gateway's reply is looked for


async def undelivered(
    log_: EventLog,
    *,
    since: datetime,
    before: datetime | None = None,
    mine: Callable[[TextReceived], bool],
) -> list[TextReceived]:
    """The Discord turns received since ``since`` (and, with it, before ``before``) of ``mine``
    that no gateway delivered."""
    received: dict[str, TextReceived] = {}
    delivered: set[str] = set()
    subjects = ["libra.text.received.>", "libra.reply.delivered.>"]
    async for _, event in read_log(log_, subjects, stream=LOG_STREAM, start_time=since):
        if isinstance(event, ReplyDelivered):
            delivered.add(event.turn)
        elif (
            isinstance(event, TextReceived)
            and event.origin.platform == "discord"
            and (before is None or event.at < before)
            and mine(event)
        ):
            received[event.turn] = event
    return [said for turn, said in received.items() if turn not in delivered]


class Recovery:
    """Delivers, once, the replies of the turns a stopped gateway left undelivered."""

    def __init__(
        self,
        bot: hikari.GatewayBot,
        log_: EventLog,
        *,
        window_s: float,
        grace_s: float,
        idle_s: float,
        edit_interval: float,
        mine: Callable[[TextReceived], bool],
    ) -> None:
        self.bot = bot
        self.log = log_
        self.window_s = window_s
        self.grace_s = grace_s
        self.idle_s = idle_s
        self.edit_interval = edit_interval
        self.mine = mine

    async def run(self, *, connected_at: datetime) -> None:
        """Finds the undelivered turns and recovers each (at the same time).

        A message written since ``connected_at`` (when this gateway began connecting) came to
        it, or to a gateway still running, live: recovering it too would claim a turn that is
        being answered, and a crash would then leave it claimed by no one who answers it.
        """
        if self.window_s <= 0:
            return
        since = datetime.now(UTC) - timedelta(seconds=self.window_s)
        try:
            found = await undelivered(self.log, since=since, before=connected_at, mine=self.mine)
        except Exception:
            log.exception("could not read the log for undelivered replies")
            return
        await asyncio.gather(*(self._guarded(said) for said in found))

    async def _guarded(self, said: TextReceived) -> None:
        try:
            await self.recover(said)
        except Exception:
            log.exception("could not recover the reply to message %s", said.origin.message)

    async def recover(self, said: TextReceived) -> None:
        """Delivers the reply to ``said`` unless another gateway claimed it or delivered it."""
        bind(conversation=said.conversation, turn=said.turn)
        claim = derive(said, ReplyClaimed, key="reply-claim", origin=said.origin)
        if not await self.log.publish_first(claim):
            log.info("another gateway recovers the reply to message %s", said.origin.message)
            return
        log.info("recovering the reply to message %s", said.origin.message)
        end = await self._end(said)
        if await self._delivered(said):
            log.info("the reply to message %s was delivered meanwhile", said.origin.message)
            return
        channel = int(said.origin.thread or said.origin.channel)
        reply = LiveReply(
            self.bot.rest,
            channel,
            reply_to=int(said.origin.message),
            interval=self.edit_interval,
        )
        earlier = await self._posted(channel, int(said.origin.message))
        try:
            if isinstance(end, LlmCompleted):
                if earlier is not None:
                    reply.adopt(earlier.id, earlier.content or "")
                await deliver(self.log, reply, end, said.origin.locale)
            elif earlier is None:
                await reply.say(notice(end, said.origin.locale))
        finally:
            await reply.close()

    async def _end(self, said: TextReceived) -> TurnRejected | LlmFailed | LlmCompleted | None:
        """The turn's terminal event, from the log or as it comes; None if none comes in time."""
        async with TurnFollower(self.log, said.conversation, said.turn) as follower:
            await follower.catch_up()
            try:
                async for event in follower.events(idle_s=self.idle_s):
                    if isinstance(event, TurnRejected | LlmFailed | LlmCompleted):
                        return event
            except ReplyTimeout:
                pass
        return None

    async def _delivered(self, said: TextReceived) -> bool:
        """Whether a gateway (one still running) delivers the reply within the grace period."""
        async with TurnFollower(
            self.log, said.conversation, said.turn, domains=("reply",), until=(ReplyDelivered,)
        ) as follower:
            await follower.catch_up()
            try:
                async for event in follower.events(idle_s=self.grace_s, total_s=self.grace_s):
                    if isinstance(event, ReplyDelivered):
                        return True
            except ReplyTimeout:
                pass
        return False

    async def _posted(self, channel: int, message: int) -> hikari.Message | None:
        """The bot's message in reply to ``message``, if a gateway posted one."""
        me = self.bot.get_me() or await self.bot.rest.fetch_my_user()
        after = self.bot.rest.fetch_messages(channel, after=message).limit(_SCAN_MESSAGES)
        async for found in after:
            reference = found.message_reference
            if found.author.id == me.id and reference and reference.id == message:
                return found
        return None
