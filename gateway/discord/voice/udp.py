"""The voice UDP socket: IP discovery, then RTP both ways."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Callable

__all__ = ["VoiceSocket"]

_DISCOVERY = struct.Struct(">HHI64sH")
_REQUEST, _RESPONSE = 0x1, 0x2


class VoiceSocket(asyncio.DatagramProtocol):
    """One UDP socket connected to the voice server; datagrams go to ``on_datagram``."""

    def __init__(self, on_datagram: Callable[[bytes], None]) -> None:
        self._on_datagram = on_datagram
        self._transport: asyncio.DatagramTransport | None = None
        self._discovery: asyncio.Future[tuple[str, int]] | None = None

    @classmethod
    async def open(cls, host: str, port: int, on_datagram: Callable[[bytes], None]) -> VoiceSocket:
        """Opens a socket connected to the voice server's address from Ready."""
        loop = asyncio.get_running_loop()
        _, protocol = await loop.create_datagram_endpoint(
            lambda: cls(on_datagram), remote_addr=(host, port)
        )
        return protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # A burst of 10 speakers must not overflow a small default buffer.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if self._discovery is not None and len(data) == _DISCOVERY.size:
            kind, _, _, address, port = _DISCOVERY.unpack(data)
            if kind == _RESPONSE and not self._discovery.done():
                ip = address.split(b"\0", 1)[0].decode("ascii", "replace")
                self._discovery.set_result((ip, port))
                return
        self._on_datagram(data)

    def error_received(self, exc: Exception) -> None:
        # ICMP port-unreachable and the like: UDP has no connection to lose, so carry on.
        pass

    async def discover(self, ssrc: int, *, timeout: float) -> tuple[str, int]:
        """IP discovery: asks the voice server which address and port it sees Libra at."""
        self._discovery = asyncio.get_running_loop().create_future()
        request = _DISCOVERY.pack(_REQUEST, 70, ssrc, b"", 0)
        try:
            async with asyncio.timeout(timeout):
                while True:
                    # UDP may lose the request or the answer: ask again until one comes back.
                    self.send(request)
                    done, _ = await asyncio.wait({self._discovery}, timeout=min(1.0, timeout))
                    if done:
                        return self._discovery.result()
        finally:
            self._discovery = None

    def send(self, packet: bytes) -> None:
        """Sends one datagram to the voice server (dropped silently once closed)."""
        if self._transport is not None and not self._transport.is_closing():
            self._transport.sendto(packet)

    def close(self) -> None:
        """Closes the socket."""
        if self._transport is not None:
            self._transport.close()
