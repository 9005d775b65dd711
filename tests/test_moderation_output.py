"""Output moderation: Libra's reply is released a sentence at a time, each once it is clean.

Real NATS, Postgres and Redis; the LLM and the moderation classifier are the loopback fake's
OpenAI wire (``/v1/chat/completions`` streamed, ``/v1/moderations`` flagging trigger words).
"""

from __future__ import annotations

import json
import time

import httpx
import msgspec
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from libra.contracts import (
    LlmCompleted,
    LlmDelta,
    Origin,
    SessionSettings,
    TtsSynthesized,
    TurnAccepted,
    make,
)
from libra.ops.fakes.llm_wire import MODERATIONS, Behaviour, FakeLlmWire
from libra.processors.llm.chain import ChainResult
from libra.processors.llm.processor import _STOPPED
from libra.processors.llm.providers.base import ChatUsage
from libra.processors.llm.release import ReleaseGate
from libra.processors.moderation.words import WordListEngine

from .helpers import eventually, stream_events
from .stack import TEXT_PIPELINE, answering_with, running

CLEAN_FIRST = "Sure, here is a plan for your weekend."
FLAGGED = " Then you stab the neighbour with a fork."  # "stab": the fake flags violence
AFTER = " Finally you rest at home."
CLEAN = "Sure, here is a plan for your weekend. Walk in the park. Finally you rest at home."
CHECK_S = 0.15  # the fake classifier's time per check
MODERATED = {"MODERATION_ENGINES": "openai,words"}  # a classifier named: output moderation on


_SENTENCES = st.lists(
    st.sampled_from(["Hi there.", " Dr. Who came!", " **Bold** move?", "\n", " ok", " frob it."]),
    max_size=8,
)


@hsettings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sentences=_SENTENCES, cuts=st.lists(st.integers(1, 7), min_size=1, max_size=6))
async def test_the_gate_releases_the_text_as_written_up_to_a_flagged_sentence(
    sentences: list[str], cuts: list[int]
) -> None:
    text = "".join(sentences)
    pieces, at = [], 0
    while at < len(text):  # the reply cut into pieces of arbitrary sizes, as a model streams
        size = cuts[len(pieces) % len(cuts)]
        pieces.append(text[at : at + size])
        at += size
    result = ChainResult(provider="fake", model="m", usage=ChatUsage())

    async def stream():
        for piece in pieces:
            yield piece
        yield result

    gate = ReleaseGate(WordListEngine(frozenset({"frob"})))
    out = [item async for item in gate.release(stream())]
    released = "".join(i for i in out if isinstance(i, str))
    if "frob" not in text:
        assert released == text and out[-1] == result and gate.stopped is None
    else:  # the flagged sentence and everything after it are held back; the result never comes
        assert text.startswith(released) and "frob" not in released
        assert gate.stopped is not None and "frob" in text[len(released) :]
        # nothing clean before the first flagged sentence is held back
        assert "." not in text[len(released) : text.index("frob")].replace("Dr.", "")
        assert result not in out


@pytest.fixture
async def wire():
    async with FakeLlmWire(
        reply=Behaviour.ok(CLEAN, tokens_per_sec=200), moderation_latency=CHECK_S
    ) as fake:
        yield fake


async def _chat(port: int, user: str, message: str) -> list[dict]:
    """The reply's chunks as the HTTP API streams them (SSE)."""
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
        await eventually(lambda: _up(http), timeout=20)
        response = await http.post(
            "/api/chat/completions", json={"userId": user, "message": message, "stream": True}
        )
    assert response.status_code == 200, response.text
    return [json.loads(line[6:]) for line in response.text.splitlines() if line[:6] == "data: "]


async def _up(http: httpx.AsyncClient) -> bool:
    try:
        return (await http.get("/api/health")).status_code < 500
    except httpx.TransportError:
        return False


async def _history(port: int, user: str) -> list[dict]:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
        return (await http.get(f"/api/chat/history/{user}")).json()["messages"]


async def _completed(log, user: str) -> LlmCompleted:
    async def done() -> bool:
        events = await stream_events(log.js, "LIBRA", "libra.llm.completed.>")
        return any(e.user == f"http:{user}" for e in events)

    await eventually(done, timeout=20)
    events = await stream_events(log.js, "LIBRA", "libra.llm.completed.>")
    return next(e for e in events if e.user == f"http:{user}")


async def test_a_flagged_sentence_stops_the_reply_and_leaves_no_trace(settings, wire, pool) -> None:
    wire.reply = Behaviour.ok(CLEAN_FIRST + FLAGGED + AFTER, tokens_per_sec=200)
    s = answering_with(settings, wire, **MODERATED)
    async with running(s, [*TEXT_PIPELINE, "http"]) as r:
        chunks = await _chat(s.http_port, "mallory", "Plan my weekend please")
        delivered = CLEAN_FIRST + "\n\n" + _STOPPED["en"]
        assert "".join(c["content"] for c in chunks) == delivered
        completed = await _completed(r.log, "mallory")
        assert completed.text == delivered and completed.finish_reason == "moderated"
        assert completed.stopped_at == 1 and completed.moderation.flagged
        assert "violence" in completed.moderation.categories
        assert completed.moderation.engine == "openai" and completed.moderation.latency_ms > 0
        checked = [c.body["input"] for c in wire.calls(MODERATIONS)]
        assert FLAGGED in checked  # the classifier saw it; nothing else did
        await eventually(lambda: _has_history(s.http_port, "mallory"))
        history = await _history(s.http_port, "mallory")
        assert history[-1]["content"] == delivered
        everything = [
            msgspec.json.encode(e).decode()
            for stream in ("LIBRA", "LIBRA_LIVE")
            for e in await stream_events(r.log.js, stream)
        ]
        tables = await pool.fetch("SELECT messages::text FROM messages")
    assert everything and not [e for e in everything if "stab" in e]
    assert not [t for (t,) in tables if "stab" in t]


async def _has_history(port: int, user: str) -> bool:
    return any(m["role"] == "assistant" for m in await _history(port, user))


async def test_a_spoken_reply_says_only_what_was_released(settings, wire) -> None:
    wire.reply = Behaviour.ok(CLEAN_FIRST + FLAGGED + AFTER, tokens_per_sec=200)
    s = answering_with(settings, wire, TTS_ENGINES="espeak", **MODERATED)
    origin = Origin(platform="discord", guild="1", channel="2")
    turn = make(
        TurnAccepted,
        conversation="discord-1-2",
        user="discord:7",
        text="Plan my weekend please",
        modality="voice",
        origin=origin,
    )
    async with running(s, ["llm", "tts"]) as r:
        await r.log.publish(turn)

        async def spoken() -> list[TtsSynthesized]:
            clips = await stream_events(r.log.js, "LIBRA", "libra.tts.>")
            return [c for c in clips if isinstance(c, TtsSynthesized)]

        await eventually(lambda: _any_final(spoken), timeout=30)
        clips = sorted(await spoken(), key=lambda c: c.index)
    said = " ".join(c.text for c in clips if c.text)
    assert said == f"{CLEAN_FIRST} {_STOPPED['en']}"  # the notice is said; "stab" never is


async def _any_final(clips) -> bool:
    return any(c.final for c in await clips())


async def test_a_clean_reply_streams_whole_in_order_after_each_check(settings, wire) -> None:
    s = answering_with(settings, wire, **MODERATED)
    async with running(s, [*TEXT_PIPELINE, "http"]) as r:
        chunks = await _chat(s.http_port, "carol", "Plan my weekend please")
        completed = await _completed(r.log, "carol")
        live = await stream_events(r.log.js, "LIBRA_LIVE", "libra.llm.delta.>")
        [accepted] = await stream_events(r.log.js, "LIBRA", "libra.turn.accepted.>")
    assert "".join(c["content"] for c in chunks) == CLEAN == completed.text
    deltas = sorted((d for d in live if isinstance(d, LlmDelta)), key=lambda d: d.index)
    # one delta a sentence, each released whole once checked
    assert [d.text for d in deltas] == [
        "Sure, here is a plan for your weekend.",
        " Walk in the park.",
        " Finally you rest at home.",
    ]
    assert isinstance(accepted, TurnAccepted) and not completed.moderation.flagged
    assert completed.moderation.latency_ms >= CHECK_S * 1000  # the first delta waited
    first = (deltas[0].at - accepted.at).total_seconds()
    assert first >= CHECK_S
    print(
        f"\noutput moderation: first delta {first * 1000:.0f} ms after turn.accepted; "
        f"its check held it {completed.moderation.latency_ms:.0f} ms "
        f"(classifier {CHECK_S * 1000:.0f} ms, provider ttft {completed.ttft_ms:.0f} ms)"
    )


async def test_with_the_classifier_down_the_fail_policy_decides(settings, wire) -> None:
    wire.always(MODERATIONS, Behaviour.error(503))
    s = answering_with(settings, wire, MODERATION_ENGINES="openai", MODERATION_FAIL="open")
    started = time.monotonic()
    async with running(s, [*TEXT_PIPELINE, "http"]) as r:
        chunks = await _chat(s.http_port, "dave", "Plan my weekend please")
        completed = await _completed(r.log, "dave")
    assert "".join(c["content"] for c in chunks) == CLEAN == completed.text
    assert completed.moderation.engine == "none" and not completed.moderation.flagged
    assert completed.stopped_at is None
    assert wire.count(MODERATIONS) >= 3  # every sentence was asked about, and passed open
    print(f"\nclassifier down, fail open: reply whole in {time.monotonic() - started:.1f} s")


async def test_a_servers_policy_decides_what_stops_its_replies(settings, wire, pool) -> None:
    wire.reply = Behaviour.ok(CLEAN_FIRST + FLAGGED + AFTER, tokens_per_sec=200)
    s = answering_with(settings, wire, **MODERATED)

    def turn(guild: str) -> TurnAccepted:
        origin = Origin(platform="discord", guild=guild, channel="9")
        return make(
            TurnAccepted,
            conversation=f"discord-{guild}-9",
            user=f"discord:p{guild}",
            text="Plan my weekend please",
            origin=origin,
        )

    async with running(s, ["llm", "sessions"]) as r:
        # a tabletop server: violence in a story is fine there, hate is not
        await r.log.publish(
            make(
                SessionSettings,
                conversation="discord-1-9",
                user="discord:admin",
                scope="guild:1",
                key="moderation.categories",
                value="hate",
                origin=Origin(platform="discord", guild="1", channel="9"),
            )
        )
        await eventually(lambda: _setting_row(pool), timeout=15)
        lenient, strict = turn("1"), turn("2")
        for accepted in (lenient, strict):
            await r.log.publish(accepted)

        async def both() -> bool:
            return len(await stream_events(r.log.js, "LIBRA", "libra.llm.completed.>")) == 2

        await eventually(both, timeout=20)
        done = {e.user: e for e in await stream_events(r.log.js, "LIBRA", "libra.llm.completed.>")}
    kept, stopped = done["discord:p1"], done["discord:p2"]
    assert kept.finish_reason != "moderated" and kept.text == CLEAN_FIRST + FLAGGED + AFTER
    assert kept.moderation is not None and not kept.moderation.flagged
    assert kept.moderation.policy == "guild:1 categories=hate"
    assert stopped.finish_reason == "moderated" and stopped.moderation.policy == ""
    assert "violence" in stopped.moderation.categories


async def _setting_row(pool) -> bool:
    return bool(await pool.fetchval("SELECT count(*) FROM settings WHERE scope = 'guild:1'"))
