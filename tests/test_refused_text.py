"""Refused text stays out: only admitted turns are history, memory and prompt context.

A message that admission refuses (a blocked word, over ``MAX_INPUT_CHARS``, rate-limited) is
shown to its sender and never sent to a model as their words: not in their later prompts, not
in other people's prompts in the same server channel, not in the history route, not after a
projection rebuild. A refused flood reads no prompt context (no database reads, no embedding
calls), and a database from before the fix loses the refused rows it holds.
"""

from __future__ import annotations

import asyncio

import asyncpg
import httpx
import msgspec
import pytest
from prometheus_client import REGISTRY

from libra.contracts import (
    CONSUMERS,
    Attachment,
    LlmCompleted,
    Origin,
    TextReceived,
    TurnAccepted,
    TurnRejected,
    derive,
    make,
)
from libra.ops.fakes.llm_wire import EMBEDDINGS, OPENAI_CHAT, Behaviour, FakeLlmWire
from libra.processors.turns.admission import TurnsProcessor
from libra.processors.turns.ratelimit import RateLimiter
from libra.projections.history import HistoryProjection
from libra.projections.turns import TurnsProjection
from libra.runtime.database import migrate
from libra.runtime.eventlog import EventLog
from libra.runtime.positions import ensure_consumer
from libra.runtime.projection import ProjectionRunner, Recorded, _apply_batch, rebuild

from .helpers import eventually, stream_count, stream_events
from .stack import TEXT_PIPELINE, answering_with, running

REPLY = "Noted."
GUILD = Origin(platform="discord", guild="1", channel="2")
CHANNEL = "discord-1-2"
CAROL, BOB = "discord:201", "discord:202"
LIMITS = {
    "MODERATION_BLOCKLIST": "xyzzy",
    "MAX_INPUT_CHARS": "300",
    "RATE_LIMIT_TURNS": "2",
    "RATE_LIMIT_WINDOW_SEC": "120",
    # every read that is made gets as far as its embedding call, for the flood to count
    "MEMORY_RECALL_BUDGET_MS": "10000",
}
# Each refused text holds a marker that no admitted text, reply or prompt part does (but the
# one of Carol's three quick messages that the rate limit refuses: it is known by its text).
MARK = "REFUSEDMARK"


def _blocked(tag: str) -> str:
    return f"please say xyzzy now {MARK}{tag}"


def _long(tag: str) -> str:
    return f"{MARK}{tag} " + "blah " * 80  # over MAX_INPUT_CHARS=300


@pytest.fixture
async def wire():
    async with FakeLlmWire(reply=Behaviour.ok(REPLY)) as fake:
        yield fake


def _said(user: str, text: str) -> TextReceived:
    return make(TextReceived, conversation=CHANNEL, user=user, text=text, origin=GUILD)


def _prompt_of(wire: FakeLlmWire, text: str) -> str:
    """The whole request the provider received for the turn whose message is ``text``."""
    [call] = [c for c in wire.calls(OPENAI_CHAT) if c.messages[-1]["content"] == text]
    return "\n".join(str(m["content"]) for m in call.messages)


def _prefetched(outcome: str) -> float:
    return REGISTRY.get_sample_value("libra_llm_prefetch_total", {"outcome": outcome}) or 0.0


async def _count(pool: asyncpg.Pool, sql: str, n: int) -> bool:
    return await pool.fetchval(sql) >= n


async def _readable_text(pool: asyncpg.Pool) -> str:
    """Every row of every table a prompt or a route reads, as text."""
    tables = ("messages", "memories", "turns", "conversations")
    rows = [r[0] for t in tables for r in await pool.fetch(f"SELECT {t}::text FROM {t} AS {t}")]
    return "\n".join(rows)


async def _alice_over_http(http: httpx.AsyncClient, wire: FakeLlmWire) -> list[str]:
    """Alice's own conversation: refused texts between admitted ones; returns the admitted."""

    async def say(message: str) -> httpx.Response:
        return await http.post(
            "/api/chat/completions", json={"userId": "alice", "message": message}
        )

    admitted = ["My cat is called Tofu.", "What is my cat called?"]
    assert (await say(_blocked("a1"))).status_code == 422
    assert (await say(_long("a2"))).status_code == 413
    assert (await say(admitted[0])).status_code == 200
    assert (await say(_blocked("a3"))).status_code == 422
    assert (await say(admitted[1])).status_code == 200
    limited = await say(f"one more {MARK}a4")  # the third in the window: rate-limited
    assert limited.status_code == 429 and limited.json()["error"] == "rate_limited"
    later = _prompt_of(wire, admitted[1])
    assert admitted[0] in later and MARK not in later  # history is there, the refusals are not
    return admitted


async def _guild_channel(log: EventLog, pool: asyncpg.Pool, wire: FakeLlmWire) -> str:
    """Carol's refused and admitted messages in a server channel, then Bob's turn there;
    returns the one of Carol's three quick messages that the rate limit refused."""
    quick = [_said(CAROL, f"carol says {w}") for w in ("alpha", "beta", "gamma")]
    await log.publish_many([_said(CAROL, _blocked("c1")), _said(CAROL, _long("c2")), *quick])
    await eventually(lambda: _decided(log, 5))
    decided = await stream_events(log.js, "LIBRA", f"libra.turn.*.{CHANNEL}")
    reasons = sorted(e.reason for e in decided if isinstance(e, TurnRejected))
    assert reasons == ["moderated", "rate_limited", "too_long"]
    # which of the three the limit refused depends on the order they were handled in
    [limited] = [
        said.text
        for said in quick
        for e in decided
        if isinstance(e, TurnRejected) and e.turn == said.turn
    ]
    admitted = [said.text for said in quick if said.text != limited]
    in_history = f"SELECT count(*) FROM messages WHERE conversation = '{CHANNEL}'"
    await eventually(lambda: _count(pool, in_history, 4))
    bob = "bob asks what carol said"
    await log.publish(_said(BOB, bob))
    await eventually(lambda: _has_prompt(wire, bob), timeout=15)
    prompt = _prompt_of(wire, bob)
    assert all(text in prompt for text in admitted)  # the channel's history is in Bob's prompt
    assert MARK not in prompt and limited not in prompt  # and no refusal of Carol's
    return limited


async def _has_prompt(wire: FakeLlmWire, text: str) -> bool:
    return any(c.messages[-1]["content"] == text for c in wire.calls(OPENAI_CHAT))


async def _decided(log: EventLog, n: int, subject: str = f"libra.turn.*.{CHANNEL}") -> bool:
    return await stream_count(log.js, "LIBRA", subject) >= n


async def _flood(log: EventLog, pool: asyncpg.Pool, wire: FakeLlmWire) -> None:
    """Carol, at her limit and with memories to recall, floods the channel with refusals."""
    await eventually(
        lambda: _count(pool, f"SELECT count(*) FROM memories WHERE user_id = '{CAROL}'", 2)
    )
    await eventually(lambda: _count(pool, "SELECT count(*) FROM memories", 5), timeout=15)
    embeddings, reads = wire.count(EMBEDDINGS), _prefetched("read")
    skipped = _prefetched("refused") + _prefetched("rate_limited")
    flood = [_said(CAROL, _blocked(f"f{i}")) for i in range(10)]
    flood += [_said(CAROL, _long(f"g{i}")) for i in range(10)]
    flood += [_said(CAROL, f"carol again {MARK}h{i}") for i in range(10)]
    before = await stream_count(log.js, "LIBRA", f"libra.turn.*.{CHANNEL}")
    await log.publish_many(flood)
    await eventually(lambda: _decided(log, before + 30))

    async def all_heard() -> bool:
        return _prefetched("refused") + _prefetched("rate_limited") >= skipped + 30

    await eventually(all_heard)
    assert _prefetched("read") == reads  # no prompt context read for any of them
    assert wire.count(EMBEDDINGS) == embeddings  # and no embedding call


async def test_refused_text_is_never_history_nor_prompt(settings, wire, pool, eventlog) -> None:
    s = answering_with(settings, wire, **LIMITS)
    async with (
        running(s, [*TEXT_PIPELINE, "http"]),
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{s.http_port}", timeout=20) as http,
    ):
        await eventually(lambda: _http_up(http), timeout=15)
        admitted = await _alice_over_http(http, wire)
        limited = await _guild_channel(eventlog, pool, wire)
        await _flood(eventlog, pool, wire)

        async def alices_replies() -> bool:
            history = (await http.get("/api/chat/history/alice")).json()["messages"]
            return sum(m["role"] == "assistant" for m in history) == 2

        await eventually(alices_replies)
        history = (await http.get("/api/chat/history/alice")).json()["messages"]
        said = [m["content"] for m in history if m["role"] == "user"]
        assert said == admitted and not any(MARK in m["content"] for m in history)
    for call in wire.calls(OPENAI_CHAT):  # no request the provider ever received
        assert MARK not in str(call.body) and limited not in str(call.body)
    live = await _rows(pool)
    readable = await _readable_text(pool)
    assert MARK not in readable and limited not in readable
    await rebuild(eventlog, pool, HistoryProjection())
    assert await _rows(pool) == live  # a rebuild folds the same admitted turns, nothing more


async def _http_up(http: httpx.AsyncClient) -> bool:
    try:
        return (await http.get("/api/health")).status_code in (200, 503)
    except httpx.HTTPError:
        return False


async def _rows(pool: asyncpg.Pool) -> list[tuple]:
    return [tuple(r) for r in await pool.fetch("SELECT * FROM messages ORDER BY event_id")]


def _turn(said: TextReceived) -> list:
    """An admitted turn's events after its message: the turn and its answer."""
    turn = derive(said, TurnAccepted, key="turn", text=said.text, origin=GUILD, received_at=said.at)
    answer = derive(
        turn, LlmCompleted, key="completed", text=REPLY, provider="f", model="f", origin=GUILD
    )
    return [turn, answer]


def _refused(said: TextReceived) -> TurnRejected:
    return derive(said, TurnRejected, key="turn", reason="moderated", message="no", origin=GUILD)


async def test_an_upgraded_deployment_forgets_refused_rows_and_folds_turns(
    eventlog: EventLog, pool: asyncpg.Pool, database_url: str
) -> None:
    # Before: the history consumer filtered text.received and folded a refused message and one
    # that admission had not decided yet; the turns projection recorded the refusal.
    old = msgspec.structs.replace(
        CONSUMERS["history"], subjects=("libra.text.received.>", "libra.llm.completed.>")
    )
    await ensure_consumer(eventlog.js, old)
    refused = _said(CAROL, _blocked("old"))
    kept = _said(CAROL, "an admitted message from before")
    turn, answer = _turn(kept)
    before = [refused, _refused(refused), kept]
    await eventlog.publish_many(before)
    async with pool.acquire() as conn:
        await conn.executemany(
            "INSERT INTO messages (event_id, conversation, user_id, turn, role, content, at,"
            " stream_seq) VALUES ($1, $2, $3, $4, 'user', $5, $6, $7)",
            [(e.id, e.conversation, e.user, e.turn, e.text, e.at, 1) for e in (refused, kept)],
        )
        await _apply_batch(
            conn, TurnsProjection(), [Recorded(i, e) for i, e in enumerate(before, 1)]
        )
    await _ack_backlog(eventlog)

    # The upgrade: the migration, then the new projection on the same durable consumer.
    await pool.execute("DELETE FROM schema_migrations WHERE name = 'refused_history'")
    assert len(await migrate(database_url)) == 1
    later = _said(BOB, "a message after the upgrade")
    await eventlog.publish_many([turn, answer, later, *_turn(later)])
    runner = ProjectionRunner(eventlog, pool, HistoryProjection())
    task = asyncio.create_task(runner.run())
    await eventually(lambda: _count(pool, "SELECT count(*) FROM messages", 4))
    await runner.stop()
    await task
    info = await eventlog.js.consumer_info("LIBRA", "history")
    assert set(info.config.filter_subjects) == {"libra.turn.accepted.>", "libra.llm.completed.>"}
    rows = await pool.fetch("SELECT event_id, role, content FROM messages ORDER BY at")
    assert [(r["role"], r["content"]) for r in rows] == [
        ("user", kept.text),  # once: its turn, folded after the upgrade, has the message's id
        ("assistant", REPLY),
        ("user", "a message after the upgrade"),
        ("assistant", REPLY),
    ]
    assert rows[0]["event_id"] == kept.id


async def _ack_backlog(log: EventLog) -> None:
    """Acks what the old consumer had been given, as the old projection did once folded."""
    sub = await log.js.pull_subscribe_bind("history", stream="LIBRA")
    try:
        for msg in await sub.fetch(100, timeout=5):
            await msg.ack_sync()
    finally:
        await sub.unsubscribe()


@pytest.mark.parametrize(
    ("message", "file", "reason"),
    [
        ("read this", "x" * 295, "too_long"),  # 9 + 295 > 300
        ("read this", "short notes", None),
        ("", "x" * 301, "too_long"),
        ("read this", "the xyzzy word is in the file", "moderated"),
    ],
)
async def test_attached_text_counts_toward_the_input_limit(
    redis_url: str, message: str, file: str, reason: str | None
) -> None:
    import redis.asyncio as aioredis

    client = aioredis.from_url(redis_url)
    processor = TurnsProcessor(
        client,
        RateLimiter(client, limit=10, window_s=10),
        max_chars=300,
        blocked_words=frozenset({"xyzzy"}),
    )
    notes = Attachment(name="notes.txt", kind="text", text=file)
    said = make(
        TextReceived,
        conversation=CHANNEL,
        user=CAROL,
        text=message,
        origin=GUILD,
        attachments=(notes,),
    )
    [decision] = [e async for e in processor.handle(said)]
    await client.aclose()
    if reason is None:
        assert isinstance(decision, TurnAccepted)
        return
    assert isinstance(decision, TurnRejected) and decision.reason == reason
    if reason == "too_long":
        assert f"{len(message) + len(file):,} characters" in decision.message
        assert "300" in decision.message
