"""A loopback Discord that a real ``hikari.GatewayBot`` talks to: REST v10 and the gateway socket.

hikari's ``rest_url`` points at :attr:`FakeDiscord.rest_url`, and ``GET /gateway/bot`` answers
with the fake's own websocket. On it the fake speaks the gateway protocol as hikari expects it
(JSON, zlib-stream compression when the URL asks for it): HELLO, IDENTIFY, READY, GUILD_CREATE,
heartbeats and their ACKs, dispatches (MESSAGE_CREATE, MESSAGE_UPDATE, INTERACTION_CREATE) with
sequence numbers, and RESUME after :meth:`FakeDiscord.drop` cut the socket: the events sent
meanwhile are replayed, then RESUMED. Several sessions may identify for the same shard (two bot
processes) and each receives every event of its shard, as on Discord. Voice: people join voice
channels (:meth:`FakeDiscord.move_voice`, VOICE_STATE_UPDATE), and the bot's voice state update
(op 4) is answered with its VOICE_STATE_UPDATE and a VOICE_SERVER_UPDATE naming the voice server
the test registered for that channel (:meth:`FakeDiscord.voice_server`).

Slash commands (:meth:`FakeDiscord.invoke`) come with their channel and attachment options
resolved, as Discord sends them: a file made by :meth:`FakeDiscord.attachment` is served by the
fake, and its id is the option's value. :meth:`FakeDiscord.autocomplete` sends what Discord sends
while a person types an option that has autocomplete.

The REST side answers the calls Libra makes (``GET /guilds/{id}`` too, with the approximate
member counts when ``with_counts`` asks), records each one in :attr:`FakeDiscord.calls`, and
sends Discord's rate-limit headers, so hikari's limiter learns real per-channel buckets. A test
asks for 429s with :meth:`FakeDiscord.rate_limit`. Used by the tests and by
``libra bench discord``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import re
import time
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import WSMsgType, web

__all__ = [
    "DISCORD_EPOCH_MS",
    "MANAGE_CHANNELS",
    "MANAGE_GUILD",
    "FakeDiscord",
    "FakeUser",
    "Interaction",
    "RestCall",
    "snowflake_ms",
]

DISCORD_EPOCH_MS = 1_420_070_400_000
API = "/api/v10"
MANAGE_CHANNELS = 1 << 4
MANAGE_GUILD = 1 << 5
EVERYDAY_PERMISSIONS = (1 << 10) | (1 << 11) | (1 << 16)  # view channel, send, read history
_SYNC_FLUSH = zlib.Z_SYNC_FLUSH
_OP_DISPATCH, _OP_HEARTBEAT, _OP_IDENTIFY, _OP_VOICE_STATE, _OP_RESUME = 0, 1, 2, 4, 6
_OP_INVALID_SESSION, _OP_HELLO, _OP_HEARTBEAT_ACK = 9, 10, 11


def snowflake_ms(snowflake: int) -> int:
    """Returns the Unix time in milliseconds at which a Discord id was made."""
    return (int(snowflake) >> 22) + DISCORD_EPOCH_MS


def _iso(ms: float | None = None) -> str:
    moment = datetime.now(UTC) if ms is None else datetime.fromtimestamp(ms / 1000, tz=UTC)
    return moment.isoformat()


@dataclass(frozen=True)
class FakeUser:
    """A Discord account in the fake: a person, or a bot."""

    id: int
    name: str
    bot: bool = False

    def payload(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": str(self.id),
            "username": self.name,
            "global_name": self.name,
            "discriminator": "0",
            "avatar": None,
            "public_flags": 0,
        }
        if self.bot:
            out["bot"] = True
        return out


@dataclass(frozen=True)
class RestCall:
    """One REST request the fake answered: what was asked, and when it arrived (perf_counter)."""

    method: str
    path: str
    body: Any
    status: int
    at: float
    query: dict[str, str] = field(default_factory=dict)


@dataclass
class Interaction:
    """A slash command the fake sent, and the response the bot gave to it."""

    id: int
    token: str
    payload: dict[str, Any]
    responded: asyncio.Event = field(default_factory=asyncio.Event)
    response: dict[str, Any] | None = None
    followups: list[dict[str, Any]] = field(default_factory=list)

    @property
    def content(self) -> str:
        """The text of the bot's response (the last edit of it, or of a followup)."""
        if self.followups:
            return self.followups[-1].get("content") or ""
        data = (self.response or {}).get("data") or {}
        return data.get("content") or ""

    @property
    def answered(self) -> bool:
        """Whether the bot said something: a response, or a followup after deferring."""
        deferred = (self.response or {}).get("type") == 5
        return self.response is not None and (not deferred or bool(self.followups))

    @property
    def choices(self) -> list[dict[str, Any]]:
        """The choices the bot answered an autocomplete with."""
        return list(((self.response or {}).get("data") or {}).get("choices") or [])

    @property
    def ephemeral(self) -> bool:
        data = (self.response or {}).get("data") or {}
        return bool(int(data.get("flags") or 0) & 64)


class _Connection:
    """One gateway websocket: frames go out in order, zlib-stream compressed when asked."""

    def __init__(self, ws: web.WebSocketResponse, *, compress: bool) -> None:
        self.ws = ws
        self.compressor = zlib.compressobj() if compress else None
        self.lock = asyncio.Lock()

    async def send(self, frame: dict[str, Any]) -> None:
        async with self.lock:
            await self.send_locked(frame)

    async def send_locked(self, frame: dict[str, Any]) -> None:
        if self.ws.closed:
            return
        data = json.dumps(frame, separators=(",", ":")).encode()
        with contextlib.suppress(ConnectionError, RuntimeError):
            if self.compressor is None:
                await self.ws.send_str(data.decode())
            else:
                compressed = self.compressor.compress(data)
                await self.ws.send_bytes(compressed + self.compressor.flush(_SYNC_FLUSH))

    def cut(self) -> None:
        """Drops the TCP connection without a close frame, as a network failure would."""
        transport = self.ws._req.transport if self.ws._req is not None else None
        if transport is not None:
            transport.abort()


@dataclass
class _Session:
    id: str
    shard: tuple[int, int]
    conn: _Connection | None = None
    seq: int = 0
    sent: deque = field(default_factory=lambda: deque(maxlen=10_000))
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    resumes: int = 0
    replay_overlap: int = 0
    replayed: list[dict[str, Any]] = field(default_factory=list)  # frames sent again on RESUME


@dataclass
class _Bucket:
    """A rate-limit bucket: ``limit`` requests, one more allowed every ``period / limit``.

    This is the sliding window hikari's limiter reads Discord's headers as: the reset is when the
    bucket is full again, and one request comes back per slice of it.
    """

    limit: int
    period: float
    tokens: float
    updated: float

    def take(self, now: float) -> bool:
        self.tokens = min(self.limit, self.tokens + (now - self.updated) * self.limit / self.period)
        self.updated = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True

    def reset_after(self) -> float:
        """Seconds until the bucket is full again."""
        return (self.limit - self.tokens) * self.period / self.limit

    def retry_after(self) -> float:
        """Seconds until one request is allowed again."""
        return max(0.0, 1 - self.tokens) * self.period / self.limit


@dataclass
class _Forced429:
    method: str
    path: re.Pattern[str]
    times: int
    retry_after: float
    is_global: bool


# Routes under /api/v10: method, path pattern, handler, rate-limit bucket ("" for none), and
# whether the bot's token is required (interaction callbacks and webhooks go without it).
_M = r"(?P<message>\d+)"
_ROUTES: list[tuple[str, re.Pattern[str], str, str, bool]] = [
    (method, re.compile(path), handler, bucket, auth)
    for method, path, handler, bucket, auth in (
        ("GET", r"/gateway/bot", "_gateway_bot", "", True),
        ("GET", r"/users/@me", "_me", "me", True),
        ("GET", r"(?:/oauth2)?/applications/@me", "_application", "app", True),
        (
            "GET",
            r"/applications/(?P<app>\d+)(?:/guilds/(?P<guild>\d+))?/commands",
            "_commands",
            "",
            True,
        ),
        (
            "PUT",
            r"/applications/(?P<app>\d+)(?:/guilds/(?P<guild>\d+))?/commands",
            "_put_commands",
            "",
            True,
        ),
        ("POST", r"/channels/(?P<channel>\d+)/messages", "_create_message", "msg-create", True),
        ("GET", r"/channels/(?P<channel>\d+)/messages", "_list_messages", "msg-list", True),
        ("PATCH", rf"/channels/(?P<channel>\d+)/messages/{_M}", "_edit_message", "msg-edit", True),
        ("GET", rf"/channels/(?P<channel>\d+)/messages/{_M}", "_get_message", "msg-get", True),
        (
            "DELETE",
            rf"/channels/(?P<channel>\d+)/messages/{_M}",
            "_delete_message",
            "msg-del",
            True,
        ),
        ("POST", r"/channels/(?P<channel>\d+)/typing", "_typing", "typing", True),
        ("GET", r"/channels/(?P<channel>\d+)", "_get_channel", "channel", True),
        (
            "POST",
            r"/interactions/(?P<interaction>\d+)/(?P<token>[^/]+)/callback",
            "_callback",
            "",
            False,
        ),
        ("POST", r"/webhooks/(?P<app>\d+)/(?P<token>[^/]+)", "_followup", "webhook", False),
        (
            "PATCH",
            r"/webhooks/(?P<app>\d+)/(?P<token>[^/]+)/messages/(?P<message>[^/]+)",
            "_edit_response",
            "webhook",
            False,
        ),
        ("GET", r"/guilds/(?P<guild>\d+)", "_guild", "guild", True),
        ("GET", r"/guilds/(?P<guild>\d+)/members/(?P<user>\d+)", "_member", "member", True),
        ("GET", r"/guilds/(?P<guild>\d+)/roles", "_roles", "roles", True),
    )
]
# Discord's documented limits for the routes that matter to a chat bot, per major resource.
_LIMITS = {"msg-create": (5, 5.0), "msg-edit": (5, 5.0), "typing": (5, 5.0)}
_DEFAULT_LIMIT = (50, 1.0)


def _flat(options: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A command's options with those of its subcommands."""
    return [x for o in options for x in (o, *_flat(o.get("options") or []))]


class FakeDiscord:
    """Discord on 127.0.0.1: guilds, channels and people, REST calls recorded, events sent."""

    def __init__(
        self,
        *,
        shards: int = 1,
        heartbeat_interval_ms: int = 41_250,
    ) -> None:
        self.shards = shards
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self._ids = itertools.count(1)
        self.bot = FakeUser(self.snowflake(), "Libra", bot=True)
        self.application_id = self.bot.id
        self.token = f"{base64.b64encode(str(self.bot.id).encode()).decode()}.fake.loopback"
        self.calls: list[RestCall] = []
        self.messages: dict[int, dict[str, Any]] = {}
        # what each message the bot posted allowed to ping (Discord does not echo it back)
        self.allowed_mentions: dict[int, Any] = {}
        self.interactions: dict[int, Interaction] = {}
        self.commands: dict[int | None, list[dict[str, Any]]] = {}
        self.dispatched_at: dict[int, float] = {}
        self.guilds: dict[int, dict[str, Any]] = {}
        self.channels: dict[int, dict[str, Any]] = {}
        self.files: dict[str, tuple[bytes, str]] = {}
        self.uploads: dict[str, dict[str, Any]] = {}  # attachment payloads by id
        self.downloads: list[str] = []  # the names of the files fetched, in order
        # guild -> user id -> (user, voice channel): who is in which voice channel
        self.voice_states: dict[int, dict[int, tuple[FakeUser, int]]] = {}
        self.voice_servers: dict[int, tuple[str, str]] = {}  # voice channel -> endpoint, token
        self.voice_updates: list[tuple[int, int | None]] = []  # the bot's op 4: guild, channel
        # (guild, user) -> role ids, for GET /guilds/{guild}/members/{user}
        self.member_roles: dict[tuple[int, int], tuple[int, ...]] = {}
        self.sessions: list[_Session] = []
        self.identifies = 0
        self.heartbeats = 0
        self._forced: list[_Forced429] = []
        self._buckets: dict[tuple[str, str], _Bucket] = {}
        self._changed = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self.port = 0

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> FakeDiscord:
        app = web.Application(client_max_size=32 * 1024 * 1024)
        app.router.add_get("/gateway", self._gateway)
        app.router.add_get("/attachments/{name}", self._attachment)
        app.router.add_route("*", API + "/{tail:.*}", self._rest)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await self._site.start()
        self.port = self._site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        for session in self.sessions:
            if session.conn is not None:
                with contextlib.suppress(Exception):
                    await session.conn.ws.close(code=1001)
        if self._runner is not None:
            await self._runner.cleanup()

    async def __aenter__(self) -> FakeDiscord:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def rest_url(self) -> str:
        """What hikari's ``rest_url`` (and Libra's ``DISCORD_REST_URL``) should be."""
        return self.base_url + API

    # --- the world ------------------------------------------------------------------------------

    def snowflake(self) -> int:
        """Returns a new Discord id for the current millisecond."""
        ms = time.time_ns() // 1_000_000
        return ((ms - DISCORD_EPOCH_MS) << 22) | (next(self._ids) % (1 << 22))

    def user(self, name: str, *, bot: bool = False) -> FakeUser:
        return FakeUser(self.snowflake(), name, bot=bot)

    def add_guild(
        self,
        name: str = "Libra test",
        *,
        locale: str = "en-US",
        description: str | None = None,
        members: int = 2,
        online: int = 1,
    ) -> int:
        """Adds a server; ``members`` and ``online`` are its approximate counts."""
        guild_id = self.snowflake()
        self.guilds[guild_id] = {
            "id": guild_id,
            "name": name,
            "locale": locale,
            "roles": {},
            "description": description,
            "members": members,
            "online": online,
        }
        self.add_role(guild_id, "@everyone", role_id=guild_id)
        return guild_id

    def add_role(self, guild_id: int, name: str, *, role_id: int | None = None) -> int:
        role_id = role_id or self.snowflake()
        self.guilds[guild_id]["roles"][role_id] = name
        return role_id

    def add_channel(self, guild_id: int | None, name: str = "general") -> int:
        """Adds a text channel to a guild, or (``guild_id=None``) a DM channel."""
        channel_id = self.snowflake()
        self.channels[channel_id] = {"id": channel_id, "guild_id": guild_id, "name": name}
        return channel_id

    def add_voice_channel(self, guild_id: int, name: str = "voice") -> int:
        """Adds a voice channel to a guild."""
        channel_id = self.snowflake()
        self.channels[channel_id] = {
            "id": channel_id,
            "guild_id": guild_id,
            "name": name,
            "voice": True,
        }
        return channel_id

    def voice_server(self, channel_id: int, endpoint: str, token: str) -> None:
        """Where the bot is sent when it joins ``channel_id``: ``host:port`` and its token."""
        self.voice_servers[channel_id] = (endpoint, token)

    def add_thread(self, parent_id: int, name: str = "thread") -> int:
        parent = self.channels[parent_id]
        thread_id = self.snowflake()
        self.channels[thread_id] = {
            "id": thread_id,
            "guild_id": parent["guild_id"],
            "name": name,
            "parent_id": parent_id,
        }
        return thread_id

    def host_file(self, name: str, data: bytes, content_type: str) -> str:
        """Serves ``data`` as an attachment; returns its URL."""
        self.files[name] = (data, content_type)
        return f"{self.base_url}/attachments/{name}"

    def attachment(
        self, name: str, data: bytes, content_type: str, *, size: int | None = None
    ) -> dict[str, Any]:
        """Returns an attachment payload whose URL serves ``data``: for a message, or (its id)
        as the value of a slash command's attachment option. ``size`` is what Discord declares
        (``len(data)`` unless a test wants them to differ)."""
        url = self.host_file(name, data, content_type)
        payload = {
            "id": str(self.snowflake()),
            "filename": name,
            "content_type": content_type,
            "size": len(data) if size is None else size,
            "url": url,
            "proxy_url": url,
        }
        self.uploads[payload["id"]] = payload
        return payload

    def shard_of(self, guild_id: int | None) -> int:
        return 0 if guild_id is None else (guild_id >> 22) % self.shards

    # --- what people do -------------------------------------------------------------------------

    async def send_message(
        self,
        channel_id: int,
        content: str,
        *,
        author: FakeUser,
        roles: tuple[int, ...] = (),
        mention_bot: bool = False,
        reply_to: int | None = None,
        attachments: tuple[dict[str, Any], ...] = (),
    ) -> dict[str, Any]:
        """Someone writes in a channel: the message is stored and sent as MESSAGE_CREATE."""
        channel = self.channels[channel_id]
        if mention_bot:
            content = f"<@{self.bot.id}> {content}"
        payload = self._message_payload(
            channel,
            content,
            author=author,
            roles=roles,
            mentions=[self.bot] if mention_bot else [],
            reply_to=reply_to,
            attachments=list(attachments),
        )
        self.messages[int(payload["id"])] = payload
        self.dispatched_at[int(payload["id"])] = time.perf_counter()
        await self.dispatch("MESSAGE_CREATE", payload, guild_id=channel["guild_id"])
        return payload

    async def invoke(
        self,
        name: str,
        *,
        channel_id: int,
        user: FakeUser,
        options: list[dict[str, Any]] | None = None,
        permissions: int = EVERYDAY_PERMISSIONS,
        roles: tuple[int, ...] = (),
        locale: str = "en-US",
    ) -> Interaction:
        """Someone runs a slash command: INTERACTION_CREATE; the bot's answer lands on it.

        An attachment option (type 11) names an attachment made by :meth:`attachment` by its id
        (or is given the payload itself); the interaction carries it resolved.
        """
        return await self._interact(
            2,
            name,
            channel_id=channel_id,
            user=user,
            options=options,
            permissions=permissions,
            roles=roles,
            locale=locale,
        )

    async def autocomplete(
        self,
        name: str,
        *,
        channel_id: int,
        user: FakeUser,
        options: list[dict[str, Any]],
        permissions: int = EVERYDAY_PERMISSIONS,
        roles: tuple[int, ...] = (),
        locale: str = "en-US",
    ) -> Interaction:
        """Someone types in an option with autocomplete (the one marked ``"focused": True``);
        the bot's choices land on the interaction (:attr:`Interaction.choices`)."""
        return await self._interact(
            4,
            name,
            channel_id=channel_id,
            user=user,
            options=options,
            permissions=permissions,
            roles=roles,
            locale=locale,
        )

    async def _interact(
        self,
        kind: int,
        name: str,
        *,
        channel_id: int,
        user: FakeUser,
        options: list[dict[str, Any]] | None,
        permissions: int,
        roles: tuple[int, ...],
        locale: str,
    ) -> Interaction:
        channel = self.channels[channel_id]
        guild_id = channel["guild_id"]
        command = next(
            (
                c
                for c in self.commands.get(guild_id, []) + self.commands.get(None, [])
                if c["name"] == name
            ),
            None,
        )
        if command is None:
            raise LookupError(f"no command {name!r} was synced")
        interaction_id = self.snowflake()
        token = f"interaction-token-{interaction_id}"
        options = self._uploaded(options or [])
        data: dict[str, Any] = {
            "id": command["id"],
            "name": name,
            "type": 1,
            "options": options,
        }
        if command.get("guild_id"):
            data["guild_id"] = command["guild_id"]
        if resolved := self._resolved(options):
            data["resolved"] = resolved
        payload: dict[str, Any] = {
            "id": str(interaction_id),
            "application_id": str(self.application_id),
            "type": kind,
            "data": data,
            "channel_id": str(channel_id),
            "channel": self._channel_payload(channel),
            "token": token,
            "version": 1,
            "locale": locale,
            "app_permissions": str(EVERYDAY_PERMISSIONS),
            "entitlements": [],
            "authorizing_integration_owners": {"0": str(guild_id or user.id)},
            "context": 0 if guild_id else 1,
            "attachment_size_limit": 10_485_760,
        }
        if guild_id:
            payload["guild_id"] = str(guild_id)
            payload["guild_locale"] = self.guilds[guild_id]["locale"]
            payload["member"] = {
                **self._member_payload(roles),
                "user": user.payload(),
                "permissions": str(permissions),
            }
        else:
            payload["user"] = user.payload()
        interaction = Interaction(interaction_id, token, payload)
        self.interactions[interaction_id] = interaction
        await self.dispatch("INTERACTION_CREATE", payload, guild_id=guild_id)
        return interaction

    def _uploaded(self, options: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """``options`` with an attachment payload given as an option's value put by its id."""
        out = []
        for option in options:
            option = dict(option)
            if option.get("type") == 11 and isinstance(option.get("value"), dict):
                upload = option["value"]
                self.uploads[upload["id"]] = upload
                option["value"] = upload["id"]
            if option.get("options"):
                option["options"] = self._uploaded(option["options"])
            out.append(option)
        return out

    def _resolved(self, options: list[dict[str, Any]]) -> dict[str, Any]:
        """The channels and attachments the options name, as Discord sends them along."""
        flat = _flat(options)
        resolved: dict[str, Any] = {}
        channels = [o["value"] for o in flat if o.get("type") == 7]
        if channels:
            resolved["channels"] = {
                str(c): {**self._channel_payload(self.channels[int(c)]), "permissions": "0"}
                for c in channels
            }
        files = [str(o["value"]) for o in flat if o.get("type") == 11]
        if files:
            resolved["attachments"] = {f: self.uploads[f] for f in files}
        return resolved

    async def move_voice(self, user: FakeUser, guild_id: int, channel_id: int | None) -> None:
        """Someone joins a voice channel, moves, or (``channel_id`` None) leaves voice."""
        await self._set_voice_state(user, guild_id, channel_id, session_id=f"voice-{user.id}")

    async def _set_voice_state(
        self, user: FakeUser, guild_id: int, channel_id: int | None, *, session_id: str
    ) -> None:
        states = self.voice_states.setdefault(guild_id, {})
        if channel_id is None:
            states.pop(user.id, None)
        else:
            states[user.id] = (user, channel_id)
        await self.dispatch(
            "VOICE_STATE_UPDATE",
            self._voice_state_payload(user, guild_id, channel_id, session_id),
            guild_id=guild_id,
        )
        await self._changed_now()

    async def _update_voice_state(self, session: _Session, data: dict[str, Any]) -> None:
        """The bot's op 4: its new voice state to the shard, the voice server to this session."""
        guild_id = int(data["guild_id"])
        channel_id = int(data["channel_id"]) if data.get("channel_id") else None
        self.voice_updates.append((guild_id, channel_id))
        await self._set_voice_state(self.bot, guild_id, channel_id, session_id=session.id)
        server = self.voice_servers.get(channel_id) if channel_id is not None else None
        if server is not None:
            endpoint, token = server
            await self._dispatch_to(
                session,
                "VOICE_SERVER_UPDATE",
                {"token": token, "guild_id": str(guild_id), "endpoint": endpoint},
            )

    # --- the gateway ----------------------------------------------------------------------------

    async def dispatch(self, name: str, data: dict[str, Any], *, guild_id: int | None) -> None:
        """Sends an event to every session of the shard that holds ``guild_id``."""
        shard = self.shard_of(guild_id)
        for session in list(self.sessions):
            if session.shard[0] == shard:
                await self._dispatch_to(session, name, data)

    async def drop(self, *, replay_overlap: int = 0) -> None:
        """Cuts every session's socket without a close frame; the bot may RESUME.

        ``replay_overlap`` makes the RESUME replay that many events the bot already received, as
        Discord may do, so a test can check that nothing is answered twice.
        """
        for session in self.sessions:
            async with session.lock:
                conn, session.conn = session.conn, None
                session.replay_overlap = replay_overlap
            if conn is not None:
                conn.cut()
        await self._changed_now()

    async def wait_for(self, check: Callable[[], bool], *, timeout: float = 10.0) -> None:
        """Waits until ``check()`` is true; checked after every REST call, handshake, heartbeat."""
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(check)

    async def ready(self, sessions: int = 1, *, timeout: float = 20.0) -> None:
        """Waits until ``sessions`` sessions are connected (identified or resumed)."""
        await self.wait_for(
            lambda: sum(1 for s in self.sessions if s.conn is not None) >= sessions,
            timeout=timeout,
        )

    async def _changed_now(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _gateway(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        conn = _Connection(ws, compress=request.query.get("compress") == "zlib-stream")
        await conn.send({"op": _OP_HELLO, "d": {"heartbeat_interval": self.heartbeat_interval_ms}})
        session: _Session | None = None
        async for msg in ws:
            if msg.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
                break
            frame = json.loads(msg.data)
            op = frame.get("op")
            if op == _OP_HEARTBEAT:
                self.heartbeats += 1
                await conn.send({"op": _OP_HEARTBEAT_ACK})
                await self._changed_now()
            elif op == _OP_IDENTIFY:
                session = await self._identify(conn, frame["d"])
            elif op == _OP_RESUME:
                session = await self._resume(conn, frame["d"])
            elif op == _OP_VOICE_STATE and session is not None:
                await self._update_voice_state(session, frame["d"])
        if session is not None and session.conn is conn:
            session.conn = None
        await self._changed_now()
        return ws

    async def _identify(self, conn: _Connection, data: dict[str, Any]) -> _Session | None:
        if data.get("token") != self.token:
            await conn.ws.close(code=4004, message=b"Authentication failed")
            return None
        shard_id, shard_count = data.get("shard") or (0, 1)
        self.identifies += 1
        session = _Session(id=f"session-{self.snowflake()}", shard=(shard_id, shard_count))
        guilds = [g for g in self.guilds if self.shard_of(g) == shard_id]
        async with session.lock:
            session.conn = conn
            self.sessions.append(session)
            await self._dispatch_locked(
                session,
                "READY",
                {
                    "v": 10,
                    "user": {
                        **self.bot.payload(),
                        "mfa_enabled": False,
                        "flags": 0,
                        "verified": True,
                    },
                    "guilds": [{"id": str(g), "unavailable": True} for g in guilds],
                    "session_id": session.id,
                    "resume_gateway_url": f"ws://127.0.0.1:{self.port}/gateway",
                    "shard": [shard_id, shard_count],
                    "application": {"id": str(self.application_id), "flags": 0},
                },
            )
            for guild_id in guilds:
                await self._dispatch_locked(session, "GUILD_CREATE", self._guild_payload(guild_id))
        await self._changed_now()
        return session

    async def _resume(self, conn: _Connection, data: dict[str, Any]) -> _Session | None:
        session = next((s for s in self.sessions if s.id == data.get("session_id")), None)
        if session is None or data.get("token") != self.token:
            await conn.send({"op": _OP_INVALID_SESSION, "d": False})
            return None
        async with session.lock:
            since = int(data.get("seq") or 0) - session.replay_overlap
            session.replay_overlap = 0
            session.resumes += 1
            session.conn = conn
            async with conn.lock:
                for seq, frame in list(session.sent):
                    if seq > since:
                        session.replayed.append(frame)
                        await conn.send_locked(frame)
            await self._dispatch_locked(session, "RESUMED", {})
        await self._changed_now()
        return session

    async def _dispatch_to(self, session: _Session, name: str, data: dict[str, Any]) -> None:
        async with session.lock:
            await self._dispatch_locked(session, name, data)

    @staticmethod
    async def _dispatch_locked(session: _Session, name: str, data: dict[str, Any]) -> None:
        session.seq += 1
        frame = {"op": _OP_DISPATCH, "t": name, "s": session.seq, "d": data}
        session.sent.append((session.seq, frame))
        if session.conn is not None:
            await session.conn.send(frame)

    # --- REST -----------------------------------------------------------------------------------

    def rate_limit(
        self,
        method: str,
        path: str,
        *,
        times: int = 1,
        retry_after: float = 0.5,
        is_global: bool = False,
    ) -> None:
        """Answers the next ``times`` matching requests with 429 (``path`` is a regex on the path
        under ``/api/v10``, e.g. ``r"/channels/\\d+/messages/\\d+"``)."""
        self._forced.append(
            _Forced429(method.upper(), re.compile(path), times, retry_after, is_global)
        )

    def calls_to(self, method: str, path: str) -> list[RestCall]:
        """The recorded calls whose method matches and whose path matches the regex ``path``."""
        pattern = re.compile(path)
        return [c for c in self.calls if c.method == method and pattern.fullmatch(c.path)]

    def bot_messages(self, channel_id: int) -> list[dict[str, Any]]:
        """The bot's messages in a channel as they are now (after edits), oldest first."""
        return [
            m
            for m in self.messages.values()
            if m["channel_id"] == str(channel_id) and m["author"]["id"] == str(self.bot.id)
        ]

    async def _rest(self, request: web.Request) -> web.Response:
        arrived = time.perf_counter()
        path = "/" + request.match_info["tail"]
        body = (
            await request.json()
            if request.can_read_body and request.content_type == ("application/json")
            else None
        )
        for method, pattern, handler, bucket, auth in _ROUTES:
            match = pattern.fullmatch(path)
            if method == request.method and match:
                response = await self._answer(request, path, body, match, handler, bucket, auth)
                break
        else:
            response = web.json_response({"message": "404: Not Found", "code": 0}, status=404)
        self.calls.append(
            RestCall(
                request.method,
                path,
                body,
                response.status,
                arrived,
                dict(request.query),
            )
        )
        await self._changed_now()
        return response

    async def _answer(self, request, path, body, match, handler, bucket, auth) -> web.Response:
        if auth and request.headers.get("Authorization") != f"Bot {self.token}":
            return web.json_response({"message": "401: Unauthorized", "code": 0}, status=401)
        forced = self._forced_429(request.method, path)
        if forced is not None:
            # A bucket of one request, empty until retry_after: hikari's limiter reads the
            # headers (not the body) for a per-route 429 and waits exactly that long.
            return self._too_many(bucket, 1, forced.retry_after, forced.is_global)
        headers: dict[str, str] = {}
        if bucket:
            major = next((v for v in match.groupdict().values() if v), "")
            found = self._bucket(bucket, major)
            if not found.take(time.time()):
                return self._too_many(bucket, found.limit, found.retry_after(), False)
            headers = self._limit_headers(bucket, found)
        given = dict(request.query) if request.method == "GET" else body  # a GET's input: its query
        response = await getattr(self, handler)(given, **match.groupdict())
        response.headers.update(headers)
        return response

    def _forced_429(self, method: str, path: str) -> _Forced429 | None:
        for forced in self._forced:
            if forced.times > 0 and forced.method == method and forced.path.fullmatch(path):
                forced.times -= 1
                return forced
        return None

    def _bucket(self, bucket: str, major: str) -> _Bucket:
        found = self._buckets.get((bucket, major))
        if found is None:
            limit, period = _LIMITS.get(bucket, _DEFAULT_LIMIT)
            found = self._buckets[(bucket, major)] = _Bucket(limit, period, limit, time.time())
        return found

    @staticmethod
    def _limit_headers(bucket: str, found: _Bucket) -> dict[str, str]:
        reset_after = found.reset_after()
        return {
            "X-RateLimit-Bucket": f"fake-{bucket}",
            "X-RateLimit-Limit": str(found.limit),
            "X-RateLimit-Remaining": str(int(found.tokens)),
            "X-RateLimit-Reset": f"{time.time() + reset_after:.3f}",
            "X-RateLimit-Reset-After": f"{reset_after:.3f}",
        }

    @staticmethod
    def _too_many(bucket: str, limit: int, retry_after: float, is_global: bool) -> web.Response:
        retry_after = max(retry_after, 0.001)
        scope = "global" if is_global else "user" if bucket else "shared"
        headers = {"Retry-After": str(max(1, round(retry_after))), "X-RateLimit-Scope": scope}
        if is_global:
            headers["X-RateLimit-Global"] = "true"
        elif bucket:
            headers.update(
                {
                    "X-RateLimit-Bucket": f"fake-{bucket}",
                    "X-RateLimit-Limit": str(limit),
                    "X-RateLimit-Remaining": "0",
                    "X-RateLimit-Reset": f"{time.time() + retry_after:.3f}",
                    "X-RateLimit-Reset-After": f"{retry_after:.3f}",
                }
            )
        return web.json_response(
            {
                "message": "You are being rate limited.",
                "retry_after": retry_after,
                "global": is_global,
            },
            status=429,
            headers=headers,
        )

    async def _gateway_bot(self, _body: Any) -> web.Response:
        return web.json_response(
            {
                "url": f"ws://127.0.0.1:{self.port}/gateway",
                "shards": self.shards,
                "session_start_limit": {
                    "total": 1000,
                    "remaining": 1000,
                    "reset_after": 0,
                    "max_concurrency": 16,
                },
            }
        )

    async def _me(self, _body: Any) -> web.Response:
        return web.json_response({**self.bot.payload(), "mfa_enabled": False, "flags": 0})

    async def _application(self, _body: Any) -> web.Response:
        return web.json_response(
            {
                "id": str(self.application_id),
                "name": "Libra",
                "description": "",
                "bot_public": True,
                "bot_require_code_grant": False,
                "owner": FakeUser(self.application_id + 1, "owner").payload(),
                "verify_key": "00" * 32,
                "flags": 0,
                "approximate_guild_count": len(self.guilds),
                "approximate_user_install_count": 0,
                "integration_types_config": {"0": {}},
            }
        )

    async def _commands(self, _body: Any, app: str, guild: str | None = None) -> web.Response:
        return web.json_response(self.commands.get(int(guild) if guild else None, []))

    async def _put_commands(self, body: Any, app: str, guild: str | None = None) -> web.Response:
        stored = []
        for command in body or []:
            stored.append(
                {
                    "type": 1,
                    "options": [],
                    "default_member_permissions": None,
                    "name_localizations": {},
                    "description_localizations": {},
                    "nsfw": False,
                    **command,
                    "id": str(self.snowflake()),
                    "application_id": app,
                    "guild_id": guild,
                    "version": str(self.snowflake()),
                }
            )
        self.commands[int(guild) if guild else None] = stored
        return web.json_response(stored)

    async def _create_message(self, body: dict[str, Any], channel: str) -> web.Response:
        target = self.channels.get(int(channel))
        if target is None:
            return web.json_response({"message": "Unknown Channel", "code": 10003}, status=404)
        content = body.get("content") or ""
        if not content.strip() or len(content) > 2000:
            return web.json_response({"message": "Invalid Form Body", "code": 50035}, status=400)
        reference = (body.get("message_reference") or {}).get("message_id")
        payload = self._message_payload(
            target, content, author=self.bot, reply_to=int(reference) if reference else None
        )
        self.messages[int(payload["id"])] = payload
        self.allowed_mentions[int(payload["id"])] = body.get("allowed_mentions")
        # Discord sends a bot its own messages too; Libra must ignore them.
        await self.dispatch("MESSAGE_CREATE", payload, guild_id=target["guild_id"])
        return web.json_response(payload)

    async def _edit_message(self, body: dict[str, Any], channel: str, message: str) -> web.Response:
        stored = self.messages.get(int(message))
        if stored is None or stored["channel_id"] != channel:
            return web.json_response({"message": "Unknown Message", "code": 10008}, status=404)
        if stored["author"]["id"] != str(self.bot.id):
            return web.json_response({"message": "Cannot edit", "code": 50005}, status=403)
        content = body.get("content")
        if content is not None:
            if not content.strip() or len(content) > 2000:
                return web.json_response(
                    {"message": "Invalid Form Body", "code": 50035}, status=400
                )
            stored["content"] = content
            stored["edited_timestamp"] = _iso()
        await self.dispatch(
            "MESSAGE_UPDATE", stored, guild_id=self.channels[int(channel)]["guild_id"]
        )
        return web.json_response(stored)

    async def _list_messages(self, query: dict[str, str], channel: str) -> web.Response:
        """A channel's history as Discord pages it: up to ``limit`` (at most 100) messages just
        after ``after``, or just before ``before``, or the newest; newest first."""
        if int(channel) not in self.channels:
            return web.json_response({"message": "Unknown Channel", "code": 10003}, status=404)
        limit = max(1, min(int(query.get("limit", 50)), 100))
        found = sorted(
            (m for m in self.messages.values() if m["channel_id"] == channel),
            key=lambda m: int(m["id"]),
        )
        if "after" in query:
            found = [m for m in found if int(m["id"]) > int(query["after"])][:limit]
        else:
            before = int(query.get("before", 1 << 63))
            found = [m for m in found if int(m["id"]) < before][-limit:]
        return web.json_response(found[::-1])

    async def _get_message(self, _body: Any, channel: str, message: str) -> web.Response:
        stored = self.messages.get(int(message))
        if stored is None or stored["channel_id"] != channel:
            return web.json_response({"message": "Unknown Message", "code": 10008}, status=404)
        return web.json_response(stored)

    async def _delete_message(self, _body: Any, channel: str, message: str) -> web.Response:
        self.messages.pop(int(message), None)
        return web.Response(status=204)

    async def _typing(self, _body: Any, channel: str) -> web.Response:
        return web.Response(status=204)

    async def _get_channel(self, _body: Any, channel: str) -> web.Response:
        target = self.channels.get(int(channel))
        if target is None:
            return web.json_response({"message": "Unknown Channel", "code": 10003}, status=404)
        return web.json_response(self._channel_payload(target))

    async def _callback(self, body: dict[str, Any], interaction: str, token: str) -> web.Response:
        found = self.interactions.get(int(interaction))
        if found is None or found.token != token:
            return web.json_response({"message": "Unknown interaction", "code": 10062}, status=404)
        if found.response is not None:
            return web.json_response(
                {"message": "Interaction has already been acknowledged.", "code": 40060},
                status=400,
            )
        found.response = body
        found.responded.set()
        return web.json_response(
            {
                "interaction": {
                    "id": interaction,
                    "type": 2,
                    "response_message_loading": body.get("type") == 5,
                    "response_message_ephemeral": found.ephemeral,
                }
            }
        )

    def _interaction_by_token(self, token: str) -> Interaction | None:
        return next((i for i in self.interactions.values() if i.token == token), None)

    async def _followup(self, body: dict[str, Any], app: str, token: str) -> web.Response:
        found = self._interaction_by_token(token)
        if found is None:
            return web.json_response({"message": "Unknown Webhook", "code": 10015}, status=404)
        found.followups.append(body)
        found.responded.set()
        channel = self.channels[int(found.payload["channel_id"])]
        return web.json_response(
            self._message_payload(channel, body.get("content") or "", author=self.bot)
        )

    async def _edit_response(
        self, body: dict[str, Any], app: str, token: str, message: str
    ) -> web.Response:
        return await self._followup(body, app, token)

    async def _guild(self, query: dict[str, str], guild: str) -> web.Response:
        """A server as ``GET /guilds/{id}`` gives it; its approximate counts with
        ``with_counts=true``."""
        if int(guild) not in self.guilds:
            return web.json_response({"message": "Unknown Guild", "code": 10004}, status=404)
        return web.json_response(
            self._rest_guild_payload(int(guild), counts=query.get("with_counts") == "true")
        )

    async def _member(self, _body: Any, guild: str, user: str) -> web.Response:
        roles = self.member_roles.get((int(guild), int(user)), ())
        return web.json_response(
            {**self._member_payload(roles), "user": FakeUser(int(user), "someone").payload()}
        )

    async def _roles(self, _body: Any, guild: str) -> web.Response:
        roles = self.guilds.get(int(guild), {}).get("roles", {})
        return web.json_response([self._role_payload(r, n) for r, n in roles.items()])

    async def _attachment(self, request: web.Request) -> web.Response:
        self.downloads.append(request.match_info["name"])
        found = self.files.get(request.match_info["name"])
        if found is None:
            return web.Response(status=404)
        return web.Response(body=found[0], headers={"Content-Type": found[1]})

    # --- payloads -------------------------------------------------------------------------------

    def _message_payload(
        self,
        channel: dict[str, Any],
        content: str,
        *,
        author: FakeUser,
        roles: tuple[int, ...] = (),
        mentions: list[FakeUser] | None = None,
        reply_to: int | None = None,
        attachments: list[dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        message_id = self.snowflake()
        payload: dict[str, Any] = {
            "id": str(message_id),
            "channel_id": str(channel["id"]),
            "author": author.payload(),
            "content": content,
            "timestamp": _iso(snowflake_ms(message_id)),
            "edited_timestamp": None,
            "tts": False,
            "mention_everyone": False,
            "mentions": [u.payload() for u in mentions or []],
            "mention_roles": [],
            "attachments": attachments or [],
            "embeds": [],
            "pinned": False,
            "type": 0,
            "flags": 0,
        }
        if channel["guild_id"]:
            payload["guild_id"] = str(channel["guild_id"])
            payload["member"] = self._member_payload(roles)
        replied = self.messages.get(reply_to) if reply_to else None
        if replied is not None:
            payload["type"] = 19
            payload["message_reference"] = {
                "type": 0,
                "message_id": replied["id"],
                "channel_id": replied["channel_id"],
                **({"guild_id": replied["guild_id"]} if "guild_id" in replied else {}),
            }
            payload["referenced_message"] = {
                k: v for k, v in replied.items() if k != "referenced_message"
            }
        return payload

    def _voice_state_payload(
        self, user: FakeUser, guild_id: int, channel_id: int | None, session_id: str
    ) -> dict[str, Any]:
        return {
            "guild_id": str(guild_id),
            "channel_id": None if channel_id is None else str(channel_id),
            "user_id": str(user.id),
            "member": {**self._member_payload(()), "user": user.payload()},
            "session_id": session_id,
            "deaf": False,
            "mute": False,
            "self_deaf": False,
            "self_mute": False,
            "self_video": False,
            "suppress": False,
            "request_to_speak_timestamp": None,
        }

    @staticmethod
    def _member_payload(roles: tuple[int, ...]) -> dict[str, Any]:
        return {
            "roles": [str(r) for r in roles],
            "joined_at": _iso(),
            "deaf": False,
            "mute": False,
            "flags": 0,
        }

    def _channel_payload(self, channel: dict[str, Any]) -> dict[str, Any]:
        if channel["guild_id"] is None:
            return {"id": str(channel["id"]), "type": 1, "last_message_id": None, "recipients": []}
        out: dict[str, Any] = {
            "id": str(channel["id"]),
            "type": 0,
            "guild_id": str(channel["guild_id"]),
            "name": channel["name"],
            "position": 0,
            "permission_overwrites": [],
            "nsfw": False,
            "parent_id": None,
            "topic": None,
            "last_message_id": None,
            "rate_limit_per_user": 0,
            "permissions": str(EVERYDAY_PERMISSIONS),
        }
        if channel.get("voice"):
            out.update({"type": 2, "bitrate": 64_000, "user_limit": 0, "rtc_region": None})
        if "parent_id" in channel:
            out.update(
                {
                    "type": 11,
                    "parent_id": str(channel["parent_id"]),
                    "owner_id": str(self.bot.id),
                    "member_count": 1,
                    "message_count": 0,
                    "thread_metadata": {
                        "archived": False,
                        "auto_archive_duration": 1440,
                        "archive_timestamp": _iso(),
                        "locked": False,
                    },
                }
            )
        return out

    @staticmethod
    def _role_payload(role_id: int, name: str) -> dict[str, Any]:
        return {
            "id": str(role_id),
            "name": name,
            "color": 0,
            "hoist": False,
            "position": 0,
            "permissions": str(EVERYDAY_PERMISSIONS),
            "managed": False,
            "mentionable": False,
            "flags": 0,
        }

    def _rest_guild_payload(self, guild_id: int, *, counts: bool) -> dict[str, Any]:
        """The guild object of REST: GUILD_CREATE's without what only the gateway sends."""
        gateway_only = {
            "joined_at", "large", "member_count", "members", "presences", "voice_states",
            "channels", "threads", "unavailable",
        }  # fmt: skip
        guild = self.guilds[guild_id]
        out = {k: v for k, v in self._guild_payload(guild_id).items() if k not in gateway_only}
        out.update(
            {
                "max_members": 500_000,
                "max_presences": None,
                "max_video_channel_users": 25,
                "premium_subscription_count": 0,
                "widget_enabled": False,
                "widget_channel_id": None,
            }
        )
        if counts:
            out["approximate_member_count"] = guild["members"]
            out["approximate_presence_count"] = guild["online"]
        return out

    def _guild_payload(self, guild_id: int) -> dict[str, Any]:
        guild = self.guilds[guild_id]
        channels = [c for c in self.channels.values() if c["guild_id"] == guild_id]
        return {
            "id": str(guild_id),
            "name": guild["name"],
            "icon": None,
            "splash": None,
            "discovery_splash": None,
            "owner_id": str(self.application_id + 1),
            "afk_channel_id": None,
            "afk_timeout": 300,
            "verification_level": 0,
            "default_message_notifications": 0,
            "explicit_content_filter": 0,
            "roles": [self._role_payload(r, n) for r, n in guild["roles"].items()],
            "emojis": [],
            "stickers": [],
            "features": [],
            "mfa_level": 0,
            "application_id": None,
            "system_channel_id": None,
            "system_channel_flags": 0,
            "rules_channel_id": None,
            "vanity_url_code": None,
            "description": guild["description"],
            "banner": None,
            "premium_tier": 0,
            "preferred_locale": guild["locale"],
            "public_updates_channel_id": None,
            "nsfw_level": 0,
            "joined_at": _iso(),
            "large": False,
            "member_count": guild["members"],
            "members": [
                {**self._member_payload(()), "user": user.payload()}
                for user, _ in self.voice_states.get(guild_id, {}).values()
            ],
            "presences": [],
            "voice_states": [
                self._voice_state_payload(user, guild_id, channel, f"voice-{user.id}")
                for user, channel in self.voice_states.get(guild_id, {}).values()
            ],
            "channels": [self._channel_payload(c) for c in channels if "parent_id" not in c],
            "threads": [self._channel_payload(c) for c in channels if "parent_id" in c],
            "unavailable": False,
        }
