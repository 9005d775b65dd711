"""The asr processor: each ``voice.captured`` becomes one ``asr.transcribed``.

The transcript keeps the capture's ``speculative`` and ``reply`` flags and turn: admission
answers a speculative one only once ``voice.ended`` confirms its turn, and makes no turn of one
that was captured only to be transcribed. Silence and noise give a transcript
with empty text (``confidence`` 0): the event still says the utterance was heard, and the turns
processor makes no turn of it.

With ``ASR_INCREMENTAL`` on and the local whisper first, ``voice.partial`` events are heard while
the person speaks (:mod:`.partial`), and a capture decodes only what came after the words heard
for good (``decoded_ms`` says how much); a partial itself never becomes an event. A partial sent
at a pause (``ASR_EARLY_MS``) is transcribed whole at once, and the capture cut at that pause
takes its transcript (``decoded_ms`` 0).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime

from libra.contracts import (
    CONSUMERS,
    AnyEvent,
    AsrTranscribed,
    AudioRef,
    VoiceCaptured,
    VoicePartial,
    derive,
)
from libra.processors.turns.language import detect_language
from libra.runtime.audio import AudioStore, decode_audio, resample_pcm
from libra.runtime.config import ConfigError, Settings
from libra.runtime.metrics import VOICE_PROCESSING_SECONDS

from .base import AsrEngine, Transcript
from .chain import AsrChain
from .groq import GroqWhisperEngine
from .partial import KEEP_S, PartialTranscripts
from .whisper import WhisperEngine

__all__ = ["AsrProcessor", "build_engines"]

log = logging.getLogger("libra.asr")


class AsrProcessor:
    """Transcribes each captured utterance through the engine chain."""

    spec = CONSUMERS["asr"]

    def __init__(
        self, audio: AudioStore, chain: AsrChain, *, language: str = "", partials: bool = False
    ) -> None:
        self.audio = audio
        self.chain = chain
        self.language = language
        local = chain.engines[0]  # partials are worth hearing only with a local model first
        self.partials = (
            PartialTranscripts(local, language=language)
            if partials and isinstance(local, WhisperEngine)
            else None
        )

    async def handle(self, event: AnyEvent) -> AsyncIterator[AsrTranscribed]:
        if isinstance(event, VoicePartial):
            await self._hear(event)
            return
        if not isinstance(event, VoiceCaptured):
            return
        started = time.perf_counter()
        pcm16k = _to_16k(await self.audio.get(event.audio), event.audio)
        transcript, engine_name, decoded = await self._transcribe(
            pcm16k, event.utterance, event.speech_ms
        )
        latency = time.perf_counter() - started
        VOICE_PROCESSING_SECONDS.labels("asr").observe(latency)
        yield derive(
            event,
            AsrTranscribed,
            key="asr",
            text=transcript.text,
            language=_language(transcript, self.language),
            confidence=transcript.confidence if transcript.text else 0.0,
            engine=engine_name,
            audio_ms=event.audio.duration_ms,
            latency_ms=round(latency * 1000, 2),
            speculative=event.speculative,
            reply=event.reply,
            decoded_ms=decoded * 1000 // _BYTES_PER_S,
            origin=event.origin,
        )

    async def _hear(self, partial: VoicePartial) -> None:
        """Passes a piece of an utterance being spoken on, unless it is stale (a backlog)."""
        if self.partials is None or (datetime.now(UTC) - partial.at).total_seconds() > KEEP_S:
            return
        pcm16k = _to_16k(await self.audio.get(partial.audio), partial.audio)
        self.partials.add(partial.utterance, partial.offset_ms, pcm16k, pause=partial.pause)

    async def _transcribe(
        self, pcm16k: bytes, utterance: str, speech_ms: int
    ) -> tuple[Transcript, str, int]:
        """Returns the transcript, the engine's name and how many bytes of audio it decoded
        (0: the transcript made at the pause was the capture's)."""
        if not pcm16k:
            return Transcript(text=""), "none", 0
        hint = self.language or None
        if self.partials is not None and utterance:
            made = await self.partials.transcript(utterance, pcm16k, speech_ms)
            if made is not None:
                return made, self.partials.engine.name, 0
        heard = await self.partials.heard(utterance, pcm16k) if self.partials else None
        if heard is None:
            transcript, engine = await self.chain.transcribe(pcm16k, hint)
            return transcript, engine.name, len(pcm16k)
        tail = pcm16k[heard.until_ms * _BYTES_PER_S // 1000 :]
        transcript, engine = await self.chain.transcribe(
            tail, hint or heard.language or None, prompt=heard.text
        )
        return heard.then(transcript, len(tail) * 1000 // _BYTES_PER_S), engine.name, len(tail)


_BYTES_PER_S = 32_000  # 16 kHz mono s16le


def _to_16k(data: bytes, ref: AudioRef) -> bytes:
    """Returns the clip as 16 kHz mono s16le, whatever it was stored as."""
    if ref.format == "pcm_s16le":
        return resample_pcm(
            data, rate=ref.sample_rate, channels=ref.channels, to_rate=16_000, to_channels=1
        )
    return decode_audio(data, to_rate=16_000) if data else b""


def build_engines(settings: Settings) -> list[AsrEngine]:
    """Returns the engines in ``ASR_ENGINES`` order (default: groq when keyed, then whisper)."""
    engines: list[AsrEngine] = []
    for name in settings.asr_order:
        if name == "whisper":
            engines.append(
                WhisperEngine(
                    settings.whisper_model,
                    device=settings.whisper_device,
                    compute_type=settings.whisper_compute_type,
                    beam_size=settings.whisper_beam_size,
                    nice=settings.local_model_nice,
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


def _language(transcript: Transcript, hint: str) -> str:
    """The language heard: the recogniser's, else (an English-only model names none) the one
    its words are written in, so that the transcript and its turn agree."""
    if not transcript.text:
        return hint
    return transcript.language or detect_language(transcript.text)
