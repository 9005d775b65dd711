"""ElevenLabs, streaming, through the official SDK (``text_to_speech.stream``).

Asks for raw 24 kHz PCM (``pcm_24000``, available on every plan); the chain resamples it to
48 kHz. The raw response is used for its headers: an answer that is not audio (an HTML error
page from a proxy) cannot be told from PCM by its bytes. ``language_code`` enforces the language
on the models that support it (Flash and Turbo v2.5). ``ELEVENLABS_BASE_URL`` points the SDK at
a proxy or a test's loopback fake.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any

from elevenlabs import AsyncElevenLabs

from .base import primary_language, voice_for

__all__ = ["ElevenLabsEngine"]

_SAMPLE_RATE = 24_000


class ElevenLabsEngine:
    """Speaks with ElevenLabs' streaming endpoint."""

    name = "elevenlabs"
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
        self.client = AsyncElevenLabs(api_key=api_key, base_url=base_url or None, timeout=timeout_s)

    def voice(self, language: str) -> str:
        return voice_for(self.voices, language)  # multilingual models speak it with any voice

    async def synthesize(self, text: str, *, voice: str, language: str) -> AsyncIterator[bytes]:
        options: dict[str, Any] = {}
        if "v2_5" in self.model:  # the models that accept a language to enforce
            options["language_code"] = primary_language(language)
        async with self.client.text_to_speech.with_raw_response.stream(
            voice,
            text=text,
            model_id=self.model,
            output_format="pcm_24000",
            request_options={"max_retries": 0},
            **options,
        ) as response:
            kind = response.headers.get("content-type", "")
            if kind.startswith(("text/", "application/json")):  # raw PCM cannot be checked later
                raise ValueError(f"ElevenLabs answered {kind!r} instead of audio")
            async for chunk in response.data:
                yield chunk
