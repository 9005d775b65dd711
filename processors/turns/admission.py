"""Admission: each person's input becomes an accepted or a rejected turn.

Text is admitted when it arrives; a transcript when it arrives, unless it is speculative (cut
at the first short pause), in which case it waits until ``voice.ended`` confirms the end of the
turn. Transcript and confirmation meet in Redis, whichever comes second admitting the turn.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime

import msgspec
import redis.asyncio as aioredis

from libra.contracts import (
    CONSUMERS,
    AnyEvent,
    AsrTranscribed,
    Event,
    Origin,
    TextReceived,
    TurnAccepted,
    TurnRejected,
    VoiceEnded,
    derive,
)

from .language import detect_language
from .messages import refusal
from .ratelimit import RateLimiter

__all__ = ["TurnsProcessor"]

# KEYS[1] the turn's join hash; ARGV: field (transcript|ended), value, ttl (s)
_JOIN = """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
local heard = redis.call('HEXISTS', KEYS[1], 'transcript') == 1
if heard and redis.call('HEXISTS', KEYS[1], 'ended') == 1 then
  return redis.call('HGET', KEYS[1], 'transcript')
end
return false
"""
_JOIN_TTL_S = 300


def _ms(at: datetime) -> int:
    return int(at.timestamp() * 1000)


class TurnsProcessor:
    """Admits text and transcripts: input checks, per-user rate limit, language."""

    spec = CONSUMERS["turns"]

    def __init__(
        self,
        redis: aioredis.Redis,
        limiter: RateLimiter,
        *,
        max_chars: int = 4000,
        blocked_words: frozenset[str] = frozenset(),
    ) -> None:
        self.limiter = limiter
        self.max_chars = max_chars
        self.blocked_words = blocked_words
        self._join = redis.register_script(_JOIN)

    async def handle(self, event: AnyEvent) -> AsyncIterator[Event]:
        match event:
            case TextReceived():
                yield await self._admit(
                    event,
                    event.text,
                    event.origin,
                    modality="text",
                    language=detect_language(event.text),
                    has_files=bool(event.attachments),
                )
            case AsrTranscribed(speculative=False) if event.text.strip():
                yield await self._admit(
                    event,
                    event.text,
                    event.origin,
                    modality="voice",
                    language=event.language or detect_language(event.text),
                )
            case AsrTranscribed(speculative=True) if event.text.strip():
                transcript = await self._meet(event.turn, "transcript", msgspec.json.encode(event))
                if transcript is not None:
                    yield await self._admit_transcript(transcript)
            case VoiceEnded():
                transcript = await self._meet(event.turn, "ended", event.id.encode())
                if transcript is not None:
                    yield await self._admit_transcript(transcript)

    async def _meet(self, turn: str, field: str, value: bytes) -> bytes | None:
        return await self._join(keys=[f"libra:turn-join:{turn}"], args=[field, value, _JOIN_TTL_S])

    async def _admit_transcript(self, raw: bytes) -> Event:
        transcript = msgspec.json.decode(raw, type=AsrTranscribed)
        return await self._admit(
            transcript,
            transcript.text,
            transcript.origin,
            modality="voice",
            language=transcript.language or detect_language(transcript.text),
        )

    async def _admit(
        self,
        event: TextReceived | AsrTranscribed,
        text: str,
        origin: Origin,
        *,
        modality: str,
        language: str,
        has_files: bool = False,
    ) -> Event:
        def reject(reason: str, **detail: float) -> TurnRejected:
            return derive(
                event,
                TurnRejected,
                key="turn",
                reason=reason,
                language=language,
                modality=modality,
                origin=origin,
                retry_after_s=detail.get("retry_after_s"),
                message=refusal(reason, language, **detail),
            )

        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates: what is left of bytes that were not UTF-8
            return reject("invalid")
        if not text.strip() and not has_files:
            return reject("empty")
        if len(text) > self.max_chars:
            return reject("too_long", length=len(text), limit=self.max_chars)
        if self.blocked_words and self.blocked_words & set(text.lower().split()):
            return reject("moderated")
        decision = await self.limiter.admit(event.user, event.turn or event.id, _ms(event.at))
        if not decision.admitted:
            return reject("rate_limited", retry_after_s=decision.retry_after_s)
        return derive(
            event,
            TurnAccepted,
            key="turn",
            text=text.strip(),
            language=language,
            modality=modality,
            origin=origin,
            received_at=event.at,
            attachments=getattr(event, "attachments", ()),
            context=getattr(event, "context", ()),
        )
