"""Text conversations end to end on real NATS, Postgres and Redis, with the LLM's wire faked."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import jwt
import pytest

from libra.contracts import (
    LlmCompleted,
    LlmDelta,
    Origin,
    TextReceived,
    TurnAccepted,
    TurnRejected,
    conversation_id,
    decode_event,
    derive,
    make,
    new_id,
)
from libra.ops.embedded import free_port
from libra.ops.fakes.llm_wire import GROQ_CHAT, OPENAI_CHAT, Behaviour, FakeLlmWire
from libra.processors.turns.admission import TurnsProcessor
from libra.processors.turns.ratelimit import RateLimiter
from libra.runtime.config import Settings
from libra.runtime.consumer import ConsumerRunner
from libra.runtime.eventlog import EventLog

from .helpers import eventually, stream_events, wait_http
from .stack import TEXT_PIPELINE, answering_with, running

REPLY = "Hello! I am Libra. How can I help you today?"


@pytest.fixture
async def wire():
    async with FakeLlmWire(reply=Behaviour.ok(REPLY)) as fake:
        yield fake


def _sse(body: str) -> list[dict]:
    return [json.loads(line[6:]) for line in body.splitlines() if line.startswith("data: ")]


async def _row(pool, sql: str, *args):
    return await pool.fetchrow(sql, *args)


async def test_http_stream_to_history_and_turns(settings, wire, pool) -> None:
    s = answering_with(settings, wire)
    async with running(s, [*TEXT_PIPELINE, "http"]):
        await wait_http(s.http_port)
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{s.http_port}", timeout=20
        ) as http:
            response = await http.post(
                "/api/chat/completions",
                json={"userId": "alice", "message": "Hi there!", "stream": True},
            )
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            chunks = _sse(response.text)
            assert chunks[-1]["done"] is True and all(not c["done"] for c in chunks[:-1])
            assert "".join(c["content"] for c in chunks) == REPLY
            turn = response.headers["x-libra-turn"]

            await eventually(
                lambda: _has(
                    pool, "SELECT 1 FROM turns WHERE turn = $1 AND delivered_at IS NOT NULL", turn
                )
            )
            row = await pool.fetchrow("SELECT * FROM turns WHERE turn = $1", turn)
            assert row["status"] == "delivered" and row["provider"] == "openai"
            stages = [
                row[c]
                for c in (
                    "received_at",
                    "accepted_at",
                    "first_delta_at",
                    "completed_at",
                    "delivered_at",
                )
            ]
            assert all(stages) and stages == sorted(stages)
            assert row["completion_tokens"] > 0 and row["language"] == "en"

            await eventually(
                lambda: _has(
                    pool, "SELECT 1 FROM messages WHERE turn = $1 AND role = 'assistant'", turn
                )
            )
            history = (await http.get("/api/chat/history/alice")).json()["messages"]
            assert [(m["role"], m["content"]) for m in history] == [
                ("user", "Hi there!"),
                ("assistant", REPLY),
            ]
            nul = await http.get("/api/chat/history/ali%00ce")  # PostgreSQL text holds no NUL
            assert nul.status_code == 400 and nul.json()["error"] == "invalid_request"

            health = await http.get("/api/health")
            assert health.json() == {
                "status": "healthy",
                "services": {"llm": "ok", "database": "ok", "redis": "ok", "nats": "ok"},
            }
            docs = await http.get("/docs")
            spec = (await http.get("/openapi.json")).json()
            assert docs.status_code == 200 and "/api/chat/completions" in spec["paths"]
            assert "/api/chat/history/{userId}" in spec["paths"] and "/api/health" in spec["paths"]
            metrics = (await http.get("/metrics")).text
            assert (
                'http_requests_total{method="POST",route="/api/chat/completions",status="200"}'
                in metrics
            )
            assert "llm_tokens_used_total" in metrics


async def _llm_restarted_mid_reply(log: EventLog, turn: TurnAccepted) -> None:
    """Plays an llm killed after two pieces whose restart answers from the start again."""
    now_ms = int(time.time() * 1000)
    tries = (
        (new_id(at_ms=now_ms - 5000), ["Hello! I", " am Lib"]),
        (new_id(at_ms=now_ms), [REPLY]),
    )
    for attempt, pieces in tries:
        for index, piece in enumerate(pieces):
            await log.publish(
                derive(
                    turn,
                    LlmDelta,
                    key=f"delta/{attempt}/{index}",
                    index=index,
                    text=piece,
                    attempt=attempt,
                    origin=turn.origin,
                )
            )
    done = derive(
        turn, LlmCompleted, key="completed", text=REPLY, provider="f", model="f", origin=turn.origin
    )
    await log.publish(done)


async def test_a_reply_restarted_by_the_llm_is_streamed_from_its_start_again(
    settings, wire, eventlog: EventLog
) -> None:
    s = answering_with(settings, wire)
    tasks: set[asyncio.Task] = set()

    async def on_accepted(msg) -> None:
        tasks.add(asyncio.create_task(_llm_restarted_mid_reply(eventlog, decode_event(msg.data))))

    sub = await eventlog.nc.subscribe("libra.turn.accepted.>", cb=on_accepted)
    without_llm = [name for name in TEXT_PIPELINE if name != "llm"]
    async with running(s, [*without_llm, "http"]):
        await wait_http(s.http_port)
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{s.http_port}", timeout=20
        ) as http:
            response = await http.post(
                "/api/chat/completions",
                json={"userId": "erin", "message": "Hi there!", "stream": True},
            )
    await sub.unsubscribe()
    chunks = _sse(response.text)
    assert [c.get("restart", False) for c in chunks] == [False, False, True, False]
    shown = ""
    for chunk in chunks:  # what a client shows: a restart drops what came before it
        shown = chunk["content"] if chunk.get("restart") else shown + chunk["content"]
    assert shown == REPLY


async def test_second_message_recalls_the_first(settings, wire, pool) -> None:
    s = answering_with(settings, wire)
    async with running(s, [*TEXT_PIPELINE, "http"]):
        await wait_http(s.http_port)
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{s.http_port}", timeout=20
        ) as http:
            first = await http.post(
                "/api/chat/completions",
                json={"userId": "bob", "message": "My dog is called Biscuit and loves the beach."},
            )
            assert first.status_code == 200 and first.json()["content"] == REPLY
            await eventually(
                lambda: _has(pool, "SELECT 1 FROM memories WHERE user_id = 'http:bob'")
            )
            await eventually(
                lambda: _has(
                    pool, "SELECT 1 FROM messages WHERE user_id = 'http:bob' AND role = 'assistant'"
                )
            )
            second = await http.post(
                "/api/chat/completions", json={"userId": "bob", "message": "What is my dog called?"}
            )
            assert second.status_code == 200
    last = wire.calls(OPENAI_CHAT)[-1].messages
    system = last[0]["content"]
    assert "Earlier exchanges" in system and "Biscuit" in system  # recalled from pgvector
    assert [m["role"] for m in last] == ["system", "user", "assistant", "user"]  # and in history
    assert last[-1]["content"] == "What is my dog called?"


async def test_eleventh_quick_message_is_rejected_with_a_retry_time(settings, wire) -> None:
    s = answering_with(settings, wire)
    async with running(s, [*TEXT_PIPELINE, "http"]):
        await wait_http(s.http_port)
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{s.http_port}", timeout=20
        ) as http:
            statuses = []
            for i in range(11):
                r = await http.post(
                    "/api/chat/completions", json={"userId": "carol", "message": f"m{i}"}
                )
                statuses.append(r.status_code)
            assert statuses == [200] * 10 + [429]
            assert 1 <= int(r.headers["retry-after"]) <= 10
            body = r.json()
            assert body["error"] == "rate_limited" and "try again in" in body["message"]
            other = await http.post(
                "/api/chat/completions", json={"userId": "dave", "message": "hi"}
            )
            assert other.status_code == 200  # the limit is per user


async def test_two_turns_instances_do_not_double_admit(
    settings, eventlog: EventLog, redis_url
) -> None:
    import redis.asyncio as aioredis

    client = aioredis.from_url(redis_url)
    limiter = RateLimiter(client, limit=10, window_s=10)
    runners = [
        ConsumerRunner(eventlog, TurnsProcessor(client, limiter), concurrency=32) for _ in range(2)
    ]
    tasks = [asyncio.create_task(r.run()) for r in runners]
    inputs = [
        make(
            TextReceived,
            conversation="http-erin",
            user="erin",
            text=f"m{i}",
            origin=Origin(platform="http"),
        )
        for i in range(30)
    ]
    await eventlog.publish_many(inputs)
    await eventlog.publish_many(inputs[:5])  # the same messages again: one decision each
    await eventually(lambda: _decided(eventlog, 30))
    for runner in runners:
        await runner.stop()
    await asyncio.gather(*tasks)
    await client.aclose()
    outcomes = await stream_events(eventlog.js, "LIBRA", "libra.turn.>")
    assert len(outcomes) == 30
    assert sum(isinstance(e, TurnAccepted) for e in outcomes) == 10
    assert sum(isinstance(e, TurnRejected) and e.reason == "rate_limited" for e in outcomes) == 20


async def test_fallback_is_recorded_in_the_completed_event(settings, wire, eventlog) -> None:
    s = answering_with(
        settings,
        wire,
        GROQ_API_KEY="gsk-test",
        GROQ_BASE_URL=wire.url,
        LLM_PROVIDERS="groq,openai",
        LLM_RETRIES="0",
    )
    wire.always(GROQ_CHAT, Behaviour.error(500))
    async with running(s, TEXT_PIPELINE):
        said = make(
            TextReceived,
            conversation=conversation_id("http", "fay"),
            user="fay",
            text="hello",
            origin=Origin(platform="http"),
        )
        await eventlog.publish(said)
        await eventually(lambda: _count(eventlog, "libra.llm.completed.>", 1))
    [done] = await stream_events(eventlog.js, "LIBRA", "libra.llm.completed.>")
    assert isinstance(done, LlmCompleted) and done.provider == "openai" and done.text == REPLY
    assert [(a.provider, a.error) for a in done.attempts] == [("groq", "server")]


async def test_no_provider_gives_a_readable_failure(
    settings, eventlog, redis_url, database_url
) -> None:
    s = Settings.from_env(
        {
            "NATS_URL": settings.nats_url,
            "DATABASE_URL": database_url,
            "REDIS_URL": redis_url,
            "HTTP_PORT": str(free_port()),
            "LLM_EMBEDDED": "0",  # else the embedded model answers
        }
    )
    async with running(s, [*TEXT_PIPELINE, "http"]):
        await wait_http(s.http_port)
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{s.http_port}", timeout=20
        ) as http:
            r = await http.post(
                "/api/chat/completions", json={"userId": "gus", "message": "hello", "stream": True}
            )
            assert r.status_code == 200
            [last] = _sse(r.text)
            assert (
                last["done"]
                and last["error"] == "no_provider"
                and "OPENAI_API_KEY" in last["message"]
                and "LLM_BASE_URL" in last["message"]  # the same list as `libra up`'s warning
            )
            health = await http.get("/api/health")  # a setup to finish, not a stack that fails
            assert health.status_code == 200 and health.json()["services"]["llm"] == "unconfigured"


@pytest.mark.parametrize(
    ("body", "status", "error"),
    [
        (b"{not json", 400, "invalid_request"),
        (b'{"userId": "x"}', 400, "invalid_request"),
        (b'{"userId": "", "message": "hi"}', 400, "invalid_request"),
        (b'{"userId": "x", "message": 5}', 400, "invalid_request"),
        (b'{"userId": "x", "message": "   "}', 400, "empty"),
        (b'{"userId": "x", "message": "\xff\xfe"}', 400, "invalid_request"),
        (json.dumps({"userId": "x", "message": "a" * 5000}).encode(), 413, "too_long"),
        (json.dumps({"userId": "x", "message": "a" * 2_000_000}).encode(), 413, "too_large"),
    ],
)
async def test_bad_requests_get_clear_errors(
    settings, wire, body: bytes, status: int, error: str
) -> None:
    s = answering_with(settings, wire)
    async with running(s, ["turns", "http"]):
        await wait_http(s.http_port)
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{s.http_port}", timeout=20
        ) as http:
            r = await http.post(
                "/api/chat/completions", content=body, headers={"content-type": "application/json"}
            )
    assert r.status_code == status
    assert r.json()["error"] == error and r.json()["message"]


async def test_auth_service_key_and_user_tokens(settings, wire) -> None:
    s = answering_with(
        settings,
        wire,
        BFF_API_KEY="service-key-123",
        JWT_SECRET="jwt-secret-that-is-long-enough-456",
    )
    claims = {"sub": "hana", "exp": int(time.time()) + 600}  # a token must expire
    token = jwt.encode(claims, "jwt-secret-that-is-long-enough-456", algorithm="HS256")
    forged = jwt.encode(claims, "a-wrong-secret-of-the-same-good-length", algorithm="HS256")
    async with running(s, [*TEXT_PIPELINE, "http"]):
        await wait_http(s.http_port)
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{s.http_port}", timeout=20
        ) as http:
            ask = {"userId": "hana", "message": "hi"}
            assert (await http.post("/api/chat/completions", json=ask)).status_code == 401
            assert (
                await http.post(
                    "/api/chat/completions", json=ask, headers={"Authorization": f"Bearer {forged}"}
                )
            ).status_code == 401
            mine = await http.post(
                "/api/chat/completions", json=ask, headers={"Authorization": f"Bearer {token}"}
            )
            assert mine.status_code == 200
            other = await http.post(
                "/api/chat/completions",
                json={**ask, "userId": "ivan"},
                headers={"Authorization": f"Bearer {token}"},
            )
            assert other.status_code == 403
            service = await http.get(
                "/api/chat/history/ivan", headers={"X-API-Key": "service-key-123"}
            )
            assert service.status_code == 200
            assert (
                await http.get(
                    "/api/chat/history/ivan", headers={"Authorization": f"Bearer {token}"}
                )
            ).status_code == 403


async def _has(pool, sql: str, *args) -> bool:
    return await pool.fetchval(sql, *args) is not None


async def _count(log: EventLog, subject: str, n: int) -> bool:
    info = await log.js.stream_info("LIBRA", subjects_filter=subject)
    return sum((info.state.subjects or {}).values()) >= n


async def _decided(log: EventLog, n: int) -> bool:
    return await _count(log, "libra.turn.>", n)


async def test_console_chat_streams_the_reply(settings, wire) -> None:
    import os
    import subprocess
    import sys

    s = answering_with(settings, wire)
    async with running(s, TEXT_PIPELINE):
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "libra.ops",
            "chat",
            "--user",
            "jules",
            env=os.environ | {"NATS_URL": s.nats_url, "LOG_FORMAT": "console"},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(b"hello\n\n/quit\n"), 30)
    text = out.decode()
    assert proc.returncode == 0, err.decode()
    assert "Talking to Libra as 'jules'" in text and f"libra> {REPLY}" in text
