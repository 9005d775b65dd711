"""One voice websocket: messages both ways, sequence tracking and heartbeats with ``seq_ack``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl as ssl_module
import time
from typing import Any

import aiohttp

from .protocol import (
    GATEWAY_VERSION,
    Message,
    Op,
    decode_binary,
    decode_text,
    encode_binary,
    encode_text,
)

__all__ = ["VoiceLink", "gateway_url"]

_log = logging.getLogger(__name__)


def gateway_url(endpoint: str) -> str:
    """The websocket URL of a voice endpoint (``wss://host:port`` from hikari, or bare)."""
    url = endpoint if "://" in endpoint else f"wss://{endpoint}"
    base = url.split("?", 1)[0].rstrip("/")
    return f"{base}/?v={GATEWAY_VERSION}"


class VoiceLink:
    """A connected voice websocket.

    ``seq_ack`` is the last sequence number received; it starts from the previous link's when
    resuming, so that the server replays only what Libra missed.
    """

    def __init__(
        self, http: aiohttp.ClientSession, ws: aiohttp.ClientWebSocketResponse, seq_ack: int
    ) -> None:
        self._http = http
        self._ws = ws
        self.seq_ack = seq_ack
        self.close_code: int | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._awaiting_ack: int | None = None

    @classmethod
    async def open(
        cls,
        endpoint: str,
        *,
        ssl: ssl_module.SSLContext | None,
        timeout: float,
        seq_ack: int = -1,
    ) -> VoiceLink:
        """Opens the websocket; raises aiohttp.ClientError or TimeoutError."""
        # The timeout bounds reaching the server; the websocket itself lives as long as it may.
        http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, connect=timeout))
        try:
            ws = await http.ws_connect(
                gateway_url(endpoint),
                ssl=ssl if ssl is not None else True,
                timeout=aiohttp.ClientWSTimeout(ws_close=timeout),
                autoping=True,
                max_msg_size=0,
            )
        except BaseException:
            await http.close()
            raise
        return cls(http, ws, seq_ack)

    async def send(self, op: Op, data: dict[str, Any] | bytes) -> None:
        """Sends JSON data, or a binary payload for the DAVE MLS opcodes."""
        if isinstance(data, bytes):
            await self._ws.send_bytes(encode_binary(op, data))
        else:
            await self._ws.send_str(encode_text(op, data))

    async def receive(self) -> Message | None:
        """The next message; None once the websocket is closed (``close_code`` says why)."""
        while True:
            raw = await self._ws.receive()
            if raw.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING):
                self.close_code = raw.data if isinstance(raw.data, int) else self._ws.close_code
                return None
            if raw.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                self.close_code = self._ws.close_code
                return None
            try:
                if raw.type == aiohttp.WSMsgType.BINARY:
                    message = decode_binary(raw.data)
                else:
                    message = decode_text(raw.data)
            except ValueError:
                _log.warning("undecodable voice gateway message dropped")
                continue
            if message.seq is not None:
                self.seq_ack = message.seq
            if message.op == Op.HEARTBEAT_ACK:
                self._awaiting_ack = None
            return message

    def start_heartbeat(self, interval_ms: float) -> None:
        """Sends op 3 every interval; a heartbeat left unanswered closes the link as dead."""
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        self._heartbeat = asyncio.create_task(self._beat(interval_ms / 1000), name="voice-beat")

    async def _beat(self, interval: float) -> None:
        while True:
            if self._awaiting_ack is not None:
                _log.warning("voice heartbeat not acknowledged; reconnecting")
                await self._ws.close(code=4000)
                return
            nonce = int(time.time() * 1000)
            self._awaiting_ack = nonce
            try:
                await self.send(Op.HEARTBEAT, {"t": nonce, "seq_ack": self.seq_ack})
            except (aiohttp.ClientError, ConnectionError):
                return  # the reader sees the close and reconnects
            await asyncio.sleep(interval)

    async def close(self, code: int = 1000) -> None:
        """Closes the websocket and its HTTP session."""
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
        with contextlib.suppress(aiohttp.ClientError, ConnectionError, asyncio.TimeoutError):
            await self._ws.close(code=code)
        await self._http.close()
