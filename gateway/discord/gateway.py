"""Libra's Discord text gateway: messages in as events, replies out as streamed messages.

For each message addressed to Libra the gateway makes a ``text.received`` (see
:mod:`.messages`), subscribes to the turn's events, then publishes the input with its id (made
from the Discord message) as ``Nats-Msg-Id``: claiming the turn and logging it are one step.
Two gateways on one shard publish the same event; the one whose publish is not a duplicate
answers. While the turns and llm processors work, it shows the typing indicator (unless the
reply starts at once), posts the reply on the first delta and edits it as more arrive
(:class:`.LiveReply`), and when the reply is complete it publishes ``reply.delivered`` with the
message ids. A rejected or failed turn gets the short message the event carries. If the log
cannot be written within a few seconds, the person is told at once to try again in a minute.
A gateway that starts delivers what one that stopped left undelivered (:mod:`.recovery`).
Voice channels (/join) are :mod:`.voice_calls`' part; a server's knowledge base (/learn,
/knowledge) :mod:`.knowledge_commands`', its tools (/tools) :mod:`.tool_commands`'.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
from datetime import UTC, datetime

import asyncpg
import hikari
import lightbulb
import nats.errors
import redis.asyncio as aioredis
from nats.js.errors import NoStreamResponseError
from redis.exceptions import RedisError

from libra.contracts import LlmCompleted, LlmDelta, LlmFailed, TextReceived, TurnRejected, new_id
from libra.processors.knowledge.documents import Limits
from libra.processors.moderation.base import engine_names
from libra.runtime.config import ConfigError, Settings
from libra.runtime.consumer import ConsumerRunner
from libra.runtime.eventlog import EventLog
from libra.runtime.follow import ReplyTimeout, TurnFollower
from libra.runtime.logs import bind
from libra.runtime.sessions import SessionView
from libra.tools.registry import installed

from .access import AccessPolicy, parse_ids
from .claims import TurnClaims
from .commands import SlashCommands, register_commands
from .knowledge_commands import KnowledgeCommands, register_knowledge_commands
from .live_reply import LiveReply
from .messages import MessageReader
from .modlog import ModerationLog
from .outcome import deliver, notice
from .recovery import Recovery
from .strings import localization, say
from .tool_commands import ToolCommands, register_tool_commands
from .voice_calls import VoiceCalls
from .voice_commands import VoiceCommands, register_voice_commands

__all__ = ["INTENTS", "DiscordGateway", "parse_shards"]

log = logging.getLogger("libra.discord")

INTENTS = (
    hikari.Intents.GUILDS
    | hikari.Intents.GUILD_MESSAGES
    | hikari.Intents.DM_MESSAGES
    | hikari.Intents.MESSAGE_CONTENT
    | hikari.Intents.GUILD_VOICE_STATES
)
# What the reader needs: threads' channels, servers' locales, recent messages for reply chains.
_CACHE = hikari.impl.CacheSettings(
    components=hikari.api.CacheComponents.GUILDS
    | hikari.api.CacheComponents.GUILD_CHANNELS
    | hikari.api.CacheComponents.GUILD_THREADS
    | hikari.api.CacheComponents.MESSAGES
    | hikari.api.CacheComponents.ME
    | hikari.api.CacheComponents.VOICE_STATES,
    max_messages=2000,
)
_TYPING_EVERY_S = 8.0  # Discord shows the indicator for 10 s
_TYPING_AFTER_S = 0.25  # a reply that starts sooner needs no indicator (nor its REST call)
_DRAIN_S = 20.0
# The log is written within this, or the person hears it is down: an answer within 5 s.
_PUBLISH_WITHIN_S = 3.0
_PUBLISH_RETRY_S = 0.25
_REFUSAL_CLAIM_S = 1.0
_INVITE_PERMISSIONS = (
    hikari.Permissions.VIEW_CHANNEL
    | hikari.Permissions.SEND_MESSAGES
    | hikari.Permissions.SEND_MESSAGES_IN_THREADS
    | hikari.Permissions.READ_MESSAGE_HISTORY
    | hikari.Permissions.EMBED_LINKS
    | hikari.Permissions.ATTACH_FILES
    | hikari.Permissions.CONNECT
    | hikari.Permissions.SPEAK
)


def parse_shards(ids: str, count: int) -> tuple[list[int] | None, int | None]:
    """Reads ``DISCORD_SHARD_IDS`` ("0-3", "0,2") and ``DISCORD_SHARD_COUNT`` for hikari."""
    if not ids.strip():
        return None, count or None
    if count <= 0:
        raise ConfigError("DISCORD_SHARD_IDS needs DISCORD_SHARD_COUNT")
    shards: list[int] = []
    for part in ids.split(","):
        first, _, last = part.strip().partition("-")
        try:
            shards.extend(range(int(first), int(last or first) + 1))
        except ValueError:
            raise ConfigError(f"DISCORD_SHARD_IDS: {part.strip()!r} is not a shard") from None
    if any(not 0 <= s < count for s in shards):
        raise ConfigError(f"DISCORD_SHARD_IDS: every shard must be below {count}")
    return sorted(set(shards)), count


class DiscordGateway:
    """The Discord text edge as a component: :meth:`run` until :meth:`stop`."""

    def __init__(
        self,
        settings: Settings,
        log_: EventLog,
        pool: asyncpg.Pool,
        redis: aioredis.Redis,
        *,
        reply_idle_s: float = 60.0,
        recover_grace_s: float = 10.0,
        voice_ssl: ssl.SSLContext | None = None,
    ) -> None:
        if not settings.discord_token:
            raise ConfigError("DISCORD_TOKEN is not set")
        self.settings = settings
        self.log = log_
        self.reply_idle_s = reply_idle_s  # silence from the processors before "no answer came"
        self.shards = parse_shards(settings.discord_shard_ids, settings.discord_shard_count)
        self.view = SessionView(log_, pool)
        self.access = AccessPolicy(
            guilds=parse_ids(settings.discord_allowed_guilds),
            admin_roles=parse_ids(settings.discord_admin_roles),
            file=settings.discord_access_file,
        )
        owner = f"{socket.gethostname()}:{os.getpid()}:{new_id()[-6:]}"  # who claimed, for people
        self.claims = TurnClaims(redis, owner=owner)  # for refusals and voice commands
        self.bot = hikari.GatewayBot(
            settings.discord_token,
            intents=INTENTS,
            rest_url=settings.discord_rest_url or None,
            cache_settings=_CACHE,
            # hikari closes every REST connection after one request by default (for Windows'
            # sake); keeping them open spares a TCP and TLS handshake on each message and edit.
            http_settings=hikari.impl.HTTPSettings(force_close_transports=False),
            logs=None,  # Libra's logging is configured already; hikari must not replace it
            banner=None,
            suppress_optimization_warning=True,
        )
        self.reader = MessageReader(
            self.bot,
            self.view,
            self.access,
            vision_models=[m for m in settings.vision_models.split(",") if m.strip()],
            default_model=settings.primary_model,
            text_chars=settings.discord_text_attachment_chars,
            chain_depth=settings.discord_reply_chain,
        )
        guild = settings.discord_guild_id.strip()
        self.commands = lightbulb.client_from_app(
            self.bot,
            default_enabled_guilds=[int(guild)] if guild else (),
            localization_provider=localization(),
        )
        slash = SlashCommands(
            log_,
            pool,
            self.view,
            self.access,
            default_model=settings.primary_model,
            default_persona=settings.libra_persona,
            moderation_engines=",".join(engine_names(settings)),
        )
        register_commands(self.commands, slash)
        limits = Limits.from_settings(settings)
        register_knowledge_commands(
            self.commands, KnowledgeCommands(log_, pool, slash, limits=limits)
        )
        tools = ToolCommands(slash, installed().tools, default=settings.tools_enabled)
        register_tool_commands(self.commands, tools)
        self.recovery = Recovery(
            self.bot,
            log_,
            window_s=settings.discord_recover_sec,
            grace_s=recover_grace_s,
            idle_s=reply_idle_s,
            edit_interval=settings.discord_edit_interval_sec,
            mine=self._on_my_shards,
        )
        self.voice = VoiceCalls(self.bot, log_, settings, self.access, ssl=voice_ssl)
        self.modlog = ConsumerRunner(
            log_, ModerationLog(self.bot.rest, self.view, self.claims), concurrency=8
        )
        register_voice_commands(self.commands, VoiceCommands(log_, self.voice, self.claims, slash))
        self.bot.subscribe(hikari.StartedEvent, self._on_started)
        self.bot.subscribe(hikari.MessageCreateEvent, self._on_message)
        self._answering: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()
        self.ready = asyncio.Event()  # connected, and slash commands synced (or given up on)

    async def run(self) -> None:
        """Connects to Discord and answers until :meth:`stop`, then finishes replies under way."""
        await self.view.start()
        shard_ids, shard_count = self.shards
        modlog = asyncio.create_task(self.modlog.run(), name="moderation-log")
        try:
            await self.voice.start()
            connected_at = datetime.now(UTC)
            await self.bot.start(
                check_for_updates=False, shard_ids=shard_ids, shard_count=shard_count
            )
            recovering = self.recovery.run(connected_at=connected_at)
            self._track(asyncio.create_task(recovering, name="recover-replies"))
            closed = asyncio.ensure_future(self.bot.join())
            stopping = asyncio.ensure_future(self._stopping.wait())
            await asyncio.wait({closed, stopping}, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            if closed.done():
                closed.result()  # a token Discord refused, say: the supervisor logs and retries
            else:
                closed.cancel()
        finally:
            self._stopping.set()
            await self.modlog.stop()
            await self.voice.stop()
            await self._drain()
            await asyncio.gather(modlog, return_exceptions=True)
            await self.commands.stop()
            if self.bot.is_alive:
                await self.bot.close()
            await self.view.stop()

    async def stop(self) -> None:
        self._stopping.set()

    async def _on_started(self, _event: hikari.StartedEvent) -> None:
        me = self.bot.get_me()
        log.info("on Discord as %s (%s)", me.username if me else "?", me.id if me else "?")
        if self.settings.discord_client_id:
            log.info(
                "invite: https://discord.com/oauth2/authorize?client_id=%s"
                "&scope=bot%%20applications.commands&permissions=%d",
                self.settings.discord_client_id,
                int(_INVITE_PERMISSIONS),
            )
        try:
            await self.commands.start()
        except hikari.HTTPError:
            log.exception("could not sync slash commands; messages are still answered")
        self.ready.set()

    async def _on_message(self, event: hikari.MessageCreateEvent) -> None:
        if self._stopping.is_set():
            return
        message = event.message
        try:
            place = self.reader.addressed(message)
            if place is None:
                return
            said = await self.reader.read(message, place)
        except Exception:
            log.exception("could not read message %s", message.id)
            return
        self._track(asyncio.create_task(self._answer(message, said), name=f"answer-{message.id}"))

    def _track(self, task: asyncio.Task[None]) -> None:
        self._answering.add(task)
        task.add_done_callback(self._answering.discard)

    def _on_my_shards(self, said: TextReceived) -> bool:
        """Whether Discord sends this gateway the messages of ``said``'s server (or DM)."""
        shard_ids, shard_count = self.shards
        if shard_ids is None or not shard_count:
            return True
        return (int(said.origin.guild or 0) >> 22) % shard_count in shard_ids

    async def _answer(self, message: hikari.Message, said: TextReceived) -> None:
        bind(conversation=said.conversation, turn=said.id)
        try:
            async with TurnFollower(self.log, said.conversation, said.id) as follower:
                first = await self._publish_input(said)
                if first is None:
                    await self._refuse(message, said)
                elif first:
                    await self._reply(message, said, follower)
        except Exception:
            log.exception("could not answer message %s", message.id)

    async def _publish_input(self, said: TextReceived) -> bool | None:
        """True: this gateway answers; False: another one does; None: the log is out of reach."""
        try:
            async with asyncio.timeout(_PUBLISH_WITHIN_S):
                while True:
                    # Published while disconnected, the input would wait in the client's buffer
                    # and reach the log after the person was told it is down.
                    if self.log.nc.is_connected:
                        with contextlib.suppress(NoStreamResponseError):  # a leader election
                            return await self.log.publish_first(said)
                    await asyncio.sleep(_PUBLISH_RETRY_S)
        except (TimeoutError, nats.errors.Error) as exc:
            log.warning("could not log message %s: %r", said.origin.message, exc)
            return None

    async def _refuse(self, message: hikari.Message, said: TextReceived) -> None:
        """Tells the person the bot cannot answer now, rather than leave them waiting.

        Without the log, Redis says which gateway tells them; with Redis down as well, each one
        does (twice beats silence).
        """
        try:
            async with asyncio.timeout(_REFUSAL_CLAIM_S):
                if not await self.claims.claim(f"refusal:{said.id}"):
                    return
        except (TimeoutError, RedisError, OSError) as exc:
            log.warning("no claim on the refusal of message %s: %r", message.id, exc)
        reply = LiveReply(self.bot.rest, message.channel_id, reply_to=message.id)
        await reply.say(say("unavailable", said.origin.locale))

    async def _reply(
        self, message: hikari.Message, said: TextReceived, follower: TurnFollower
    ) -> None:
        reply = LiveReply(
            self.bot.rest,
            message.channel_id,
            reply_to=message.id,
            interval=self.settings.discord_edit_interval_sec,
        )
        typing = asyncio.create_task(self._typing(message.channel_id, reply.first_posted))
        try:
            await self._follow(follower, reply, said.origin.locale)
        except ReplyTimeout:
            await reply.say(notice(None, said.origin.locale))
        finally:
            typing.cancel()
            await reply.close()

    async def _follow(self, follower: TurnFollower, reply: LiveReply, locale: str) -> None:
        text = ""
        async for event in follower.events(idle_s=self.reply_idle_s):
            match event:
                case LlmDelta():
                    # index 0 again: the llm restarted mid-reply, and its new attempt replaces
                    # what the stopped one wrote
                    text = event.text if event.index == 0 else text + event.text
                    reply.update(text)
                case LlmCompleted():
                    await deliver(self.log, reply, event, locale)
                case TurnRejected() | LlmFailed():
                    await reply.say(notice(event, locale))

    async def _typing(self, channel: int, posted: asyncio.Event) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(posted.wait(), _TYPING_AFTER_S)
        while not posted.is_set():
            with contextlib.suppress(hikari.HTTPError):
                await self.bot.rest.trigger_typing(channel)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(posted.wait(), _TYPING_EVERY_S)

    async def _drain(self) -> None:
        if not self._answering:
            return
        _, late = await asyncio.wait(set(self._answering), timeout=_DRAIN_S)
        for task in late:
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)
