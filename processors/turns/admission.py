"""Admission: each person's input becomes an accepted or a rejected turn.

Text is admitted when it arrives; a transcript when it arrives, unless it is speculative (cut
at the first short pause). A speculative transcript waits until ``voice.ended`` confirms the end
of the turn; transcript and confirmation meet in Redis, whichever comes second admitting the
turn, and after a ``voice.resumed`` (the person went on talking) it never will be.

With ``speculate``, a speculative transcript that passes the input checks is answered at once,
before the end of the turn is known: ``turn.accepted`` with ``speculative`` set, which the llm
starts writing and the tts starts speaking into a buffer. ``voice.ended`` then makes it
``turn.confirmed``, or ``turn.rejected`` when the rate limit refuses it (the limit counts a turn
only now, so a speculation that never became a turn costs the person nothing);
``voice.resumed`` makes it ``turn.abandoned``. In whatever order the three come, one Lua script
decides each turn's course once, for every instance of the processor.
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
    TurnAbandoned,
    TurnAccepted,
    TurnConfirmed,
    TurnRejected,
    VoiceEnded,
    VoiceResumed,
    derive,
)

from .language import detect_language
from .messages import refusal
from .ratelimit import RateLimiter

__all__ = ["TurnsProcessor"]

# KEYS[1] the turn's join hash; ARGV: field (transcript|ended|resumed), value, ttl (s) and, for
# a transcript, whether it may be answered before the end of the turn (1|0). Returns what to do
# with the transcript (start, admit, confirm, abandon) and the transcript, or nothing.
_JOIN = """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
local transcript, ended, resumed, started = unpack(
  redis.call('HMGET', KEYS[1], 'transcript', 'ended', 'resumed', 'started'))
if ARGV[1] == 'transcript' then
  if started then return {'start', transcript} end
  if ended then return {'admit', transcript} end
  if not resumed and ARGV[4] == '1' then
    redis.call('HSET', KEYS[1], 'started', '1')
    return {'start', transcript}
  end
elseif ARGV[1] == 'ended' and transcript then
  if started then return {'confirm', transcript} end
  return {'admit', transcript}
elseif ARGV[1] == 'resumed' and started then
  return {'abandon', transcript}
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
        speculate: bool = False,
    ) -> None:
        self.limiter = limiter
        self.max_chars = max_chars
        self.blocked_words = blocked_words
        self.speculate = speculate
        self._join = redis.register_script(_JOIN)

    async def handle(self, event: AnyEvent) -> AsyncIterator[Event]:
        match event:
            case AsrTranscribed(reply=False):
                return  # transcribed for the speech-to-text API only: not a turn
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
                early = self.speculate and self._refusal(event.text) is None
                if (out := await self._meet(event, "transcript", early)) is not None:
                    yield out
            case VoiceEnded():
                if (out := await self._meet(event, "ended")) is not None:
                    yield out
            case VoiceResumed():
                if (out := await self._meet(event, "resumed")) is not None:
                    yield out

    async def _meet(self, event: AnyEvent, field: str, early: bool = False) -> Event | None:
        """Notes one part of a speculative voice turn; returns what the parts so far decide."""
        value = msgspec.json.encode(event) if field == "transcript" else event.id.encode()
        decided = await self._join(
            keys=[f"libra:turn-join:{event.turn}"], args=[field, value, _JOIN_TTL_S, int(early)]
        )
        if not decided:
            return None
        transcript = msgspec.json.decode(decided[1], type=AsrTranscribed)
        language = transcript.language or detect_language(transcript.text)
        match decided[0].decode():
            case "start":
                return self._accepted(transcript, "voice", language, speculative=True)
            case "admit":
                return await self._admit(
                    transcript,
                    transcript.text,
                    transcript.origin,
                    modality="voice",
                    language=language,
                )
            case "confirm":
                return await self._confirm(event, transcript, language)
        return derive(event, TurnAbandoned, key="turn", origin=transcript.origin)

    async def _confirm(self, ended: AnyEvent, transcript: AsrTranscribed, language: str) -> Event:
        """The end of a turn answered early: only the rate limit is left to decide."""
        decision = await self.limiter.admit(transcript.user, transcript.turn, _ms(transcript.at))
        if not decision.admitted:
            return self._rejected(
                ended,
                "rate_limited",
                language,
                "voice",
                transcript.origin,
                retry_after_s=decision.retry_after_s,
            )
        return derive(
            ended, TurnConfirmed, key="turn", received_at=transcript.at, origin=transcript.origin
        )

    def _refusal(self, text: str, *, has_files: bool = False) -> tuple[str, dict] | None:
        """The input checks: the reason to refuse ``text`` and its details, or None."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates: what is left of bytes that were not UTF-8
            return "invalid", {}
        if not text.strip() and not has_files:
            return "empty", {}
        if len(text) > self.max_chars:
            return "too_long", {"length": len(text), "limit": self.max_chars}
        if self.blocked_words and self.blocked_words & set(text.lower().split()):
            return "moderated", {}
        return None

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
        refused = self._refusal(text, has_files=has_files)
        if refused is not None:
            reason, detail = refused
            return self._rejected(event, reason, language, modality, origin, **detail)
        decision = await self.limiter.admit(event.user, event.turn or event.id, _ms(event.at))
        if not decision.admitted:
            return self._rejected(
                event,
                "rate_limited",
                language,
                modality,
                origin,
                retry_after_s=decision.retry_after_s,
            )
        return self._accepted(event, modality, language, text=text, origin=origin)

    def _accepted(
        self,
        event: TextReceived | AsrTranscribed,
        modality: str,
        language: str,
        *,
        text: str | None = None,
        origin: Origin | None = None,
        speculative: bool = False,
    ) -> TurnAccepted:
        return derive(
            event,
            TurnAccepted,
            key="turn",
            text=(event.text if text is None else text).strip(),
            language=language,
            modality=modality,
            origin=origin or event.origin,
            received_at=event.at,
            attachments=getattr(event, "attachments", ()),
            context=getattr(event, "context", ()),
            speculative=speculative,
        )

    @staticmethod
    def _rejected(
        event: AnyEvent,
        reason: str,
        language: str,
        modality: str,
        origin: Origin,
        **detail: float,
    ) -> TurnRejected:
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
