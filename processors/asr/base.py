"""What every speech-to-text engine offers: one call, audio in, a transcript out.

An engine is a thin wrapper over its SDK (faster-whisper, the groq SDK). It gets 16 kHz mono
s16le PCM and an optional language hint, and returns a :class:`Transcript` whose text is empty
when the engine heard no speech. It raises on any failure; the chain
(:mod:`libra.processors.asr.chain`) owns timeouts and the fallback order.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Protocol

import msgspec

__all__ = ["NO_SPEECH_LOGPROB", "NO_SPEECH_PROB", "AsrEngine", "Transcript", "confidence"]

# Whisper's own rule for a segment that is not speech: the model says "no speech" with this
# probability and is unsure of the words it found. faster-whisper applies it internally; for
# Groq's verbose_json Libra applies it to the segments itself.
NO_SPEECH_PROB = 0.6
NO_SPEECH_LOGPROB = -1.0


class Transcript(msgspec.Struct, frozen=True, kw_only=True):
    """What an engine heard; ``text`` is empty for silence or noise."""

    text: str
    language: str = ""
    confidence: float = 0.0


class AsrEngine(Protocol):
    """A speech-to-text engine."""

    name: str

    async def transcribe(
        self, pcm16k: bytes, language_hint: str | None, *, prompt: str = ""
    ) -> Transcript:
        """Transcribes 16 kHz mono s16le PCM; ``language_hint`` is an ISO code or None;
        ``prompt`` the words said just before this audio."""
        ...


def confidence(segments: Iterable[tuple[float, float]]) -> float:
    """Returns the mean per-token probability of ``(avg_logprob, seconds)`` segments, 0 to 1."""
    total = weight = 0.0
    for logprob, seconds in segments:
        w = max(seconds, 0.01)
        total += math.exp(min(logprob, 0.0)) * w
        weight += w
    return round(total / weight, 4) if weight else 0.0
