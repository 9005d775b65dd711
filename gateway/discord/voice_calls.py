"""Libra's voice calls in one gateway process: joining and leaving, and the log's side of them.

A call is made with hikari's voice component and Libra's transport
(:class:`~.voice.LibraVoiceConnection`), one per server, and its :class:`~.voice_call.VoiceCall`
is the connection's sink. Two subjects of the log drive the calls a process holds, whichever
process published to them:

- ``tts.synthesized``: each clip goes to the call of its conversation. Only the process that
  holds a server's voice connection has that call, so it is the one that plays.
- ``session.voice``: what the slash commands decided (``recording``, ``stopped``, ``auto``,
  ``manual``, ``left``) is applied by the process holding the call, which need not be the one
  that answered the command.

A call ends when a person uses ``/leave``, when it has had nobody else in it for
``DISCORD_VOICE_LEAVE_EMPTY_SEC``, when Discord ends it, and when the gateway stops; Libra's own
reasons are logged as ``session.voice`` ``left`` too. Someone who drags Libra into another
channel moves the call: ``left`` for the old channel, ``joined`` for the new one, in the same
listening mode (unless the access lists close that channel to Libra).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl as ssl_module
import time
from collections.abc import Awaitable
from datetime import UTC, datetime
from typing import Any, Literal

import hikari
from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy

from libra.contracts import (
    LOG_STREAM,
    EventDecodeError,
    SessionVoice,
    TtsSynthesized,
    decode_event,
    make,
    platform_of,
    raw_user,
)
from libra.gateway.voice import segmenter_config
from libra.runtime.audio import AudioStore
from libra.runtime.config import Settings
from libra.runtime.eventlog import EventLog

from .access import AccessPolicy, Speaker
from .voice import LibraVoiceConnection, VoiceConnectError, VoiceOptions
from .voice_call import VoiceCall

__all__ = ["VoiceCalls"]

log = logging.getLogger("libra.discord.voice")

# A speaker's capture fills the silence of a pause itself once no audio came for this long
# beyond the jitter window (Discord sends nothing while a person is quiet).
_FILL_AFTER_JITTER_MS = 40
# Roles fetched over REST for a speaker the cache lacks are trusted this long, so that a talk
# spurt does not cost a request each; a change of roles applies after it.
_FETCHED_ROLES_TTL_S = 60.0
_FETCHED_ROLES_MAX = 1024


class VoiceCalls:
    """The voice calls this gateway holds, one per server."""

    def __init__(
        self,
        bot: hikari.GatewayBot,
        log_: EventLog,
        settings: Settings,
        access: AccessPolicy,
        *,
        ssl: ssl_module.SSLContext | None = None,
    ) -> None:
        self.bot = bot
        self.log = log_
        self.settings = settings
        self.access = access
        self.options = VoiceOptions.from_settings(settings)
        self._ssl = ssl  # None: the system's trust store (tests trust their fake's certificate)
        self._calls: dict[int, VoiceCall] = {}
        self._since: dict[int, datetime] = {}
        self._audio: AudioStore | None = None
        self._subs: list[Any] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._fetched: dict[tuple[int, int], tuple[float, frozenset[str]]] = {}
        bot.subscribe(hikari.VoiceStateUpdateEvent, self._on_voice_state)

    async def start(self) -> None:
        """Opens the audio bucket and follows clips and voice session events from now on."""
        self._audio = await AudioStore.open(self.log, max_bytes=self.settings.max_audio_bytes)
        for subject, handler in (
            ("libra.tts.synthesized.>", self._on_clip),
            ("libra.session.voice.>", self._on_session),
        ):
            self._subs.append(
                await self.log.js.subscribe(
                    subject,
                    stream=LOG_STREAM,
                    cb=handler,
                    ordered_consumer=True,
                    deliver_policy=DeliverPolicy.NEW,
                )
            )

    async def stop(self) -> None:
        """Leaves every call (what was being said is written first) and stops following."""
        await asyncio.gather(*(self.leave(guild) for guild in list(self._calls)))
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def call(self, guild: int) -> VoiceCall | None:
        """This process's call in ``guild``, if it holds one."""
        return self._calls.get(guild)

    def channel_of(self, guild: int, user: int | None = None) -> int | None:
        """The voice channel a person (Libra when ``user`` is None) is in, as Discord said."""
        if user is None:
            me = self.bot.get_me()
            if me is None:
                return None
            user = int(me.id)
        state = self.bot.cache.get_voice_state(guild, user)
        return int(state.channel_id) if state is not None and state.channel_id else None

    async def join(self, guild: int, channel: int) -> VoiceCall:
        """Connects to a voice channel; raises VoiceConnectError or hikari.VoiceError."""
        current = self._calls.get(guild)
        if current is not None:
            if current.channel == channel:
                return current
            await self.leave(guild)
        assert self._audio is not None, "start() first"
        options = self.options
        call = VoiceCall(
            self.log,
            self._audio,
            guild=guild,
            channel=channel,
            segmenter=segmenter_config(self.settings),
            channels=options.channels,
            fill_gaps_ms=options.jitter_ms + _FILL_AFTER_JITTER_MS,
            bitrate=options.bitrate,
            leave_empty_s=self.settings.discord_voice_leave_empty_sec,
            on_empty=self._on_empty,
            may_hear=lambda user: self._may_hear(guild, channel, user),
        )
        since = datetime.now(UTC)
        try:
            connection = await self.bot.voice.connect_to(
                guild,
                channel,
                voice_connection_type=LibraVoiceConnection,
                timeout=int(options.connect_timeout_sec),
                sink=call,
                options=options,
                ssl=self._ssl,
            )
        except BaseException:
            await call.close()
            raise
        self._calls[guild], self._since[guild] = call, since
        call.start(connection)
        self._background(self._watch(call, connection))
        log.info("joined voice channel %s in %s", channel, guild)
        return call

    async def leave(self, guild: int, *, publish: bool = True, user: str = "") -> bool:
        """Leaves ``guild``'s call; ``publish``: log ``left`` (the commands log their own)."""
        call = self._calls.pop(guild, None)
        self._since.pop(guild, None)
        if call is None:
            return False
        if call.connection is not None:
            with contextlib.suppress(hikari.HTTPError, hikari.ComponentStateConflictError):
                await call.connection.disconnect()
        await call.close()
        if publish:
            await self._say(call, "left", user)
        log.info("left voice channel %s in %s", call.channel, guild)
        return True

    def _may_hear(self, guild: int, channel: int, user: int) -> bool | Awaitable[bool]:
        """Whether a speaker is heard, by the access lists and their roles as Discord last
        said. Where the lists name roles and the cache lacks the speaker, the answer is to be
        awaited: their roles are fetched over REST, and they are not heard if that fails."""
        state = self.bot.cache.get_voice_state(guild, user)
        member = state.member if state is not None else None
        member = member or self.bot.cache.get_member(guild, user)
        if member is not None:
            roles = frozenset(str(r) for r in member.role_ids)
        else:
            fetched = self._fetched.get((guild, user))
            fresh = fetched is not None and time.monotonic() - fetched[0] < _FETCHED_ROLES_TTL_S
            rules = self.access.rules()
            if not fresh and (rules.block.roles or rules.allow.roles):
                return self._fetch_and_decide(guild, channel, user)
            roles = fetched[1] if fresh and fetched is not None else frozenset()
        speaker = Speaker(user=str(user), guild=str(guild), channel=str(channel), roles=roles)
        return self.access.may_talk(speaker)

    async def _fetch_and_decide(self, guild: int, channel: int, user: int) -> bool:
        """Asks Discord for a speaker's roles, then decides as for a cached member."""
        try:
            member = await self.bot.rest.fetch_member(guild, user)
        except (hikari.HTTPError, hikari.ComponentStateConflictError) as exc:
            log.warning("roles of %s in %s unknown (%s): not heard", user, guild, exc)
            return False
        if len(self._fetched) >= _FETCHED_ROLES_MAX:
            self._fetched.clear()
        roles = frozenset(str(r) for r in member.role_ids)
        self._fetched[(guild, user)] = (time.monotonic(), roles)
        speaker = Speaker(user=str(user), guild=str(guild), channel=str(channel), roles=roles)
        return self.access.may_talk(speaker)

    def _on_empty(self, call: VoiceCall) -> None:
        if self._calls.get(call.guild) is call:
            log.info("nobody in voice channel %s: leaving", call.channel)
            self._background(self.leave(call.guild))

    async def _watch(self, call: VoiceCall, connection: LibraVoiceConnection) -> None:
        """Leaves (and says so in the log) when Discord ends a connection Libra still wanted."""
        await connection.join()
        if self._calls.get(call.guild) is call:
            log.warning("voice connection in %s ended by Discord", call.guild)
            await self.leave(call.guild)

    async def _on_voice_state(self, event: hikari.VoiceStateUpdateEvent) -> None:
        state = event.state
        call = self._calls.get(int(state.guild_id))
        me = self.bot.get_me()
        if call is None or me is None or state.user_id != me.id:
            return
        if state.channel_id is None or int(state.channel_id) == call.channel:
            return
        # Moved by someone: the call goes on there, as a new conversation in the same mode,
        # unless the access lists keep Libra out of that channel.
        guild, channel, automatic = call.guild, int(state.channel_id), call.automatic
        allowed = self.access.channel_open(str(guild), str(channel))
        log.info("moved from voice channel %s to %s", call.channel, channel)
        await self.leave(guild)
        if not allowed:
            log.info("voice channel %s is closed to Libra: not following", channel)
            return
        self._background(self._follow(guild, channel, automatic))

    async def _follow(self, guild: int, channel: int, automatic: bool) -> None:
        try:
            call = await self.join(guild, channel)
        except (VoiceConnectError, hikari.VoiceError, hikari.HTTPError) as exc:
            log.warning("could not follow into voice channel %s: %s", channel, exc)
            return
        call.set_automatic(automatic)
        await self._say(call, "joined")

    async def _say(self, call: VoiceCall, state: Literal["joined", "left"], user: str = "") -> None:
        """Logs what happened to a call (``user``: who made it happen; "" for Libra itself)."""
        await self.log.publish(
            make(
                SessionVoice,
                conversation=call.conversation,
                user=user,
                state=state,
                channel=str(call.channel),
                origin=call.origin,
            )
        )

    def _held(self, conversation: str) -> VoiceCall | None:
        return next((c for c in self._calls.values() if c.conversation == conversation), None)

    async def _on_clip(self, msg: Msg) -> None:
        try:
            event = decode_event(msg.data)
        except EventDecodeError:
            return
        if isinstance(event, TtsSynthesized) and (call := self._held(event.conversation)):
            call.take(event)

    async def _on_session(self, msg: Msg) -> None:
        try:
            event = decode_event(msg.data)
        except EventDecodeError:
            return
        call = self._held(event.conversation) if isinstance(event, SessionVoice) else None
        if call is None or event.at < self._since.get(call.guild, event.at):
            return  # not this process's call, or about an earlier call in that channel
        match event.state:
            case "recording" if (speaker := _speaker(event.user)) is not None:
                call.start_recording(speaker)
            case "stopped" if (speaker := _speaker(event.user)) is not None:
                call.stop_recording(speaker)
            case "auto" | "manual":
                call.set_automatic(event.state == "auto")
            case "left":
                await self.leave(call.guild, publish=False)

    def _background(self, work: Any) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _speaker(user: str) -> int | None:
    """The Discord id of the person a session event names; None for anyone not on Discord."""
    raw = raw_user(user)
    return int(raw) if platform_of(user) == "discord" and raw.isdigit() else None
