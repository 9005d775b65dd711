"""What the loopback fakes of the voice vendors share: a scripted aiohttp server that records.

Each fake (:mod:`.groq_whisper`, :mod:`.cartesia`, :mod:`.elevenlabs`, :mod:`.cloudflare`) answers
as its vendor's API does, so the real SDKs run their whole path against it. How it answers one
request is a :class:`Behaviour`: queued ones first (``fake.queue(a, b)``: the next request gets
``a``, the one after ``b``), then the standing one (``fake.reply``). Every request is recorded,
secret headers masked.

    async with FakeCartesia(reply=Behaviour.ok(ttfb=0.1)) as cartesia:
        cartesia.queue(Behaviour.rate_limited(), Behaviour.hang())
        settings = Settings.from_env({**cartesia.env(), "CARTESIA_API_KEY": "sk-test"})
"""

from __future__ import annotations

import asyncio
import functools
import io
import math
import time
from collections import deque
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import av
import msgspec
import numpy as np
from aiohttp import web

from .loopback import LoopbackServer

__all__ = ["Behaviour", "ReceivedRequest", "ScriptedFake", "mp3_bytes", "speech_like"]

Failure = Literal["", "hang", "garbage", "disconnect", "cut"]

_LONGEST_S = 20.0
_SECRET_HEADERS = frozenset(
    {"authorization", "x-api-key", "xi-api-key", "api-key", "proxy-authorization", "cookie"}
)


class Behaviour(msgspec.Struct, frozen=True, kw_only=True):
    """How a fake answers one request.

    ``ttfb`` seconds pass before the first byte. ``status`` >= 400 answers with the vendor's
    error body saying ``message`` (``retry_after`` becomes the Retry-After header). ``fail``:
    ``hang`` never answers (until the fake closes), ``garbage`` answers 200 with a body the SDK
    cannot read, ``disconnect`` drops the connection, ``cut`` drops it halfway through a
    streamed answer.
    """

    ttfb: float = 0.0
    status: int = 200
    retry_after: float | None = None
    message: str = "scripted failure"
    fail: Failure = ""

    @classmethod
    def ok(cls, *, ttfb: float = 0.0) -> Behaviour:
        """A good answer after ``ttfb`` seconds."""
        return cls(ttfb=ttfb)

    @classmethod
    def rate_limited(cls, retry_after: float | None = 1.0) -> Behaviour:
        """HTTP 429, with a Retry-After header unless ``retry_after`` is None."""
        return cls(status=429, retry_after=retry_after, message="rate limit exceeded")

    @classmethod
    def error(cls, status: int = 500, message: str = "scripted failure") -> Behaviour:
        """An HTTP error status with the vendor's error body."""
        return cls(status=status, message=message)

    @classmethod
    def hang(cls) -> Behaviour:
        """Never answers: the client's timeout has to fire."""
        return cls(fail="hang")

    @classmethod
    def garbage(cls) -> Behaviour:
        """Answers 200 with a body that is not what the API promises."""
        return cls(fail="garbage")

    @classmethod
    def disconnect(cls) -> Behaviour:
        """Closes the connection without an answer."""
        return cls(fail="disconnect")

    @classmethod
    def cut(cls) -> Behaviour:
        """Starts streaming the answer, then closes the connection halfway."""
        return cls(fail="cut")


class ReceivedRequest(msgspec.Struct, frozen=True, kw_only=True):
    """One request a fake received; secret headers read ``***``."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any = None
    at: float = 0.0


class ScriptedFake(LoopbackServer):
    """A vendor's API on 127.0.0.1 (an aiohttp server in this process's event loop).

    Subclasses name their ``routes`` and implement :meth:`answer` (a good answer),
    :meth:`error_body` (the vendor's error shape), :meth:`garbage` and :meth:`env`.
    """

    routes: ClassVar[tuple[tuple[str, str], ...]] = ()

    def __init__(
        self, *, host: str = "127.0.0.1", port: int = 0, reply: Behaviour | None = None
    ) -> None:
        super().__init__(host=host, port=port)
        self.reply = reply or Behaviour()
        self.requests: list[ReceivedRequest] = []
        self._queue: deque[Behaviour] = deque()

    def env(self) -> dict[str, str]:
        """Returns the settings that point Libra at this fake."""
        raise NotImplementedError

    def queue(self, *behaviours: Behaviour) -> None:
        """Answers the next requests with ``behaviours``, one each, in order."""
        self._queue.extend(behaviours)

    def add_routes(self, app: web.Application) -> None:
        for method, path in self.routes:
            app.router.add_route(method, path, self._dispatch)

    async def read_body(self, request: web.Request) -> Any:
        """Returns the request's body as the fake records it (JSON by default)."""
        raw = await request.read()
        try:
            return msgspec.json.decode(raw) if raw else None
        except msgspec.DecodeError:
            return raw.decode("utf-8", "replace")

    async def answer(self, request: web.Request, body: Any, cut: bool) -> web.StreamResponse:
        """The good answer to ``request`` (after the behaviour's ``ttfb``); with ``cut``, a
        streamed answer stops halfway (see :meth:`stream`)."""
        raise NotImplementedError

    async def stream(
        self, request: web.Request, response: web.StreamResponse, parts: list[bytes], cut: bool
    ) -> web.StreamResponse:
        """Writes ``parts`` one by one; with ``cut``, drops the connection after half of them."""
        await response.prepare(request)
        for i, part in enumerate(parts):
            if cut and i >= len(parts) // 2:
                await asyncio.sleep(0.05)  # let the first half reach the client
                if request.transport is not None:
                    request.transport.close()
                return response
            await response.write(part)
        await response.write_eof()
        return response

    def error_body(self, status: int, message: str) -> dict[str, Any]:
        """The vendor's JSON error body."""
        raise NotImplementedError

    def garbage(self) -> web.Response:
        """A 200 answer the SDK cannot make sense of."""
        return web.Response(text="<html><body>upstream is having a bad day</body></html>")

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        body = await self.read_body(request)
        self.requests.append(
            ReceivedRequest(
                method=request.method,
                path=request.path,
                query=dict(request.query),
                headers=_visible(request.headers),
                body=body,
                at=time.monotonic(),
            )
        )
        b = self._queue.popleft() if self._queue else self.reply
        if b.fail == "hang":
            await self._closing.wait()
            return web.Response(status=503)
        if b.fail == "disconnect":
            if request.transport is not None:
                request.transport.close()
            return web.Response(status=500)
        await asyncio.sleep(b.ttfb)
        if b.status >= 400:
            headers = {"Retry-After": f"{b.retry_after:g}"} if b.retry_after is not None else {}
            return web.json_response(
                self.error_body(b.status, b.message), status=b.status, headers=headers
            )
        if b.fail == "garbage":
            return self.garbage()
        return await self.answer(request, body, b.fail == "cut")


def speech_like(text: str, sample_rate: int, *, seconds_per_char: float = 0.06) -> bytes:
    """Returns s16le mono audio as long as ``text`` would take to say: a hummed tone."""
    seconds = min(max(len(text) * seconds_per_char, 0.3), _LONGEST_S)
    wave = _hum(sample_rate)[: int(seconds * sample_rate)].copy()
    fade = min(len(wave) // 2, sample_rate // 20)  # 50 ms in and out: no clicks
    ramp = np.linspace(0.0, 1.0, fade, dtype=np.float32)
    wave[:fade] *= ramp
    wave[len(wave) - fade :] *= ramp[::-1]
    return (wave * 32767).astype(np.int16).tobytes()


@functools.cache
def _hum(sample_rate: int) -> np.ndarray:
    # Made once per rate: a fake's own CPU time would otherwise count as the client's latency.
    t = np.arange(int(_LONGEST_S * sample_rate), dtype=np.float32) / sample_rate
    return (0.3 * np.sin(2 * math.pi * 220 * t) * (1 + 0.3 * np.sin(2 * math.pi * 3 * t))).astype(
        np.float32
    )


def mp3_bytes(pcm: bytes, sample_rate: int) -> bytes:
    """Encodes s16le mono PCM as MP3, as several TTS vendors answer."""
    out = io.BytesIO()
    with av.open(out, "w", format="mp3") as container:
        stream = container.add_stream("libmp3lame", rate=sample_rate, layout="mono")
        frame = av.AudioFrame.from_ndarray(
            np.frombuffer(pcm, np.int16).reshape(1, -1), format="s16", layout="mono"
        )
        frame.sample_rate = sample_rate
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    return out.getvalue()


def _visible(headers: Mapping[str, str]) -> dict[str, str]:
    return {
        name.lower(): "***" if name.lower() in _SECRET_HEADERS else value
        for name, value in headers.items()
    }
