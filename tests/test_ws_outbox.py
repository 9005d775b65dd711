"""A socket whose reader does not read: its speech is dropped oldest first, and past a limit
the socket is closed; control messages are never dropped. (A stand-in for Starlette's
WebSocket that never finishes a send: a real client's TCP buffers would take megabytes first.)"""

from __future__ import annotations

import asyncio

import pytest

from libra.gateway.http.ws import _MAX_AUDIO_QUEUED, _MAX_QUEUED, _Outbox, _TooSlow


class _Stuck:
    """A client that reads one message, then nothing more."""

    def __init__(self) -> None:
        self.sent: list[str | bytes] = []
        self.blocked = asyncio.Event()

    async def send_text(self, text: str) -> None:
        await self._send(text)

    async def send_bytes(self, data: bytes) -> None:
        await self._send(data)

    async def _send(self, item: str | bytes) -> None:
        if self.sent:
            self.blocked.set()
            await asyncio.Event().wait()  # never read
        self.sent.append(item)


async def test_a_reader_that_does_not_read_loses_old_speech_then_the_socket() -> None:
    ws = _Stuck()
    outbox = _Outbox(ws)  # type: ignore[arg-type]
    writer = asyncio.create_task(outbox.run())
    outbox.json({"type": "speaking", "turn": "t"})
    outbox.audio(b"\x01" * 960)  # the writer blocks on this one
    await ws.blocked.wait()
    frames = [bytes([n % 250 + 2]) * 960 for n in range(3 * _MAX_AUDIO_QUEUED // 960)]
    for frame in frames:  # three times what may wait: the oldest two thirds are dropped
        outbox.audio(frame)
    outbox.json({"type": "done", "turn": "t"})
    waiting = list(outbox._items)
    assert sum(len(i) for i in waiting if isinstance(i, bytes)) <= _MAX_AUDIO_QUEUED
    assert outbox.dropped >= len(frames) - _MAX_AUDIO_QUEUED // 960
    assert [i for i in waiting if isinstance(i, bytes)][-1] == frames[-1]  # the newest kept
    assert waiting[-1] == '{"type":"done","turn":"t"}'  # control is never dropped
    with pytest.raises(_TooSlow):
        for n in range(_MAX_QUEUED):
            outbox.json({"type": "delta", "content": str(n), "turn": "t"})
    writer.cancel()
