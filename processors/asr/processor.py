"""The asr processor: each ``voice.captured`` becomes one ``asr.transcribed``.

The transcript keeps the capture's ``speculative`` and ``reply`` flags and turn: admission
answers a speculative one only once ``voice.ended`` confirms its turn, and makes no turn of one
that was captured only to be transcribed. Silence and noise give a transcript
with empty text (``confidence`` 0): the event still says the utterance was heard, and the turns
processor makes no turn of it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator

from libra.contracts import CONSUMERS, AnyEvent, AsrTranscribed, AudioRef, VoiceCaptured, derive
from libra.runtime.audio import AudioStore, decode_audio, resample_pcm
from libra.runtime.config import ConfigError, Settings
from libra.runtime.metrics import VOICE_PROCESSING_SECONDS

from .base import AsrEngine, Transcript
from .chain import AsrChain
from .groq import GroqWhisperEngine
from .whisper import WhisperEngine

__all__ = ["AsrProcessor", "build_engines"]

log = logging.getLogger("libra.asr")


class AsrProcessor:
    """Transcribes each captured utterance through the engine chain."""

    spec = CONSUMERS["asr"]

    def __init__(self, audio: AudioStore, chain: AsrChain, *, language: str = "") -> None:
        self.audio = audio
        self.chain = chain
        self.language = language

    async def handle(self, event: AnyEvent) -> AsyncIterator[AsrTranscribed]:
        if not isinstance(event, VoiceCaptured):
            return
        started = time.perf_counter()
        pcm16k = _to_16k(await self.audio.get(event.audio), event.audio)
        if pcm16k:
            transcript, engine = await self.chain.transcribe(pcm16k, self.language or None)
            engine_name = engine.name
        else:
            transcript, engine_name = Transcript(text=""), "none"
        latency = time.perf_counter() - started
        VOICE_PROCESSING_SECONDS.labels("asr").observe(latency)
        yield derive(
            event,
            AsrTranscribed,
            key="asr",
            text=transcript.text,
            language=transcript.language if transcript.text else self.language,
            confidence=transcript.confidence if transcript.text else 0.0,
            engine=engine_name,
            audio_ms=event.audio.duration_ms,
            latency_ms=round(latency * 1000, 2),
            speculative=event.speculative,
            reply=event.reply,
            origin=event.origin,
        )


def _to_16k(data: bytes, ref: AudioRef) -> bytes:
    """Returns the clip as 16 kHz mono s16le, whatever it was stored as."""
    if ref.format == "pcm_s16le":
        return resample_pcm(
            data, rate=ref.sample_rate, channels=ref.channels, to_rate=16_000, to_channels=1
        )
    return decode_audio(data, to_rate=16_000) if data else b""


def build_engines(settings: Settings) -> list[AsrEngine]:
    """Returns the engines in ``ASR_ENGINES`` order (default: groq when keyed, then whisper)."""
    names = [n.strip() for n in settings.asr_engines.split(",") if n.strip()]
    if not names:
        names = ["groq", "whisper"] if settings.groq_api_key else ["whisper"]
    engines: list[AsrEngine] = []
    for name in names:
        if name == "whisper":
            engines.append(
                WhisperEngine(
                    settings.whisper_model,
                    device=settings.whisper_device,
                    compute_type=settings.whisper_compute_type,
                    beam_size=settings.whisper_beam_size,
                )
            )
        elif name == "groq":
            if not settings.groq_api_key:
                raise ConfigError("ASR_ENGINES names groq, but GROQ_API_KEY is not set")
            engines.append(
                GroqWhisperEngine(
                    api_key=settings.groq_api_key,
                    base_url=settings.groq_base_url,
                    model=settings.groq_whisper_model,
                    timeout_s=settings.asr_timeout_sec,
                )
            )
        else:
            raise ConfigError(f"ASR_ENGINES: unknown engine {name!r} (groq, whisper)")
    return engines
