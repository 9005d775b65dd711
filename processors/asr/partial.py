"""What the asr has heard of utterances still being spoken (``voice.partial``).

Each partial brings the next second of an utterance. The local whisper decodes the utterance so
far in the background: one decode per utterance at a time, always of the newest audio (pieces
that come meanwhile are heard by the next decode, never one by one). The words that end at least
``STABLE_MS`` before the end of the audio decoded will not change with more audio. When the
capture comes, only the audio after them is decoded, with them as the prompt, and the texts are
joined: the work at the pause is the last second or so, whatever the utterance's length.

A piece sent at the start of a pause (``pause``) is different: the utterance may end there, so
the whole of it so far is transcribed at once, as a capture would be. A capture whose speech
ends within that audio (``speech_ms``) takes that transcript instead of decoding again: at the
speculative cut, the transcript is ready or nearly so.

This lives in the process's memory only. A capture that finds nothing here (another instance
heard the partials, a restart, a redelivery, a missing piece) is decoded whole, so a transcript
never depends on it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass, field
from itertools import takewhile

import msgspec

from libra.runtime.metrics import VOICE_PROCESSING_SECONDS

from .base import Transcript, confidence
from .whisper import WhisperEngine, Word

__all__ = ["STABLE_MS", "Heard", "PartialTranscripts", "stable"]

log = logging.getLogger("libra.asr")

STABLE_MS = 500  # a word this far from the end of the audio heard is not revised by more audio
KEEP_S = 120.0  # an utterance that got no piece for this long is forgotten
MAX_UTTERANCES = 64
_BYTES_PER_MS = 32  # 16 kHz mono s16le


class Heard(msgspec.Struct, frozen=True, kw_only=True):
    """The start of an utterance, transcribed for good: its text and where it ends."""

    text: str
    until_ms: int
    confidence: float
    language: str = ""

    def then(self, tail: Transcript, tail_ms: int) -> Transcript:
        """Returns the whole utterance's transcript, this followed by ``tail``."""
        tail_ms = tail_ms if tail.text else 0
        mean = (self.confidence * self.until_ms + tail.confidence * tail_ms) / (
            self.until_ms + tail_ms
        )
        return Transcript(
            text=f"{self.text} {tail.text}".strip(),
            language=tail.language or self.language,
            confidence=round(mean, 4),
        )


def stable(words: list[Word], audio_ms: int, language: str = "") -> Heard | None:
    """Returns the words that end ``STABLE_MS`` before the end of the audio, or None."""
    kept = list(takewhile(lambda w: w.end_s * 1000 <= audio_ms - STABLE_MS, words))
    if not kept or kept[-1].end_s <= 0:
        return None
    return Heard(
        text="".join(w.text for w in kept).strip(),
        until_ms=round(kept[-1].end_s * 1000),
        confidence=confidence((math.log(max(w.probability, 1e-6)), 1.0) for w in kept),
        language=language,
    )


@dataclass
class _Utterance:
    pieces: dict[int, bytes] = field(default_factory=dict)  # offset (ms) -> 16 kHz PCM
    heard: Heard | None = None
    decoded: bytes = b""  # the audio that ``heard`` was heard in
    decoding: asyncio.Task[None] | None = None
    # the whole utterance as heard at its last pause: its audio, and the transcript of it
    at_pause: asyncio.Task[tuple[bytes, Transcript] | None] | None = None
    touched: float = field(default_factory=time.monotonic)

    def audio(self) -> bytes:
        """The pieces from the start that follow one another without a gap."""
        out: list[bytes] = []
        at = 0
        while (piece := self.pieces.get(at)) is not None and piece:
            out.append(piece)
            at += len(piece) // _BYTES_PER_MS
        return b"".join(out)


class PartialTranscripts:
    """Hears utterances while they are spoken, for the capture to decode only their tail."""

    def __init__(self, engine: WhisperEngine, *, language: str = "") -> None:
        self.engine = engine
        self.language = language
        self._utterances: dict[str, _Utterance] = {}

    def add(self, utterance: str, offset_ms: int, pcm16k: bytes, *, pause: bool = False) -> None:
        """Takes the piece of ``utterance`` at ``offset_ms``; decodes the newest audio soon (the
        whole utterance at once when the piece came at a pause)."""
        self._forget_old()
        state = self._utterances.pop(utterance, None) or _Utterance()
        self._utterances[utterance] = state  # the newest last
        state.pieces[offset_ms] = pcm16k
        state.touched = time.monotonic()
        if pause:
            if state.at_pause is not None:
                state.at_pause.cancel()  # an earlier pause's: the person went on talking
            state.at_pause = asyncio.create_task(self._whole(state.audio()))
        elif state.decoding is None or state.decoding.done():
            state.decoding = asyncio.create_task(self._decode(state))

    async def transcript(self, utterance: str, pcm16k: bytes, speech_ms: int) -> Transcript | None:
        """The transcript made at the utterance's last pause, when ``pcm16k`` (a capture) holds
        that audio and its speech ends within it; once that decode is done. Else None."""
        state = self._utterances.get(utterance)
        if state is None or state.at_pause is None or speech_ms <= 0:
            return None
        try:
            made = await asyncio.shield(state.at_pause)
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling():
                raise
            return None  # replaced by a later pause's, which is not this capture's
        if made is None:
            return None
        audio, transcript = made
        if len(audio) < speech_ms * _BYTES_PER_MS or not pcm16k.startswith(audio):
            return None
        return transcript

    async def _whole(self, audio: bytes) -> tuple[bytes, Transcript] | None:
        if not audio:
            return None
        started = time.perf_counter()
        try:
            transcript = await self.engine.transcribe(audio, self.language or None)
        except Exception as exc:  # the capture is decoded itself instead
            log.warning("asr: the decode at a pause failed: %s", exc)
            return None
        VOICE_PROCESSING_SECONDS.labels("asr_pause").observe(time.perf_counter() - started)
        return audio, transcript

    async def heard(self, utterance: str, pcm16k: bytes) -> Heard | None:
        """Returns the start of ``pcm16k`` heard for good, once the decode in flight is done."""
        state = self._utterances.get(utterance)
        if state is None:
            return None
        if state.decoding is not None:
            await asyncio.shield(state.decoding)
        heard = state.heard
        if heard is None or not pcm16k.startswith(state.decoded[: heard.until_ms * _BYTES_PER_MS]):
            return None  # not this audio's start: decode it whole
        return heard

    async def _decode(self, state: _Utterance) -> None:
        audio = state.audio()
        if len(audio) <= len(state.decoded):
            return
        started = time.perf_counter()
        try:
            words, language = await self.engine.words(audio, self.language or None)
        except Exception as exc:  # the capture is decoded whole instead
            log.warning("asr: a partial decode failed: %s", exc)
            return
        VOICE_PROCESSING_SECONDS.labels("asr_partial").observe(time.perf_counter() - started)
        state.heard = stable(words, len(audio) // _BYTES_PER_MS, language)
        state.decoded = audio
        if len(state.audio()) > len(audio):  # pieces came meanwhile: hear them too
            state.decoding = asyncio.create_task(self._decode(state))

    def _forget_old(self) -> None:
        now = time.monotonic()
        for key in list(self._utterances):
            state = self._utterances[key]
            old = now - state.touched > KEEP_S or len(self._utterances) > MAX_UTTERANCES
            if not old:
                break  # the rest are newer
            del self._utterances[key]
