"""Redis, PostgreSQL and NATS stopped under traffic: every turn ends within seconds in an answer or
a refusal a person can read, the decision says what was down, and service comes back by itself.

Each test stops a real server of its own (the session's shared ones stay up for other tests),
sends turns through the HTTP API, then starts the server again on the same port and data. The
seconds each request took are printed (``pytest -s``) for the README's outage table.
"""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import asyncpg
import httpx
import pytest
import redis.asyncio as aioredis

from libra.contracts import (
    LIVE_STREAM,
    LOG_STREAM,
    AsrTranscribed,
    LlmCompleted,
    Origin,
    TextReceived,
    TurnAbandoned,
    TurnAccepted,
    TurnConfirmed,
    TurnRejected,
    VoiceCaptured,
    VoiceEnded,
    VoiceResumed,
    derive,
    make,
)
from libra.ops.embedded import EmbeddedNats, EmbeddedPostgres, EmbeddedRedis, free_port
from libra.ops.fakes.llm_wire import OPENAI_CHAT, Behaviour, FakeCall, FakeLlmWire
from libra.processors.llm.cache import CachedReply, ResponseCache
from libra.processors.turns.admission import TurnsProcessor
from libra.processors.turns.ratelimit import RateLimiter, key_for
from libra.projections.history import HistoryProjection
from libra.projections.turns import TurnsProjection
from libra.runtime.config import Settings
from libra.runtime.database import connect_pool, migrate
from libra.runtime.eventlog import EventLog
from libra.runtime.outage import Breaker, Unavailable
from libra.runtime.projection import rebuild

from .factories import AUDIO
from .helpers import eventually, postgres_folder, stream_count, stream_events, wait_http
from .stack import TEXT_PIPELINE, running

REPLY = "Hello! I am Libra."
LIMIT_S = 5.0  # a person reads an answer or a refusal within this, whatever is down
BACK_S = 5.0  # and is answered normally again within this of the server's return
HTTP = Origin(platform="http")


@pytest.fixture
async def wire() -> AsyncIterator[FakeLlmWire]:
    async with FakeLlmWire(reply=Behaviour.ok(REPLY)) as fake:
        yield fake


@pytest.fixture
async def own_redis(tmp_path) -> AsyncIterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path, port=free_port())
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def own_postgres() -> AsyncIterator[EmbeddedPostgres]:
    folder = postgres_folder()
    server = EmbeddedPostgres(folder, port=free_port())
    await server.start()
    await migrate(server.url)
    yield server
    await server.stop()
    shutil.rmtree(folder, ignore_errors=True)


def _settings(nats: str, database: str, redis: str, wire: FakeLlmWire, **extra: str) -> Settings:
    return Settings.from_env(
        {
            "NATS_URL": nats,
            "DATABASE_URL": database,
            "REDIS_URL": redis,
            "OPENAI_API_KEY": "sk-test-key",
            "OPENAI_BASE_URL": wire.env()["OPENAI_BASE_URL"],
            "HTTP_PORT": str(free_port()),
            "LLM_CACHE_ENABLED": "0",
            **extra,
        }
    )


class _Api:
    """The HTTP API of a running stack, timing each request."""

    def __init__(self, http: httpx.AsyncClient) -> None:
        self.http = http
        self.took: list[float] = []

    async def chat(self, user: str, message: str, *, stream: bool = False) -> httpx.Response:
        body = {"userId": user, "message": message, "stream": stream}
        return await self._timed(lambda: self.http.post("/api/chat/completions", json=body))

    async def history(self, user: str) -> httpx.Response:
        return await self._timed(lambda: self.http.get(f"/api/chat/history/{user}"))

    async def _timed(self, call: Callable[[], Awaitable[httpx.Response]]) -> httpx.Response:
        began = time.monotonic()
        response = await call()
        self.took.append(time.monotonic() - began)
        assert self.took[-1] < LIMIT_S, f"{response.status_code} after {self.took[-1]:.2f}s"
        return response

    def report(self, what: str) -> None:
        print(f"\n{what}: {len(self.took)} requests, slowest {max(self.took):.2f}s,", end=" ")
        print("each " + ", ".join(f"{t:.2f}" for t in self.took) + " s")
        self.took.clear()


@pytest.fixture
async def api_of() -> AsyncIterator[Callable[[Settings], Awaitable[_Api]]]:
    clients: list[httpx.AsyncClient] = []

    async def make_api(s: Settings) -> _Api:
        http = httpx.AsyncClient(base_url=f"http://127.0.0.1:{s.http_port}", timeout=30)
        clients.append(http)
        await wait_http(s.http_port)
        return _Api(http)

    yield make_api
    for http in clients:
        await http.aclose()


def _unavailable(r: httpx.Response) -> bool:
    body = r.json()
    return (
        r.status_code == 503
        and int(r.headers["retry-after"]) > 0
        and body["error"] == "unavailable"
        and bool(body["message"])
    )


def _sse(body: str) -> list[dict]:
    return [json.loads(line[6:]) for line in body.splitlines() if line.startswith("data: ")]


async def _events(log: EventLog, subject: str, cls: type) -> dict[str, object]:
    """The events of ``cls`` on ``subject``, by turn."""
    return {
        e.turn: e for e in await stream_events(log.js, LOG_STREAM, subject) if isinstance(e, cls)
    }


async def _back_within(
    seconds: float, attempt: Callable[[int], Awaitable[bool]], *, every: float = 0.2
) -> float:
    """Tries ``attempt`` until it says service is normal; returns how long that took."""
    began = time.monotonic()
    for i in range(1000):
        if await attempt(i):
            took = time.monotonic() - began
            print(f"\nnormal again {took:.2f}s after the server was back")
            return took
        assert time.monotonic() - began < seconds, f"not normal within {seconds}s"
        await asyncio.sleep(every)
    raise AssertionError("unreachable")


async def _settled(log: EventLog, *consumers: str) -> bool:
    for name in consumers:
        info = await log.js.consumer_info(LOG_STREAM, name)
        if info.num_pending or info.num_ack_pending:
            return False
    return True


# --- Redis --------------------------------------------------------------------------------


async def test_redis_down_admits_under_a_local_limit_and_recovers(
    nats_server: EmbeddedNats, database_url: str, own_redis: EmbeddedRedis, wire, api_of
) -> None:
    s = _settings(
        nats_server.url,
        database_url,
        own_redis.url,
        wire,
        RATE_LIMIT_TURNS="3",
        RATE_LIMIT_WINDOW_SEC="60",
        LLM_CACHE_ENABLED="1",
    )
    async with running(s, [*TEXT_PIPELINE, "http"]) as r:
        api = await api_of(s)
        assert (await api.chat("ann", "first")).status_code == 200  # counted before the outage
        api.took.clear()
        await own_redis.stop()

        answered = [await api.chat("ann", f"during {i}") for i in range(2)]
        refused = await api.chat("ann", "one too many")
        streamed = await api.chat("ben", "hello", stream=True)
        api.report("redis down: chats")
        assert [a.status_code for a in answered] == [200, 200]
        assert all(a.json()["content"] == REPLY for a in answered)
        # the turn counted before the outage counts in the local window too
        assert refused.status_code == 429 and int(refused.headers["retry-after"]) > 0
        assert streamed.status_code == 200 and _sse(streamed.text)[-1]["done"] is True
        accepted = await _events(r.log, "libra.turn.accepted.>", TurnAccepted)
        during = [accepted[a.json()["turn"]] for a in answered]
        assert all(t.degraded == ("redis",) for t in during)
        [rejected] = (await _events(r.log, "libra.turn.rejected.>", TurnRejected)).values()
        assert rejected.reason == "rate_limited" and rejected.degraded == ("redis",)

        await own_redis.start()

        async def normal(i: int) -> bool:
            # a person's first turn is admitted from admission's own count (far below the
            # limit); the second is Redis's to decide
            replies = [await api.chat(f"cy{i}", f"are you back? {n}") for n in range(2)]
            turns = await _events(r.log, "libra.turn.accepted.>", TurnAccepted)
            first, second = (turns[reply.json()["turn"]] for reply in replies)
            return first.in_redis is False and second.degraded == () and second.in_redis

        assert await _back_within(BACK_S, normal) < BACK_S
        # the rate-limit view waited Redis out and wrote the turns admitted without it
        client = aioredis.from_url(own_redis.url)
        try:

            async def counted() -> bool:
                return await client.zcard(key_for("http:ann")) == 3

            await eventually(counted, timeout=30)
        finally:
            await client.aclose()
        assert await stream_count(r.log.js, LOG_STREAM, "libra.dead.>") == 0


async def test_admission_without_redis_decides_at_once(redis_url) -> None:
    dead = aioredis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_timeout=1)
    live = aioredis.from_url(redis_url)
    breaker = Breaker("redis", retry_s=60)
    processor = TurnsProcessor(
        dead, RateLimiter(dead, limit=2, window_s=10), speculate=True, breaker=breaker
    )
    try:
        began = time.monotonic()
        said = [
            make(TextReceived, conversation="http-u", user="u", text=f"m{i}", origin=HTTP)
            for i in range(3)
        ]
        outs = [out for s in said async for out in processor.handle(s)]
        assert [type(o) for o in outs] == [TurnAccepted, TurnAccepted, TurnRejected]
        assert all(o.degraded == ("redis",) for o in outs)
        # a speculative voice turn's parts meet in the process: started, then confirmed...
        heard, ended, _ = _utterance("v")
        [started] = [o async for o in processor.handle(heard)]
        [confirmed] = [o async for o in processor.handle(ended)]
        assert isinstance(started, TurnAccepted) and started.speculative
        assert isinstance(confirmed, TurnConfirmed) and confirmed.degraded == ("redis",)
        # ...or dropped when the person goes on talking
        heard, _, resumed = _utterance("w")
        [_started] = [o async for o in processor.handle(heard)]
        [abandoned] = [o async for o in processor.handle(resumed)]
        assert isinstance(abandoned, TurnAbandoned)
        # the response cache misses and stores nothing, at once
        cache = ResponseCache(dead, ttl_s=60, breaker=breaker)
        await cache.put("libra:llm-cache:x", CachedReply(text="t", provider="p", model="m"))
        assert await cache.get("libra:llm-cache:x") is None
        print(f"\nadmission without redis: 9 decisions in {time.monotonic() - began:.3f}s")
        assert time.monotonic() - began < 2.0  # one failed connection, then the open breaker
        assert await live.keys("libra:*") == []  # (nothing went to another Redis)
    finally:
        await dead.aclose()
        await live.aclose()


def _utterance(user: str) -> tuple[AsrTranscribed, VoiceEnded, VoiceResumed]:
    """A speculative transcript, and the two ways its turn can go."""
    capture = make(
        VoiceCaptured, conversation="http-v", user=user, audio=AUDIO, origin=HTTP, speculative=True
    )
    heard = derive(
        capture,
        AsrTranscribed,
        key="asr",
        text="what time is it",
        language="en",
        engine="groq",
        speculative=True,
        origin=HTTP,
    )
    ended = derive(capture, VoiceEnded, key="ended", captured=capture.id, origin=HTTP)
    resumed = derive(capture, VoiceResumed, key="resumed", captured=capture.id, origin=HTTP)
    return heard, ended, resumed


async def test_breaker_fails_fast_then_tries_again() -> None:
    breaker = Breaker("redis", retry_s=0.3)
    calls = 0

    async def refused() -> None:
        nonlocal calls
        calls += 1
        raise ConnectionRefusedError("refused")

    async def fine() -> str:
        return "ok"

    for _ in range(3):
        with pytest.raises(Unavailable):
            await breaker.call(refused)
    assert calls == 1  # the two after the first failed at once
    with pytest.raises(ZeroDivisionError):  # not an outage: passes through, breaker stays
        await Breaker("redis").call(lambda: _divide())
    await asyncio.sleep(0.35)
    assert await breaker.call(fine) == "ok"


async def _divide() -> float:
    return 1 / 0


# --- PostgreSQL ---------------------------------------------------------------------------


async def test_postgres_down_answers_without_context_and_projections_catch_up(
    nats_server: EmbeddedNats, redis_url: str, own_postgres: EmbeddedPostgres, wire, api_of
) -> None:
    s = _settings(nats_server.url, own_postgres.url, redis_url, wire)
    async with running(s, [*TEXT_PIPELINE, "http"]) as r:
        api = await api_of(s)
        assert (await api.chat("pat", "my cat is called Tom")).status_code == 200
        api.took.clear()
        await eventually(lambda: _settled(r.log, "history"))
        await own_postgres.stop()

        plain = await api.chat("pat", "what is my cat called?")
        streamed = await api.chat("pat", "and again?", stream=True)
        history = await api.history("pat")
        api.report("postgres down: chat, streamed chat, history")
        assert plain.status_code == 200 and plain.json()["content"] == REPLY
        assert streamed.status_code == 200 and _sse(streamed.text)[-1]["done"] is True
        assert _unavailable(history)
        completed = await _events(r.log, "libra.llm.completed.>", LlmCompleted)
        assert completed[plain.json()["turn"]].degraded == ("postgres",)
        assert [m["role"] for m in wire.calls(OPENAI_CHAT)[-1].messages] == ["system", "user"]

        await own_postgres.start()

        async def normal(i: int) -> bool:
            reply = await api.chat(f"quinn{i}", "are you back?")
            done = await _events(r.log, "libra.llm.completed.>", LlmCompleted)
            ok = reply.status_code == 200 and done[reply.json()["turn"]].degraded == ()
            return ok and (await api.history("pat")).status_code == 200

        assert await _back_within(BACK_S, normal) < BACK_S
        await eventually(lambda: _settled(r.log, "history", "turns-projection"), timeout=40)
        live = await _projected(own_postgres.url)
        rebuilt = await _rebuilt(r.log, own_postgres)
    assert live == rebuilt
    assert sum(1 for row in live["messages"] if row["user_id"] == "http:pat") == 6


async def test_postgres_down_a_tool_that_reads_it_says_so_and_reads_again_after(
    nats_server: EmbeddedNats, redis_url: str, own_postgres: EmbeddedPostgres, wire, api_of
) -> None:
    search = Behaviour.tool(FakeCall("knowledge_search", {"query": "cats"}), text="{results}")
    wire.always(OPENAI_CHAT, search)
    s = _settings(
        nats_server.url, own_postgres.url, redis_url, wire, TOOLS_ENABLED="knowledge_search"
    )
    nothing = "nothing in this conversation's knowledge bases matches"
    async with running(s, [*TEXT_PIPELINE, "http"]) as r:
        api = await api_of(s)
        assert (await api.chat("sol", "find cats")).json()["content"] == nothing
        await own_postgres.stop()

        down = await api.chat("sol", "find cats again")  # within LIMIT_S, as every request here
        api.report("postgres down: a turn whose tool reads it")
        assert down.status_code == 200
        assert "the knowledge bases cannot be read just now" in down.json()["content"]
        returned = await stream_events(r.log.js, LOG_STREAM, "libra.tool.returned.>")
        assert [e.error for e in returned] == ["", "failed"]

        await own_postgres.start()

        async def normal(i: int) -> bool:
            reply = await api.chat(f"sol{i}", "find cats once more")
            return reply.status_code == 200 and reply.json()["content"] == nothing

        assert await _back_within(BACK_S, normal) < BACK_S


_TABLES = {
    "messages": "SELECT * FROM messages ORDER BY event_id",
    "conversations": "SELECT * FROM conversations ORDER BY id",
    "turns": "SELECT * FROM turns ORDER BY turn",
}


async def _projected(url: str) -> dict[str, list[dict]]:
    conn = await asyncpg.connect(url)
    try:
        return {name: [dict(r) for r in await conn.fetch(sql)] for name, sql in _TABLES.items()}
    finally:
        await conn.close()


async def _rebuilt(log: EventLog, server: EmbeddedPostgres) -> dict[str, list[dict]]:
    """The history and turns tables rebuilt from the log into a fresh database."""
    conn = await asyncpg.connect(server.admin_url())
    await conn.execute('CREATE DATABASE "rebuilt"')
    await conn.close()
    url = server.admin_url("rebuilt")
    await migrate(url)
    pool = await connect_pool(url)
    try:
        await rebuild(log, pool, HistoryProjection())
        await rebuild(log, pool, TurnsProjection())
    finally:
        await pool.close()
    return await _projected(url)


# --- NATS ---------------------------------------------------------------------------------


async def test_nats_down_refuses_at_once_and_recovers(
    nats_server: EmbeddedNats, database_url: str, redis_url: str, wire, api_of
) -> None:
    s = _settings(nats_server.url, database_url, redis_url, wire)
    async with running(s, [*TEXT_PIPELINE, "http"]):
        api = await api_of(s)
        assert (await api.chat("rae", "hello")).status_code == 200
        api.took.clear()
        await nats_server.stop()

        plain = await api.chat("rae", "are you there?")
        streamed = await api.chat("rae", "are you there?", stream=True)
        clip = base64.b64encode(bytes(3200)).decode()
        spoken = await api._timed(
            lambda: api.http.post("/voice/process", json={"userId": "rae", "audioData": clip})
        )
        transcribed = await api._timed(
            lambda: api.http.post("/api/stt/transcribe", files={"file": ("a.raw", bytes(3200))})
        )
        history = await api.history("rae")  # PostgreSQL is up: the history still reads
        api.report("nats down: chat, streamed chat, voice, transcribe, history")
        assert all(_unavailable(x) for x in (plain, streamed, spoken, transcribed))
        assert history.status_code == 200

        await nats_server.start()

        async def normal(i: int) -> bool:
            return (await api.chat(f"sam{i}", "are you back?")).status_code == 200

        assert await _back_within(BACK_S, normal) < BACK_S


# --- a decision that does not come ------------------------------------------------------


async def test_a_turn_no_one_admits_is_refused_within_seconds(
    nats_server: EmbeddedNats, database_url: str, redis_url: str, wire, api_of
) -> None:
    s = _settings(nats_server.url, database_url, redis_url, wire)
    async with running(s, ["http"]) as r:  # no turns processor: nothing decides
        api = await api_of(s)
        plain = await api.chat("tia", "hello?")
        streamed = await api.chat("tia", "hello?", stream=True)
        api.report("no admission: chat, streamed chat")
        assert _unavailable(plain) and _unavailable(streamed)
        said = await stream_events(r.log.js, LOG_STREAM, "libra.text.received.>")
        assert len(said) == 2  # the messages are in the log: admission decides them when back
        assert await stream_count(r.log.js, LIVE_STREAM, "libra.llm.delta.>") == 0
