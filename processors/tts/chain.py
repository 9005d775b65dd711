"""The text-to-speech fallback order, with time limits, producing audio ready for Discord.

A sentence walks the engines in order; the first to start delivering audio speaks it, and its
audio streams on as it arrives. The wait for an engine's first chunk, and between its chunks,
is bounded by ``TTS_TIMEOUT_SEC``. An engine that failed in the last ``cooldown_s`` seconds
moves to the back of the order, so a vendor that is down costs one timeout, not one per
sentence. The audio comes out as 48 kHz stereo s16le PCM, what Discord plays (the gateway
encodes it to Opus frames of 20 ms).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence

import av
import msgspec
import numpy as np
from prometheus_client import Counter

from .base import TtsEngine

__all__ = [
    "DISCORD_CHANNELS",
    "DISCORD_RATE",
    "TTS_REQUESTS",
    "AllEnginesFailed",
    "Audio",
    "SpeechInterrupted",
    "TtsChain",
]

log = logging.getLogger("libra.tts")

DISCORD_RATE = 48_000
DISCORD_CHANNELS = 2

TTS_REQUESTS = Counter(
    "libra_tts_requests_total",
    "Sentences synthesized, by engine and outcome",
    ["engine", "outcome"],
)


class Audio(msgspec.Struct, frozen=True, kw_only=True):
    """A piece of a sentence's audio as it streams: 48 kHz stereo s16le, and who made it."""

    pcm: bytes
    engine: str
    voice: str
    ttfb_ms: float


class AllEnginesFailed(RuntimeError):
    """Every engine in the order failed before the sentence's first audio."""


class SpeechInterrupted(RuntimeError):
    """The engine failed after some of the sentence's audio had gone out."""


class TtsChain:
    """Speaks a sentence with the first engine that starts answering in time."""

    def __init__(
        self, engines: Sequence[TtsEngine], *, timeout_s: float, cooldown_s: float = 30.0
    ) -> None:
        if not engines:
            raise ValueError("at least one TTS engine is needed")
        self.engines = tuple(engines)
        self.timeout_s = timeout_s
        self.cooldown_s = cooldown_s
        self._failed_at: dict[str, float] = {}

    def order(self) -> list[TtsEngine]:
        """Returns the engines in the order to try now: recently failed ones last."""
        now = time.monotonic()
        return sorted(
            self.engines,
            key=lambda e: now - self._failed_at.get(e.name, -self.cooldown_s) < self.cooldown_s,
        )

    async def stream(self, text: str, language: str) -> AsyncIterator[Audio]:
        """Yields ``text`` spoken in ``language``, piece by piece as the engine delivers it.

        Raises AllEnginesFailed when no engine starts; once audio has been yielded the sentence
        belongs to its engine, and a failure raises SpeechInterrupted (its start was heard:
        starting over elsewhere would say it twice).
        """
        errors: list[str] = []
        for engine in self.order():
            voice = engine.voice(language)
            started = time.perf_counter()
            stream = engine.synthesize(text, voice=voice, language=language)
            pieces = _Converter(engine.sample_rate)
            try:
                first = await self._first_audio(stream, pieces)
            except Exception as exc:  # any failure before audio: the next engine may speak it
                await stream.aclose()
                errors.append(self._failed(engine, exc))
                continue
            ttfb_ms = round((time.perf_counter() - started) * 1000, 2)
            try:
                yield Audio(pcm=first, engine=engine.name, voice=voice, ttfb_ms=ttfb_ms)
                while (pcm := await self._next_audio(stream, pieces)) is not None:
                    if pcm:
                        yield Audio(pcm=pcm, engine=engine.name, voice=voice, ttfb_ms=ttfb_ms)
                if tail := pieces.flush():
                    yield Audio(pcm=tail, engine=engine.name, voice=voice, ttfb_ms=ttfb_ms)
            except Exception as exc:
                raise SpeechInterrupted(self._failed(engine, exc)) from exc
            finally:
                await stream.aclose()  # a stream left early must let go of its connection
            self._failed_at.pop(engine.name, None)
            TTS_REQUESTS.labels(engine.name, "ok").inc()
            return
        raise AllEnginesFailed("; ".join(errors) or "no engine")

    async def _first_audio(self, stream: AsyncGenerator[bytes, None], pieces: _Converter) -> bytes:
        while (pcm := await self._next_audio(stream, pieces)) is not None:
            if pcm:
                return pcm
        raise ValueError("the engine answered without audio")

    async def _next_audio(
        self, stream: AsyncGenerator[bytes, None], pieces: _Converter
    ) -> bytes | None:
        """The next chunk, converted ("" while too short to convert); None at the end."""
        async with asyncio.timeout(self.timeout_s):
            try:
                chunk = await anext(stream)
            except StopAsyncIteration:
                return None
        return pieces(chunk)

    def _failed(self, engine: TtsEngine, exc: Exception) -> str:
        kind = "timeout" if isinstance(exc, TimeoutError) else type(exc).__name__
        self._failed_at[engine.name] = time.monotonic()
        TTS_REQUESTS.labels(engine.name, kind).inc()
        error = f"{engine.name}: {kind}: {exc}"[:300]
        log.warning("tts engine %s failed: %s", engine.name, error)
        return error


class _Converter:
    """Turns an engine's mono s16le chunks into 48 kHz stereo, across chunk boundaries."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self._odd = b""
        self._resampler = (
            None
            if rate == DISCORD_RATE
            else av.AudioResampler(format="s16", layout="stereo", rate=DISCORD_RATE)
        )

    def __call__(self, chunk: bytes) -> bytes:
        chunk, self._odd = self._odd + chunk, b""
        if len(chunk) % 2:  # half a sample: keep it for the next chunk
            chunk, self._odd = chunk[:-1], chunk[-1:]
        if not chunk:
            return b""
        samples = np.frombuffer(chunk, np.int16)
        if self._resampler is None:
            return np.repeat(samples, 2).tobytes()
        frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = self.rate
        return b"".join(f.to_ndarray().tobytes() for f in self._resampler.resample(frame))

    def flush(self) -> bytes:
        """Returns the samples the resampler still holds, at the end of the stream."""
        if self._resampler is None:
            return b""
        return b"".join(f.to_ndarray().tobytes() for f in self._resampler.resample(None))
