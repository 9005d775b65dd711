"""Libra's voice transport as hikari's ``VoiceConnection``, made by ``bot.voice.connect_to``."""

from __future__ import annotations

import ssl as ssl_module
from collections.abc import Awaitable, Callable

import hikari
from hikari.events import voice_events

from .options import VoiceOptions
from .player import Player
from .session import VoiceServer, VoiceSession
from .sink import VoiceSink

__all__ = ["LibraVoiceConnection"]


class LibraVoiceConnection(hikari.api.VoiceConnection):
    """One guild's voice connection; hikari creates it from the voice state and server updates.

    ``bot.voice.connect_to(guild, channel, voice_connection_type=LibraVoiceConnection,
    sink=..., options=VoiceOptions.from_settings(settings))``; the keyword arguments after
    the type reach ``initialize``. hikari then forwards the guild's voice events to ``notify``.
    """

    __slots__ = (
        "_channel_id",
        "_closed",
        "_guild_id",
        "_on_close",
        "_owner",
        "_shard_id",
        "session",
    )

    def __init__(
        self,
        *,
        session: VoiceSession,
        guild_id: hikari.Snowflake,
        channel_id: hikari.Snowflake,
        shard_id: int,
        owner: hikari.api.VoiceComponent,
        on_close: Callable[[LibraVoiceConnection], Awaitable[None]],
    ) -> None:
        self.session = session
        self._guild_id = guild_id
        self._channel_id = channel_id
        self._shard_id = shard_id
        self._owner = owner
        self._on_close = on_close
        self._closed = False

    @classmethod
    async def initialize(
        cls,
        channel_id: hikari.Snowflake,
        endpoint: str,
        guild_id: hikari.Snowflake,
        on_close: Callable[[LibraVoiceConnection], Awaitable[None]],
        owner: hikari.api.VoiceComponent,
        session_id: str,
        shard_id: int,
        token: str,
        user_id: hikari.Snowflake,
        *,
        sink: VoiceSink,
        options: VoiceOptions | None = None,
        ssl: ssl_module.SSLContext | None = None,
    ) -> LibraVoiceConnection:
        """Connects to the voice server; returns once audio can flow both ways."""
        connection: LibraVoiceConnection | None = None

        async def ended(_code: int | None) -> None:
            if connection is not None:
                await connection._closed_by_server()

        session = VoiceSession(
            guild_id=int(guild_id),
            channel_id=int(channel_id),
            user_id=int(user_id),
            session_id=session_id,
            server=VoiceServer(endpoint=endpoint, token=token),
            sink=sink,
            options=options,
            ssl=ssl,
            on_end=ended,
        )
        connection = cls(
            session=session,
            guild_id=guild_id,
            channel_id=channel_id,
            shard_id=shard_id,
            owner=owner,
            on_close=on_close,
        )
        await session.connect()
        return connection

    @property
    def channel_id(self) -> hikari.Snowflake:
        return self._channel_id

    @property
    def guild_id(self) -> hikari.Snowflake:
        return self._guild_id

    @property
    def is_alive(self) -> bool:
        return not self._closed and self.session.alive

    @property
    def shard_id(self) -> int:
        return self._shard_id

    @property
    def owner(self) -> hikari.api.VoiceComponent:
        return self._owner

    @property
    def player(self) -> Player:
        """Where Libra's speech goes: ``player.play(clip)``, ``player.stop()`` for barge-in."""
        return self.session.player

    async def disconnect(self) -> None:
        """Leaves the channel; hikari's on_close then updates the voice state."""
        if self._closed:
            return
        self._closed = True
        await self.session.close()
        await self._on_close(self)

    async def join(self) -> None:
        """Waits until the connection has ended."""
        await self.session.wait_closed()

    async def notify(self, event: voice_events.VoiceEvent) -> None:
        """Follows the guild's voice events: a new voice server, or Libra moved or removed."""
        if isinstance(event, voice_events.VoiceServerUpdateEvent):
            server = VoiceServer(event.endpoint, event.token) if event.endpoint else None
            await self.session.move(server)
        elif isinstance(event, voice_events.VoiceStateUpdateEvent):
            await self._own_state_changed(event.state)

    async def _own_state_changed(self, state: hikari.VoiceState) -> None:
        if state.user_id != self.session.user_id:
            return
        if state.channel_id is None:
            await self.disconnect()
        elif state.channel_id != self._channel_id:
            # DAVE's group is the channel: a new channel needs a new identify.
            self._channel_id = state.channel_id
            self.session.session_id = state.session_id
            await self.session.move(self.session.server, channel_id=int(state.channel_id))

    async def _closed_by_server(self) -> None:
        if not self._closed:
            self._closed = True
            await self._on_close(self)
