"""The operators' turn view: a real text turn through the API, then its JSON, the list, the pages
and who may read them; a voice turn's stages from its events."""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime, timedelta

import httpx
import jwt
import pytest
import redis.asyncio as aioredis

from libra.contracts import (
    AsrTranscribed,
    LlmCompleted,
    LlmDelta,
    ProviderAttempt,
    ReplyDelivered,
    TtsSynthesized,
    TurnAccepted,
    VoiceCaptured,
    derive,
    make,
    new_id,
)
from libra.gateway.http.app import create_app
from libra.gateway.http.auth import Authenticator
from libra.gateway.http.turns_view import turn_report
from libra.ops.fakes.llm_wire import Behaviour, FakeLlmWire

from .factories import AUDIO, ORIGIN
from .helpers import eventually
from .stack import TEXT_PIPELINE, answering_with, running

REPLY = "Hello! I am Libra. How can I help you today?"
KEY = "service-key-that-is-long-enough-123"
SECRET = "jwt-secret-that-is-long-enough-456"
SERVICE = {"X-API-Key": KEY}


@pytest.fixture
async def wire():
    async with FakeLlmWire(reply=Behaviour.ok(REPLY)) as fake:
        yield fake


def _app(log, pool_getter, redis):
    app = create_app(
        log,
        pool=pool_getter,
        redis=redis,
        auth=Authenticator(api_key=KEY, jwt_secret=SECRET),
        llm_status=lambda: "ok",
        max_body_bytes=1 << 20,
    )
    return app


def _person() -> dict[str, str]:
    claims = {"sub": "alice", "exp": int(time.time()) + 600}
    return {"Authorization": f"Bearer {jwt.encode(claims, SECRET, algorithm='HS256')}"}


async def test_a_text_turn_viewed(settings, wire, pool) -> None:
    s = answering_with(settings, wire)
    redis = aioredis.from_url(s.redis_url)

    async def pool_getter():
        return pool

    async with running(s, TEXT_PIPELINE) as resources:
        app = _app(resources.log, pool_getter, redis)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://127.0.0.1", timeout=30
        ) as http:
            chat = await http.post(
                "/api/chat/completions",
                json={"userId": "alice", "message": "Hi there!"},
                headers=SERVICE,
            )
            assert chat.status_code == 200, chat.text
            turn = chat.json()["turn"]

            async def projected() -> bool:
                sql = "SELECT 1 FROM turns WHERE turn = $1 AND delivered_at IS NOT NULL"
                return await pool.fetchval(sql, turn) is not None

            await eventually(projected)

            view = await http.get(f"/api/turns/{turn}", headers=SERVICE)
            assert view.status_code == 200, view.text
            body = view.json()
            assert body["turn"] == turn and body["outcome"] == "delivered"
            types = [e["type"] for e in body["events"]]
            assert types[:2] == ["text.received", "turn.accepted"] and "llm.delta" in types
            assert types.index("llm.completed") < types.index("reply.delivered")
            assert [e["ms"] for e in body["events"]] == sorted(e["ms"] for e in body["events"])
            received, accepted = body["events"][:2]
            assert accepted["causation"] == received["id"] == turn
            assert received["summary"] == "Hi there!" and received["ms"] == 0

            stages = body["stages"]
            assert stages["first_token"] > 0 and stages["delivered"] >= stages["first_token"]
            assert stages["admission"] > 0 and stages["total"] == stages["delivered"]
            assert stages["capture"] is None and stages["asr"] is None
            row = await pool.fetchrow("SELECT * FROM turns WHERE turn = $1", turn)
            first_token = (row["first_delta_at"] - row["accepted_at"]).total_seconds() * 1000
            delivered = (row["delivered_at"] - row["received_at"]).total_seconds() * 1000
            assert stages["first_token"] == pytest.approx(first_token, abs=0.1)
            assert stages["delivered"] == pytest.approx(delivered, abs=0.1)

            (attempt,) = body["attempts"]
            assert attempt["provider"] == "openai" and attempt["ok"] and attempt["ms"] > 0
            assert body["prompt"]["tokens"] == row["prompt_tokens"] > 0
            assert body["prompt"]["input_characters"] == len("Hi there!")

            piece = await http.get(f"/api/turns/{turn[-8:].lower()}", headers=SERVICE)
            assert piece.status_code == 200 and piece.json()["turn"] == turn

            listed = await http.get("/api/turns?limit=5", headers=SERVICE)
            assert listed.status_code == 200
            (first,) = listed.json()["turns"]
            assert first["turn"] == turn and first["user"] == "http:alice"
            assert first["platform"] == "http" and first["outcome"] == "delivered"
            assert first["total_ms"] == pytest.approx(stages["total"], abs=0.1)

            for path in (f"/api/turns/{turn}", "/api/turns"):
                refused = await http.get(path, headers=_person())
                assert refused.status_code == 403 and refused.json()["error"] == "forbidden"
                assert (await http.get(path)).status_code == 401

            for unknown in (new_id(), "not-a-turn!", "Z" * 26, "0" * 26):
                missing = await http.get(f"/api/turns/{unknown}", headers=SERVICE)
                assert missing.status_code == 404, (unknown, missing.text)
                assert missing.json()["error"] == "not_found"

            await _pages_served(http, turn)
    await redis.aclose()


async def _pages_served(http: httpx.AsyncClient, turn: str) -> None:
    """Pages for anyone, holding no data, loading nothing from elsewhere."""
    for path in (f"/turns/{turn}", "/turns"):
        page = await http.get(path)
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert (
            turn not in page.text
            and "default-src 'self'" in page.headers["content-security-policy"]
        )
        assets = re.findall(r'(?:src|href)="([^"]*)"', page.text)
        assert "/static/turn.js" in assets and "/static/turn.css" in assets
        assert all(a.startswith("/") and not a.startswith("//") for a in assets), assets
    script = await http.get("/static/turn.js")
    style = await http.get("/static/turn.css")
    assert script.headers["content-type"].startswith("text/javascript")
    assert style.headers["content-type"].startswith("text/css")
    assert "X-API-Key" in script.text and "/api/turns" in script.text
    assert not re.search(r"https?://|//[a-z]", script.text + style.text)


async def test_list_without_postgres(eventlog) -> None:
    async def down():
        raise ConnectionRefusedError("PostgreSQL is down")

    app = _app(eventlog, down, aioredis.from_url("redis://127.0.0.1:1"))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1"
    ) as http:
        answer = await http.get("/api/turns", headers=SERVICE)
    assert answer.status_code == 503 and answer.json()["error"] == "unavailable"
    assert answer.headers["retry-after"] == "5"


def test_voice_stages() -> None:
    """A voice turn's stages are the turns table's: from the end of speech to the first audio."""
    at = datetime.now(UTC)
    captured = make(
        VoiceCaptured,
        at=at,
        conversation="discord-1-2",
        user="discord:u1",
        audio=AUDIO,
        origin=ORIGIN,
        speech_ended_at=at - timedelta(milliseconds=500),
    )

    def later(parent, cls, ms, **fields):
        return derive(
            parent,
            cls,
            key=cls.__name__,
            at=at + timedelta(milliseconds=ms),
            origin=ORIGIN,
            **fields,
        )

    heard = later(captured, AsrTranscribed, 250, text="hi", engine="whisper")
    accepted = later(heard, TurnAccepted, 260, text="hi", modality="voice")
    delta = later(accepted, LlmDelta, 460, index=0, text="Hello.")
    failed = ProviderAttempt(provider="groq", model="g", error="timeout", latency_ms=80)
    done = later(
        accepted,
        LlmCompleted,
        500,
        text="Hello.",
        provider="openai",
        model="m",
        prompt_tokens=42,
        first_delta_at=delta.at,
        attempts=(failed,),
    )
    clip = later(done, TtsSynthesized, 600, audio=AUDIO, index=0, text="Hello.", engine="espeak")
    played = later(clip, ReplyDelivered, 1900, modality="voice", clips=1)

    report = turn_report([captured, heard, accepted, delta, done, clip, played])
    assert report["stages"] == {
        "capture": 500.0,
        "asr": 250.0,
        "admission": 10.0,
        "first_token": 200.0,
        "first_audio": 1100.0,
        "delivered": 1900.0,
        "total": 1900.0,
    }
    assert [(a["provider"], a["ok"]) for a in report["attempts"]] == [
        ("groq", False),
        ("openai", True),
    ]
    assert report["prompt"]["tokens"] == 42 and report["outcome"] == "delivered"
    assert [e["causation"] for e in report["events"][1:3]] == [captured.id, heard.id]
