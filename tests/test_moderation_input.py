"""Moderation of what people say: admission asks the classifier (the openai SDK against the
loopback fake of ``/v1/moderations``) after the input checks and the rate limit.

A flagged message is a ``turn.rejected`` (``moderated``) naming its categories, a 422 over HTTP
with a short reason in the person's language, and stays out of history and prompts; a clean one
is admitted. Either way the decision (engine, scores, latency) is in the event and in the turns
table. A speculative voice transcript is moderated once, however its turn goes on.
"""

from __future__ import annotations

import json

import asyncpg
import httpx
import pytest
import redis.asyncio as aioredis
from click.testing import CliRunner

from libra.contracts import TurnAccepted, TurnConfirmed, TurnRejected
from libra.ops.cli import main
from libra.ops.fakes.llm_wire import MODERATIONS, OPENAI_CHAT, Behaviour, FakeLlmWire
from libra.processors.moderation.chain import Moderator
from libra.processors.moderation.openai import OpenAIModeration
from libra.processors.turns.admission import TurnsProcessor
from libra.processors.turns.ratelimit import RateLimiter
from libra.runtime.eventlog import EventLog

from .helpers import eventually, stream_events, wait_http
from .stack import TEXT_PIPELINE, answering_with, running
from .test_voice_speculation import _decide, _utterance

REPLY = "Noted."
FLAGGED = "I will stab the neighbour tonight FLAGMARK"  # 'stab': violence, harassment
CLEAN = "What is a good name for a cat?"


@pytest.fixture
async def redis(redis_url):
    client = aioredis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
async def wire():
    async with FakeLlmWire(reply=Behaviour.ok(REPLY), moderation_latency=0.02) as fake:
        yield fake


async def _decisions(log: EventLog, user: str) -> list:
    events = await stream_events(log.js, "LIBRA", "libra.turn.*.>")
    return [e for e in events if isinstance(e, TurnAccepted | TurnRejected) and e.user == user]


async def test_a_flagged_message_is_refused_with_its_categories(
    settings, eventlog, pool: asyncpg.Pool, wire: FakeLlmWire
) -> None:
    s = answering_with(settings, wire, MODERATION_ENGINES="openai")
    async with running(s, [*TEXT_PIPELINE, "http"]):
        await wait_http(s.http_port)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{s.http_port}", timeout=20) as h:

            async def say(message: str, user: str = "alice") -> httpx.Response:
                body = {"userId": user, "message": message}
                return await h.post("/api/chat/completions", json=body)

            refused = await say(FLAGGED)
            assert refused.status_code == 422, refused.text
            body = refused.json()
            assert body["error"] == "moderated"
            assert body["categories"] == ["harassment", "violence"]
            assert "harassment and violence" in body["message"]
            assert "FLAGMARK" not in refused.text
            assert (await say(CLEAN)).status_code == 200
            korean = await say("그 사람을 stab 할 거예요", user="minji")
            assert korean.status_code == 422
            assert korean.json()["message"] == "그 메시지에는 답할 수 없어요 (사유: 괴롭힘, 폭력)."
            history = (await h.get("/api/chat/history/alice")).text
        await eventually(lambda: _two(eventlog, "http:alice"), timeout=15)
        rejected, accepted = await _decisions(eventlog, "http:alice")
        asked = [c.body["input"] for c in wire.calls(MODERATIONS)]
        said = [FLAGGED, CLEAN, "그 사람을 stab 할 거예요"]
        # each message once (no retries, no second opinion); the rest are the reply's checks
        assert sorted(t for t in asked if t in said) == sorted(said)
        prompt = str(wire.calls(OPENAI_CHAT)[-1].messages)
        assert CLEAN in prompt and "FLAGMARK" not in prompt and "FLAGMARK" not in history

        assert rejected.reason == "moderated" and rejected.moderation is not None
        m = rejected.moderation
        assert (m.engine, m.flagged, m.categories) == ("openai", True, ("harassment", "violence"))
        assert m.scores["violence"] == pytest.approx(0.9) and m.scores["sexual"] < 0.01
        assert m.latency_ms >= 20  # the fake answers after 20 ms
        a = accepted.moderation
        assert a is not None and (a.engine, a.flagged, a.categories) == ("openai", False, ())

        await eventually(lambda: _rows(pool), timeout=15)
        rows = await _rows(pool)
        assert rows[rejected.turn][:2] == ("openai", ["harassment", "violence"])
        assert rows[accepted.turn][:2] == ("openai", [])
        assert all(ms >= 20 for _, _, ms in rows.values())


async def _two(log: EventLog, user: str) -> bool:
    return len(await _decisions(log, user)) == 2


async def _rows(pool: asyncpg.Pool) -> dict:
    rows = await pool.fetch(
        "SELECT turn, moderation_engine, moderation_categories, moderation_ms FROM turns"
        " WHERE user_id = 'http:alice' AND moderation_engine IS NOT NULL"
    )
    return {
        r["turn"]: (r["moderation_engine"], r["moderation_categories"], r["moderation_ms"])
        for r in rows
    }


def _speculating(redis, wire: FakeLlmWire) -> TurnsProcessor:
    engine = OpenAIModeration(api_key="sk-test", timeout=5, base_url=wire.env()["OPENAI_BASE_URL"])
    moderator = Moderator([engine], breaker_failures=0)
    limiter = RateLimiter(redis, limit=10, window_s=10)
    return TurnsProcessor(redis, limiter, speculate=True, moderator=moderator)


async def test_a_speculative_transcript_is_moderated_once(redis, wire: FakeLlmWire) -> None:
    processor = _speculating(redis, wire)
    _, heard, ended, _ = _utterance("what time is it")
    [started] = await _decide(processor, heard)
    assert isinstance(started, TurnAccepted) and started.speculative
    assert started.moderation is not None and started.moderation.engine == "openai"
    [confirmed] = await _decide(processor, ended)
    assert isinstance(confirmed, TurnConfirmed)
    assert wire.count(MODERATIONS) == 1

    # flagged: not answered early; the end of the turn refuses it with the verdict it had
    _, heard, ended, _ = _utterance("I will stab you", user="u2")
    assert await _decide(processor, heard) == []
    [refused] = await _decide(processor, ended)
    assert isinstance(refused, TurnRejected) and refused.reason == "moderated"
    assert refused.moderation is not None and refused.moderation.categories == (
        "harassment",
        "violence",
    )
    assert refused.modality == "voice" and "violence" in refused.message
    assert wire.count(MODERATIONS) == 2


@pytest.mark.timeout(240)
def test_the_moderation_bench_reports_what_the_classifier_adds() -> None:
    result = CliRunner().invoke(main, ["bench", "text", "--moderation", "--turns", "2", "--json"])
    assert result.exit_code == 0, result.output
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["turns"] == 2 and figures["classifier_bare_p50_ms"] > 0
    for name in ("input", "both"):
        added = figures[f"first_delta_{name}_p50_ms"] - figures["first_delta_off_p50_ms"]
        assert figures[f"added_{name}_p50_ms"] == pytest.approx(added)
        ratio = added / figures["classifier_bare_p50_ms"]
        assert figures[f"added_{name}_ratio_p50"] == pytest.approx(ratio)
    per_check = figures["added_both_p50_ms"] / (2 * figures["classifier_bare_p50_ms"])
    assert figures["added_both_per_check_ratio_p50"] == pytest.approx(per_check)
    # the classifier is on the path: checking the reply too waits for it once more
    assert figures["first_delta_both_p50_ms"] > figures["first_delta_off_p50_ms"]
