"""Discord messages addressed to Libra, read as ``text.received`` events.

A message is addressed to Libra in a channel (or thread) with chat mode on, when it mentions or
replies to Libra anywhere, and always in a DM; never when a bot (Libra included) wrote it. A
thread is a conversation of its own; it follows its channel's chat mode until it has its own.
The event's id comes from the Discord message (:func:`stable_id`), so two gateways receiving the
same message make the same event and the log keeps one.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass

import hikari

from libra.contracts import (
    ContextMessage,
    Origin,
    TextReceived,
    conversation_id,
    stable_id,
    user_id,
    well_formed,
)
from libra.runtime.sessions import SessionView

from .access import AccessPolicy, Speaker
from .attachments import can_see, read_attachments
from .outcome import without_footer

__all__ = ["MessageReader", "Place", "event_id_of", "snowflake_ms"]

log = logging.getLogger("libra.discord.messages")

_DISCORD_EPOCH_MS = 1_420_070_400_000
_CHAT_TYPES = (hikari.MessageType.DEFAULT, hikari.MessageType.REPLY)


def snowflake_ms(snowflake: int) -> int:
    """The Unix time in milliseconds at which Discord made an id."""
    return (int(snowflake) >> 22) + _DISCORD_EPOCH_MS


def event_id_of(message: hikari.PartialMessage) -> str:
    """The id of the ``text.received`` a Discord message becomes: the same in every gateway."""
    return stable_id(f"discord-message:{message.id}", snowflake_ms(message.id))


@dataclass(frozen=True)
class Place:
    """Where a message was written: the ids Libra keeps, and the conversation they make."""

    guild: str
    channel: str  # for a thread, the channel it belongs to
    thread: str
    conversation: str
    parent_conversation: str = ""  # a thread's channel, whose chat mode it inherits


class MessageReader:
    """Turns the Discord messages addressed to Libra into events; ignores the rest."""

    def __init__(
        self,
        bot: hikari.GatewayBot,
        view: SessionView,
        access: AccessPolicy,
        *,
        vision_models: Sequence[str],
        default_model: str,
        text_chars: int,
        chain_depth: int,
    ) -> None:
        self.bot = bot
        self.view = view
        self.access = access
        self.vision_models = tuple(vision_models)
        self.default_model = default_model
        self.text_chars = text_chars
        self.chain_depth = chain_depth

    def place(self, guild_id: int | None, channel_id: int) -> Place:
        """The conversation of a channel, thread or DM."""
        if guild_id is None:
            return Place("", str(channel_id), "", conversation_id("discord", "dm", channel_id))
        conversation = conversation_id("discord", guild_id, channel_id)
        thread = self.bot.cache.get_thread(channel_id)
        if thread is None:
            return Place(str(guild_id), str(channel_id), "", conversation)
        return Place(
            str(guild_id),
            str(thread.parent_id),
            str(channel_id),
            conversation,
            conversation_id("discord", guild_id, thread.parent_id),
        )

    def addressed(self, message: hikari.Message) -> Place | None:
        """Where ``message`` was written, if it is for Libra and its author may talk to Libra."""
        me = self.bot.get_me()
        if me is None or message.author.is_bot or message.webhook_id is not None:
            return None
        if message.type not in _CHAT_TYPES:
            return None
        place = self.place(message.guild_id, message.channel_id)
        if not self._addressed(message, place, me.id):
            return None
        member = message.member
        speaker = Speaker(
            user=str(message.author.id),
            guild=place.guild,
            channel=place.thread or place.channel,
            parent=place.channel if place.thread else "",
            roles=frozenset(str(r) for r in member.role_ids) if member else frozenset(),
        )
        return place if self.access.may_talk(speaker) else None

    async def read(self, message: hikari.Message, place: Place) -> TextReceived:
        """The ``text.received`` for a message addressed to Libra: files, reply chain and all."""
        me = self.bot.get_me()
        assert me is not None  # addressed() said so
        model = self.view.setting(f"guild:{place.guild}", "model") if place.guild else ""
        attachments = await read_attachments(
            message.attachments,
            vision=can_see(model or self.default_model, self.vision_models),
            text_chars=self.text_chars,
        )
        event_id = event_id_of(message)
        return TextReceived(
            id=event_id,
            turn=event_id,
            at=message.created_at,
            conversation=place.conversation,
            user=user_id("discord", str(message.author.id)),
            text=_without_mention(message.content or "", me.id),
            origin=Origin(
                platform="discord",
                guild=place.guild,
                channel=place.channel,
                thread=place.thread,
                message=str(message.id),
                locale=self._locale(message.guild_id),
            ),
            attachments=attachments,
            context=await self._reply_chain(message, me.id),
        )

    def chat_mode(self, place: Place) -> bool:
        """Chat mode of the place: a thread's own, else its channel's."""
        own = self.view.chat_state(place.conversation)
        if own is None and place.parent_conversation:
            own = self.view.chat_state(place.parent_conversation)
        return bool(own)

    def _addressed(self, message: hikari.Message, place: Place, me: int) -> bool:
        if not place.guild or me in message.user_mentions_ids:
            return True
        replied = message.referenced_message
        if replied and replied.author and replied.author.id == me:
            return True
        return self.chat_mode(place)

    def _locale(self, guild_id: int | None) -> str:
        guild = self.bot.cache.get_guild(guild_id) if guild_id else None
        return str(guild.preferred_locale) if guild is not None else ""

    async def _reply_chain(self, message: hikari.Message, me: int) -> tuple[ContextMessage, ...]:
        """The messages this one replies to, back along the chain, oldest first."""
        chain: list[ContextMessage] = []
        replied: hikari.PartialMessage | None = message.referenced_message
        while replied is not None and len(chain) < self.chain_depth:
            chain.append(_context(replied, me))
            reference = replied.message_reference  # UNDEFINED (falsy) on partial messages
            if not reference or reference.id is None:
                break
            replied = self.bot.cache.get_message(reference.id) or await self._fetch(
                reference.channel_id, reference.id
            )
        return tuple(reversed(chain))

    async def _fetch(self, channel: int, message: int) -> hikari.Message | None:
        try:
            return await self.bot.rest.fetch_message(channel, message)
        except hikari.HTTPError as exc:  # deleted, unreadable, Discord down: the chain ends here
            log.info("reply chain stops at message %s: %s", message, exc)
            return None


def _without_mention(text: str, me: int) -> str:
    return re.sub(rf"<@!?{me}>", "", well_formed(text)).strip()


def _context(message: hikari.PartialMessage, me: int) -> ContextMessage:
    author = message.author  # UNDEFINED (falsy) on some partial messages
    mine = bool(author) and author.id == me
    text = message.content or ""
    return ContextMessage(
        role="assistant" if mine else "user",
        author=well_formed(author.global_name or author.username) if author else "",
        # Libra's own reply, as the model wrote it: the sources line is Discord's only.
        text=_without_mention(without_footer(text) if mine else text, me),
    )
