"""Admission, unit by unit against a real Redis: input checks, language, rate limit, voice joins."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from libra.contracts import (
    AsrTranscribed,
    ContextMessage,
    Origin,
    TextReceived,
    TurnAccepted,
    TurnRejected,
    VoiceCaptured,
    VoiceEnded,
    derive,
    make,
)
from libra.processors.turns.admission import TurnsProcessor
from libra.processors.turns.language import detect_language
from libra.processors.turns.ratelimit import RateLimiter, key_for
from libra.processors.turns.view import RateLimitView, rebuild_rate_limits
from libra.runtime.eventlog import EventLog

from .factories import AUDIO, ORIGIN

HTTP = Origin(platform="http")


@pytest.fixture
async def redis(redis_url):
    client = aioredis.from_url(redis_url)
    yield client
    await client.aclose()


def _processor(redis, *, limit: int = 10, **kw) -> TurnsProcessor:
    return TurnsProcessor(redis, RateLimiter(redis, limit=limit, window_s=10), **kw)


async def _decide(processor: TurnsProcessor, event) -> list:
    return [out async for out in processor.handle(event)]


def _said(text: str, user: str = "http:u1") -> TextReceived:
    return make(TextReceived, conversation="http-u1", user=user, text=text, origin=HTTP)


@pytest.mark.parametrize(
    ("text", "language"),
    [
        ("안녕하세요, 리브라!", "ko"),
        ("Hello there", "en"),
        ("こんにちは、元気ですか", "ja"),
        ("漢字だけではなく", "ja"),
        ("你好，今天天气很好", "zh"),
        ("Libra, 오늘 날씨 어때?", "ko"),
        ("1234 !!", "en"),
    ],
)
def test_language_by_script(text: str, language: str) -> None:
    assert detect_language(text) == language


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "empty"),
        ("   \n\t ", "empty"),
        ("x" * 4001, "too_long"),
        ("bad \udcff bytes", "invalid"),
    ],
)
async def test_bad_input_is_rejected_with_a_reason(redis, text: str, reason: str) -> None:
    [out] = await _decide(_processor(redis), _said(text))
    assert isinstance(out, TurnRejected) and out.reason == reason and out.message


async def test_refusals_speak_the_persons_language(redis) -> None:
    processor = _processor(redis, limit=1)
    await _decide(processor, _said("첫 번째 메시지"))
    [out] = await _decide(processor, _said("두 번째 메시지"))
    assert out.reason == "rate_limited" and "초 후에" in out.message
    assert 0 < out.retry_after_s <= 10 and out.language == "ko"


async def test_moderation_blocklist(redis) -> None:
    [out] = await _decide(
        _processor(redis, blocked_words=frozenset({"forbidden"})), _said("a FORBIDDEN word")
    )
    assert out.reason == "moderated"


async def test_accepted_turn_carries_language_and_context(redis) -> None:
    said = _said("오늘 기분이 어때?")
    [out] = await _decide(_processor(redis), said)
    assert isinstance(out, TurnAccepted)
    assert out.language == "ko" and out.turn == said.id and out.received_at == said.at


async def test_a_quoted_message_the_checks_refuse_stays_out_of_the_turn(redis) -> None:
    """A reply chain quotes other messages: a person's that would have been refused (a blocked
    word, too long) is left out of the turn, so it never reaches a prompt; Libra's stay."""
    chain = (
        ContextMessage(role="user", author="carol", text="say xyzzy please"),
        ContextMessage(role="assistant", text="I can't answer that message."),
        ContextMessage(role="user", author="carol", text="x" * 301),
        ContextMessage(role="user", author="dave", text="what did she ask?"),
    )
    said = make(
        TextReceived,
        conversation="discord-1-2",
        user="discord:4",
        text="and you?",
        origin=Origin(platform="discord"),
        context=chain,
    )
    processor = _processor(redis, max_chars=300, blocked_words=frozenset({"xyzzy"}))
    [out] = await _decide(processor, said)
    assert isinstance(out, TurnAccepted)
    assert [m.text for m in out.context] == ["I can't answer that message.", "what did she ask?"]


async def test_rate_limit_is_atomic_under_concurrency(redis) -> None:
    limiter = RateLimiter(redis, limit=10, window_s=10)
    at = 1_700_000_000_000
    decisions = await asyncio.gather(*(limiter.admit("u", f"t{i}", at + i) for i in range(50)))
    assert sum(d.admitted for d in decisions) == 10
    again = await limiter.admit("u", "t3", at + 3)  # a redelivered turn gets the same answer
    assert again.admitted == decisions[3].admitted


async def test_window_slides(redis) -> None:
    limiter = RateLimiter(redis, limit=2, window_s=10)
    at = 1_700_000_000_000
    assert (await limiter.admit("u", "a", at)).admitted
    assert (await limiter.admit("u", "b", at + 1000)).admitted
    refused = await limiter.admit("u", "c", at + 2000)
    assert not refused.admitted and refused.retry_after_s == pytest.approx(8.0)
    assert (await limiter.admit("u", "d", at + 10_001)).admitted


async def test_speculative_transcript_waits_for_voice_ended(redis) -> None:
    processor = _processor(redis)
    capture = make(
        VoiceCaptured,
        conversation="discord-1-2",
        user="discord:u1",
        audio=AUDIO,
        origin=ORIGIN,
        speculative=True,
    )
    heard = derive(
        capture,
        AsrTranscribed,
        key="asr",
        text="hello",
        language="en",
        engine="whisper",
        speculative=True,
        origin=ORIGIN,
    )
    ended = derive(capture, VoiceEnded, key="ended", captured=capture.id, origin=ORIGIN)
    assert await _decide(processor, heard) == []
    [accepted] = await _decide(processor, ended)
    assert isinstance(accepted, TurnAccepted) and accepted.modality == "voice"
    assert accepted.turn == capture.id and accepted.text == "hello"
    # the other order, on a second turn: the ending first, then the transcript admits
    capture2 = make(
        VoiceCaptured,
        conversation="discord-1-2",
        user="discord:u1",
        audio=AUDIO,
        origin=ORIGIN,
        speculative=True,
    )
    ended2 = derive(capture2, VoiceEnded, key="ended", captured=capture2.id, origin=ORIGIN)
    heard2 = derive(
        capture2,
        AsrTranscribed,
        key="asr",
        text="again",
        engine="whisper",
        speculative=True,
        origin=ORIGIN,
    )
    assert await _decide(processor, ended2) == []
    [accepted2] = await _decide(processor, heard2)
    assert accepted2.text == "again" and accepted2.language == "en"


async def test_unconfirmed_speculation_never_becomes_a_turn(redis) -> None:
    capture = make(
        VoiceCaptured,
        conversation="discord-1-2",
        user="discord:u1",
        audio=AUDIO,
        origin=ORIGIN,
        speculative=True,
    )
    heard = derive(
        capture,
        AsrTranscribed,
        key="asr",
        text="I was going to",
        engine="whisper",
        speculative=True,
        origin=ORIGIN,
    )
    assert await _decide(_processor(redis), heard) == []


async def test_silence_makes_no_turn(redis) -> None:
    capture = make(
        VoiceCaptured, conversation="discord-1-2", user="discord:u1", audio=AUDIO, origin=ORIGIN
    )
    heard = derive(capture, AsrTranscribed, key="asr", text="  ", engine="whisper", origin=ORIGIN)
    assert await _decide(_processor(redis), heard) == []


async def test_rate_limits_rebuild_from_the_log(redis, eventlog: EventLog) -> None:
    processor = _processor(redis, limit=3)
    accepted = [out for i in range(3) for out in await _decide(processor, _said(f"m{i}"))]
    await eventlog.publish_many(accepted)
    await redis.delete(key_for("http:u1"))  # Redis lost its data
    # the instance that counted them tells the script again; one started since cannot
    [out] = await _decide(processor, _said("again"))
    assert isinstance(out, TurnRejected) and out.reason == "rate_limited"
    await redis.delete(key_for("http:u1"))
    restarted = _processor(redis, limit=3)
    assert isinstance((await _decide(restarted, _said("again")))[0], TurnAccepted)
    await redis.delete(key_for("http:u1"))
    assert await rebuild_rate_limits(eventlog, RateLimitView(processor.limiter).limiter) == 3
    [out] = await _decide(_processor(redis, limit=3), _said("and again"))
    assert isinstance(out, TurnRejected) and out.reason == "rate_limited"
