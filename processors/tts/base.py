"""What every text-to-speech engine offers: text in, a stream of PCM out.

An engine is a thin wrapper over its vendor's SDK or API (Cartesia, ElevenLabs, Cloudflare
Workers AI) or over the local ``espeak-ng``. It yields mono s16le PCM at its ``sample_rate`` as
the audio arrives and raises on any failure; the chain (:mod:`libra.processors.tts.chain`) owns
timeouts, the fallback order and the conversion to what Discord plays (48 kHz stereo).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping
from typing import Protocol

__all__ = ["TtsEngine", "primary_language", "voice_for"]


class TtsEngine(Protocol):
    """A text-to-speech engine."""

    name: str
    sample_rate: int

    def voice(self, language: str) -> str:
        """Returns the voice this engine speaks ``language`` with."""
        ...

    def synthesize(self, text: str, *, voice: str, language: str) -> AsyncGenerator[bytes, None]:
        """Yields mono s16le PCM at ``sample_rate`` as it is produced."""
        ...


def primary_language(language: str) -> str:
    """Returns the language subtag of a tag: ``ko-KR`` → ``ko``, ``EN`` → ``en``."""
    return language.replace("_", "-").split("-", 1)[0].lower() or "en"


def voice_for(voices: Mapping[str, str], language: str, *, fallback: str = "en") -> str:
    """Returns the configured voice for ``language``, else the ``fallback`` language's one."""
    return voices.get(primary_language(language)) or voices.get(fallback, "")
