"""Groq Whisper by API, through the official groq SDK (``audio.transcriptions``).

The audio goes up as a WAV file; ``verbose_json`` brings back the language and per-segment
no-speech probabilities, so silence is recognised the way faster-whisper recognises it. The SDK
reads ``GROQ_BASE_URL`` (a proxy, or a test's loopback fake); its own retries are off, since a
voice turn would rather fall back to the next engine than wait.
"""

from __future__ import annotations

from typing import Any

from groq import AsyncGroq

from libra.runtime.audio import wav_bytes

from .base import NO_SPEECH_LOGPROB, NO_SPEECH_PROB, Transcript, confidence
from .languages import language_code

__all__ = ["GroqWhisperEngine"]


class GroqWhisperEngine:
    """Transcribes with Groq's hosted Whisper."""

    name = "groq"

    def __init__(
        self, *, api_key: str, base_url: str = "", model: str, timeout_s: float = 15.0
    ) -> None:
        self.model = model
        self.client = AsyncGroq(
            api_key=api_key, base_url=base_url or None, timeout=timeout_s, max_retries=0
        )

    async def transcribe(
        self, pcm16k: bytes, language_hint: str | None, *, prompt: str = ""
    ) -> Transcript:
        options: dict[str, Any] = {"language": language_hint} if language_hint else {}
        if prompt:
            options["prompt"] = prompt
        result = await self.client.audio.transcriptions.create(
            file=("utterance.wav", wav_bytes(pcm16k, sample_rate=16_000)),
            model=self.model,
            response_format="verbose_json",
            temperature=0.0,
            **options,
        )
        data = result.model_dump()
        segments = data.get("segments")
        if segments is None:  # a plain json answer: no way to tell noise from words
            return Transcript(text=str(data.get("text", "")).strip(), language=language_hint or "")
        speech = [s for s in segments if not _silent(s)]
        return Transcript(
            text="".join(str(s.get("text", "")) for s in speech).strip(),
            language=language_code(str(data.get("language") or "")) or (language_hint or ""),
            confidence=confidence(
                (float(s.get("avg_logprob", 0.0)), float(s["end"]) - float(s["start"]))
                for s in speech
            ),
        )


def _silent(segment: dict[str, Any]) -> bool:
    return (
        float(segment.get("no_speech_prob", 0.0)) > NO_SPEECH_PROB
        and float(segment.get("avg_logprob", 0.0)) < NO_SPEECH_LOGPROB
    )
