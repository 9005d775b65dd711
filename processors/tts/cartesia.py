"""Cartesia Sonic, streaming, through the official SDK.

Uses the SSE endpoint (``tts.generate_sse``): it streams raw PCM as it is generated, asked for
here as 48 kHz s16le, Discord's own rate, so nothing needs resampling. The SDK's retries are
off (a voice reply falls back to the next engine rather than wait); ``CARTESIA_BASE_URL``
points it at a proxy or a test's loopback fake.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping

from cartesia import AsyncCartesia

from .base import primary_language, voice_for

__all__ = ["CartesiaEngine"]

_SAMPLE_RATE = 48_000


class CartesiaError(RuntimeError):
    """Cartesia reported an error inside the stream."""


class CartesiaEngine:
    """Speaks with Cartesia's streaming API."""

    name = "cartesia"
    sample_rate = _SAMPLE_RATE

    def __init__(
        self,
        *,
        api_key: str,
        base_url: str = "",
        model: str,
        voices: Mapping[str, str],
        timeout_s: float = 10.0,
    ) -> None:
        self.model = model
        self.voices = dict(voices)
        self.client = AsyncCartesia(
            api_key=api_key, base_url=base_url or None, timeout=timeout_s, max_retries=0
        )

    def voice(self, language: str) -> str:
        return voice_for(self.voices, language)  # Sonic voices speak every language it knows

    async def synthesize(self, text: str, *, voice: str, language: str) -> AsyncIterator[bytes]:
        stream = await self.client.tts.generate_sse(
            model_id=self.model,
            transcript=text,
            voice=voice,
            language=primary_language(language),
            output_format={"container": "raw", "encoding": "pcm_s16le", "sample_rate": 48_000},
        )
        async with stream:
            # Read to the end, past the ``done`` event: a response left unread closes its
            # connection, and the next sentence would pay for a new one (TLS included).
            async for event in stream:
                if event.type == "chunk":
                    if event.audio:
                        yield event.audio
                elif event.type == "error":
                    raise CartesiaError(f"{event.status_code} {event.title}: {event.message}")
