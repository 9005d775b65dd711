"""Libra's voice transport for one channel: the voice gateway, UDP, both encryption layers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl as ssl_module
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import davey

from .cipher import TransportCipher
from .dave import DaveError, DaveState
from .link import VoiceLink
from .metrics import FRAMES_SENT, SEND_LATENESS_SECONDS, VoiceStats
from .options import VoiceOptions
from .player import Player
from .protocol import ENCRYPTION_MODES, CloseCode, Message, Op, Speaking
from .receive import Receiver
from .rtp import FRAME_SAMPLES, FRAME_SECONDS, build_header
from .sink import VoiceSink
from .udp import VoiceSocket

__all__ = ["VoiceConnectError", "VoiceServer", "VoiceSession"]

_log = logging.getLogger(__name__)

# Close codes after which identifying again (same session, same server) may still work.
_IDENTIFY_AGAIN = frozenset({CloseCode.SESSION_NO_LONGER_VALID, CloseCode.SESSION_TIMEOUT})
# Libra closes a link whose heartbeats go unanswered with this code, then resumes.
_ZOMBIE = 4000


@dataclass(frozen=True, slots=True)
class VoiceServer:
    """Where to connect, from VOICE_SERVER_UPDATE: the endpoint and its token."""

    endpoint: str
    token: str


class VoiceConnectError(Exception):
    """The voice connection could not be established (``close_code`` from the server, if any)."""

    def __init__(self, message: str, close_code: int | None = None) -> None:
        super().__init__(message)
        self.close_code = close_code


class _Retry(Exception):
    """The link ended in a way that a new identify may fix."""


def _resumable(code: int | None) -> bool:
    return code is None or code < 4000 or code in (_ZOMBIE, CloseCode.VOICE_SERVER_CRASHED)


class VoiceSession:
    """One voice connection: hears each speaker (to ``sink``) and speaks (``player``).

    It resumes after a dropped websocket (replaying what it missed through ``seq_ack``),
    identifies afresh when the voice server changes (``move``), and ends on a close code that
    says the session is over; ``on_end`` then learns the code.
    """

    def __init__(
        self,
        *,
        guild_id: int,
        channel_id: int,
        user_id: int,
        session_id: str,
        server: VoiceServer,
        sink: VoiceSink,
        options: VoiceOptions | None = None,
        ssl: ssl_module.SSLContext | None = None,
        on_end: Callable[[int | None], Awaitable[None]] | None = None,
    ) -> None:
        self.guild_id = guild_id
        self.channel_id = channel_id
        self.user_id = user_id
        self.session_id = session_id
        self.options = options or VoiceOptions()
        self.stats = VoiceStats()
        self.ready = asyncio.Event()
        self.close_code: int | None = None
        self.receiver = Receiver(
            sink,
            self.stats,
            channels=self.options.channels,
            jitter_seconds=self.options.jitter_ms / 1000,
            idle_seconds=self.options.speaking_idle_ms / 1000,
        )
        self.player = Player(
            send=self._send_frame, speaking=self._set_speaking, on_sent=self._frame_sent
        )
        self._sink = sink
        self._server: VoiceServer | None = server
        self._server_set = asyncio.Event()
        self._server_set.set()
        self._ssl = ssl
        self._on_end = on_end
        self._fresh = False
        self._closing = False
        self._link: VoiceLink | None = None
        self._link_seq = -1
        self._udp: VoiceSocket | None = None
        self._cipher: TransportCipher | None = None
        self.dave: DaveState | None = None
        self._members: set[int] = set()
        self.ssrc = 0
        self.mode = ""
        self._rtp_seq = random.getrandbits(16)
        self._rtp_base = random.getrandbits(32)
        self._first_slot: float | None = None
        self._talking = False
        self._run_task: asyncio.Task[None] | None = None
        self._tick_task: asyncio.Task[None] | None = None

    @property
    def members(self) -> frozenset[int]:
        """The other people in the call."""
        return frozenset(self._members)

    @property
    def server(self) -> VoiceServer | None:
        return self._server

    @property
    def alive(self) -> bool:
        return self._run_task is not None and not self._run_task.done()

    async def connect(self) -> None:
        """Connects; returns once audio can flow both ways, or raises VoiceConnectError."""
        self._run_task = asyncio.create_task(self._run(), name="voice-session")
        self._tick_task = asyncio.create_task(self.receiver.run(), name="voice-receive-tick")
        ready = asyncio.create_task(self.ready.wait())
        await asyncio.wait(
            {ready, self._run_task},
            timeout=self.options.connect_timeout_sec,
            return_when=asyncio.FIRST_COMPLETED,
        )
        ready.cancel()
        if not self.ready.is_set():
            code = self.close_code
            await self.close()
            raise VoiceConnectError(f"voice connection failed (close code {code})", code)

    async def move(self, server: VoiceServer | None, *, channel_id: int | None = None) -> None:
        """Connects afresh to a new voice server; None: wait until one is given."""
        self._server = server
        if channel_id is not None:
            self.channel_id = channel_id
        self._fresh = True
        self.ready.clear()
        if server is None:
            self._server_set.clear()
        else:
            self._server_set.set()
        if self._link is not None:
            await self._link.close()

    async def close(self) -> None:
        """Leaves: closes the websocket and the socket, stops the player."""
        self._closing = True
        self._server_set.set()
        if self._link is not None:
            await self._link.close()
        for task in (self._run_task, self._tick_task):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self._teardown()

    async def wait_closed(self) -> None:
        """Returns once the session has ended."""
        if self._run_task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(self._run_task)

    # --- the connection loop ----------------------------------------------------------------

    async def _run(self) -> None:
        resume = False
        failures = 0
        try:
            while not self._closing:
                await self._server_set.wait()
                if self._closing:
                    break
                if self._fresh:
                    self._fresh, resume = False, False
                    failures = 0
                code, was_ready = await self._connect_once(resume)
                self.ready.clear()
                if self._closing:
                    break
                if self._fresh:
                    self.stats.reconnect("move")
                    continue
                if was_ready:
                    failures = 0
                if isinstance(code, int) and not _resumable(code) and code not in _IDENTIFY_AGAIN:
                    _log.warning("voice session ended by the server (close code %s)", code)
                    self.close_code = code
                    break
                resume = _resumable(code) and self._cipher is not None
                failures += 1
                if failures > self.options.max_reconnects:
                    _log.warning("voice connection lost; giving up after %s tries", failures - 1)
                    self.close_code = code
                    break
                await asyncio.sleep(0 if failures == 1 else min(0.25 * 2 ** (failures - 2), 5.0))
                self.stats.reconnect("resume" if resume else "identify")
        finally:
            await self._teardown()
            if self._on_end is not None and not self._closing:
                await self._on_end(self.close_code)

    async def _connect_once(self, resume: bool) -> tuple[int | None, bool]:
        """One websocket, from its opening to its close: the close code, and if it was ready."""
        server = self._server
        assert server is not None
        try:
            link = await VoiceLink.open(
                server.endpoint,
                ssl=self._ssl,
                timeout=self.options.connect_timeout_sec,
                seq_ack=self._link_seq if resume else -1,
            )
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            _log.warning("voice gateway unreachable: %s", exc)
            return None, False
        self._link = link
        try:
            if resume:
                await link.send(Op.RESUME, self._resume_data(server))
            else:
                self._forget_server()
                await link.send(Op.IDENTIFY, self._identify_data(server))
            await self._serve(link)
        except (aiohttp.ClientError, OSError, TimeoutError, _Retry) as exc:
            _log.warning("voice connection interrupted: %s", exc or type(exc).__name__)
        finally:
            self._link_seq = link.seq_ack
            was_ready = self.ready.is_set()
            await link.close()
            self._link = None
        return link.close_code, was_ready

    async def _serve(self, link: VoiceLink) -> None:
        deadline = asyncio.get_running_loop().time() + self.options.connect_timeout_sec
        while True:
            if self.ready.is_set():
                message = await link.receive()
            else:
                async with asyncio.timeout_at(deadline):
                    message = await link.receive()
            if message is None:
                return
            try:
                await self._dispatch(link, message)
            except (KeyError, TypeError, ValueError) as exc:
                _log.warning("malformed voice gateway message (op %s): %r", message.op, exc)

    def _identify_data(self, server: VoiceServer) -> dict[str, Any]:
        return {
            "server_id": str(self.guild_id),
            "user_id": str(self.user_id),
            "session_id": self.session_id,
            "token": server.token,
            "max_dave_protocol_version": davey.DAVE_PROTOCOL_VERSION,
        }

    def _resume_data(self, server: VoiceServer) -> dict[str, Any]:
        return {
            "server_id": str(self.guild_id),
            "session_id": self.session_id,
            "token": server.token,
            "seq_ack": self._link_seq,
        }

    def _forget_server(self) -> None:
        """Before identifying: nothing of the previous voice server carries over."""
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        self._cipher = self.receiver.cipher = None
        self.dave = self.receiver.dave = None
        self.receiver.clear()
        for user_id in self._members:
            self._sink.on_member(user_id, False)
        self._members.clear()

    # --- messages ---------------------------------------------------------------------------

    async def _dispatch(self, link: VoiceLink, message: Message) -> None:
        if Op.DAVE_PREPARE_TRANSITION <= message.op <= Op.DAVE_MLS_INVALID_COMMIT_WELCOME:
            if self.dave is not None:
                for reply in self.dave.handle(message.op, message.data):
                    await link.send(reply.op, reply.data)
            return
        handler = _HANDLERS.get(message.op)
        if handler is not None:
            await handler(self, link, message.data)

    async def _on_hello(self, link: VoiceLink, data: dict[str, Any]) -> None:
        link.start_heartbeat(float(data["heartbeat_interval"]))

    async def _on_resumed(self, link: VoiceLink, data: Any) -> None:
        self.ready.set()
        if self._talking:
            await self._announce_speaking(link)

    async def _on_speaking(self, link: VoiceLink, data: dict[str, Any]) -> None:
        if int(data["ssrc"]) != self.ssrc:
            self.receiver.map_ssrc(int(data["ssrc"]), int(data["user_id"]))

    async def _on_clients_connect(self, link: VoiceLink, data: dict[str, Any]) -> None:
        user_ids = [int(user) for user in data["user_ids"]]
        for user_id in user_ids:
            if user_id not in self._members:
                self._members.add(user_id)
                self._sink.on_member(user_id, True)
        if self.dave is not None:
            self.dave.add_members(user_ids)

    async def _on_client_disconnect(self, link: VoiceLink, data: dict[str, Any]) -> None:
        user_id = int(data["user_id"])
        self.receiver.forget_user(user_id)
        if self.dave is not None:
            self.dave.remove_member(user_id)
        if user_id in self._members:
            self._members.discard(user_id)
            self._sink.on_member(user_id, False)

    async def _on_ready(self, link: VoiceLink, data: dict[str, Any]) -> None:
        self.ssrc = int(data["ssrc"])
        offered = data["modes"]
        mode = next((m for m in ENCRYPTION_MODES if m in offered), None)
        if mode is None:
            raise _Retry(f"no supported encryption mode among {offered}")
        self._udp = await VoiceSocket.open(
            str(data["ip"]), int(data["port"]), self.receiver.on_datagram
        )
        address, port = await self._udp.discover(
            self.ssrc, timeout=self.options.connect_timeout_sec
        )
        await link.send(
            Op.SELECT_PROTOCOL,
            {"protocol": "udp", "data": {"address": address, "port": port, "mode": mode}},
        )

    async def _on_session_description(self, link: VoiceLink, data: dict[str, Any]) -> None:
        self.mode = str(data["mode"])
        self._cipher = self.receiver.cipher = TransportCipher(self.mode, bytes(data["secret_key"]))
        self.dave = self.receiver.dave = DaveState(
            user_id=self.user_id,
            channel_id=self.channel_id,
            protocol_version=int(data.get("dave_protocol_version") or 0),
        )
        self.dave.add_members(self._members)
        for reply in self.dave.start():
            await link.send(reply.op, reply.data)
        self.ready.set()
        if self._talking:
            await self._announce_speaking(link)

    # --- sending ----------------------------------------------------------------------------

    def _send_frame(self, opus: bytes, slot: float) -> None:
        """Sends one frame of the player: DAVE, RTP header, transport encryption, UDP."""
        if self._cipher is None or self._udp is None or not self.ready.is_set():
            self.stats.drop_outgoing("not_connected")
            return
        try:
            payload = self.dave.encrypt(opus) if self.dave is not None else opus
        except DaveError as exc:
            self.stats.drop_outgoing(str(exc))
            return
        if self._first_slot is None:
            self._first_slot = slot
        # The timestamp follows the clock, so a pause between talk spurts shows as a jump.
        frames = round((slot - self._first_slot) / FRAME_SECONDS)
        self._rtp_seq = (self._rtp_seq + 1) & 0xFFFF
        header = build_header(self._rtp_seq, self._rtp_base + frames * FRAME_SAMPLES, self.ssrc)
        self._udp.send(self._cipher.seal(header, payload))
        self.stats.sent += 1
        FRAMES_SENT.inc()

    def _frame_sent(self, slot: float, sent_at: float) -> None:
        self.stats.send_lateness.append(sent_at - slot)
        SEND_LATENESS_SECONDS.observe(max(0.0, sent_at - slot))

    async def _set_speaking(self, speaking: bool) -> None:
        self._talking = speaking
        if self._link is not None and self.ready.is_set():
            await self._announce_speaking(self._link)

    async def _announce_speaking(self, link: VoiceLink) -> None:
        flags = Speaking.MICROPHONE if self._talking else Speaking.NONE
        with contextlib.suppress(aiohttp.ClientError, ConnectionError):
            await link.send(Op.SPEAKING, {"speaking": int(flags), "delay": 0, "ssrc": self.ssrc})

    async def _teardown(self) -> None:
        await self.player.close()
        if self._tick_task is not None:
            self._tick_task.cancel()
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        self.ready.clear()


_HANDLERS: dict[int, Callable[[VoiceSession, VoiceLink, Any], Awaitable[None]]] = {
    Op.HELLO: VoiceSession._on_hello,
    Op.READY: VoiceSession._on_ready,
    Op.SESSION_DESCRIPTION: VoiceSession._on_session_description,
    Op.RESUMED: VoiceSession._on_resumed,
    Op.SPEAKING: VoiceSession._on_speaking,
    Op.CLIENTS_CONNECT: VoiceSession._on_clients_connect,
    Op.CLIENT_DISCONNECT: VoiceSession._on_client_disconnect,
}
