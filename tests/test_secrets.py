"""No secret Libra is given shows up in its logs, events, dead letters, metrics or error bodies.

The stack runs with fake but distinctive values for every secret it reads, providers that answer
401 and 500 with the key echoed in their error body, and a handler that fails with credentials in
its exception; then every log record, every message in the log's streams, ``/metrics`` and every
error body is searched for each secret, raw and base64 or URL encoded.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import Iterator
from urllib.parse import quote, urlsplit

import httpx
import jwt
import pytest
from nats.js import JetStreamContext

from libra.contracts import LIVE_STREAM, LOG_STREAM, ConsumerSpec, Event, TurnAccepted
from libra.ops.embedded import free_port
from libra.ops.fakes.llm_wire import (
    ANTHROPIC_MESSAGES,
    GROQ_CHAT,
    OPENAI_CHAT,
    Behaviour,
    FakeLlmWire,
)
from libra.runtime.config import Settings
from libra.runtime.consumer import ConsumerRunner

from .helpers import eventually, stream_count
from .stack import TEXT_PIPELINE, running

REPLY = "Hello from the only provider that took its key."
KEYS = {
    "OPENAI_API_KEY": "sk-proj-LibraFakeOpenAi7Qx2Lw9Zt4Kp1",
    "GROQ_API_KEY": "gsk_LibraFakeGroq3Vb8Nm5Hs2Jd6",
    "ANTHROPIC_API_KEY": "sk-ant-api03-LibraFakeAnthropic8Rt",
    "LLM_API_KEY": "libra fake local key",
    "CARTESIA_API_KEY": "sk_car_LibraFakeCartesia4Gh7",
    "ELEVENLABS_API_KEY": "sk_5e1e7e11ab5fa4e0c0ffee0ddba11feed5eed0ff1ce",
    "CF_API_TOKEN": "libra-fake-cloudflare-token",
    "DISCORD_TOKEN": "MTAxLibraFakeDiscord.GhIjKl.FakeDiscordSecretPart9876",
    "JWT_SECRET": "libra fake jwt secret, long enough to sign",
    "BFF_API_KEY": "libra-fake-bff-key",
}


class Leaky:
    """Fails each admitted turn as a careless dependency would: credentials in the message."""

    spec = ConsumerSpec(name="leaky", subjects=("libra.turn.accepted.>",), max_deliver=1)

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    async def handle(self, event: TurnAccepted) -> list[Event]:
        s = self.settings
        raise ConnectionError(
            f"could not reach {s.database_url} nor {s.redis_url} nor {s.nats_url};"
            f" sent X-API-Key: {s.bff_api_key} and signed with {s.jwt_secret}"
        )


def _forms(secret: str) -> Iterator[str]:
    raw = secret.encode()
    yield secret
    yield quote(secret, safe="")
    yield base64.b64encode(raw).decode().rstrip("=")
    yield base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _secrets(s: Settings) -> dict[str, str]:
    found = {name: value for name, value in KEYS.items()}
    for name in ("nats_url", "database_url", "redis_url"):
        password = urlsplit(getattr(s, name)).password
        assert password, f"{name} has no password to look for"
        found[f"{name} password"] = password
    return found


def _record_text(record: logging.LogRecord) -> str:
    parts = [record.getMessage(), repr(record.args)]
    if record.exc_info:
        parts.append(logging.Formatter().formatException(record.exc_info))
    parts.extend(repr(v) for k, v in vars(record).items() if k not in ("msg", "args", "exc_info"))
    return "\n".join(parts)


async def _stream_text(js: JetStreamContext, stream: str) -> list[str]:
    """Every message of ``stream``, data and headers, as text."""
    if (await js.stream_info(stream)).state.messages == 0:
        return []
    out: list[str] = []
    sub = await js.subscribe(">", stream=stream, ordered_consumer=True)
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=0.5)
            except TimeoutError:
                return out
            out.append(f"{msg.subject} {msg.headers} {msg.data.decode('utf-8', 'replace')}")
    finally:
        await sub.unsubscribe()


def _token(secret: str, *, sub: str = "zoe", expired: bool = False) -> str:
    now = int(time.time())
    exp = now - 3600 if expired else now + 3600
    return jwt.encode({"sub": sub, "iat": now, "exp": exp}, secret, algorithm="HS256")


async def _failures(http: httpx.AsyncClient, wire: FakeLlmWire) -> list[httpx.Response]:
    """Requests that must each be refused or fail, in Libra's words."""
    key = {"X-API-Key": KEYS["BFF_API_KEY"]}
    wrong = "a wrong secret, though a long enough one"
    chat = {"userId": "zoe", "message": "Hello?", "stream": False}
    answers = [
        await http.post("/api/chat/completions", json=chat, headers={"X-API-Key": "wrong-key"}),
        await http.post("/api/chat/completions", json=chat, headers=_bearer(_token(wrong))),
        await http.post(
            "/api/chat/completions",
            json=chat,
            headers=_bearer(_token(KEYS["JWT_SECRET"], expired=True)),
        ),
        await http.post("/api/chat/completions", json=chat, headers=_bearer("not.a.jwt")),
        await http.get("/api/chat/history/yan", headers=_bearer(_token(KEYS["JWT_SECRET"]))),
        await http.post("/api/chat/completions", content=b"{not json", headers=key),
    ]
    # Every provider refuses now: the person is told, in Libra's words.
    wire.always(
        ANTHROPIC_MESSAGES, Behaviour.error(401, f"invalid x-api-key {KEYS['ANTHROPIC_API_KEY']}")
    )
    answers.append(await http.post("/api/chat/completions", json=chat, headers=key))
    assert all(400 <= a.status_code < 600 for a in answers), [a.status_code for a in answers]
    return answers


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_no_secret_leaves_the_stack(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    for name in ("libra", "openai", "anthropic", "groq", "httpx", "httpcore", "nats", "hikari"):
        caplog.set_level(logging.DEBUG, logger=name)
    async with FakeLlmWire(reply=Behaviour.ok(REPLY)) as wire:
        wire.always(
            OPENAI_CHAT,
            Behaviour.error(401, f"Incorrect API key provided: {KEYS['OPENAI_API_KEY']}"),
        )
        wire.always(GROQ_CHAT, Behaviour.error(500, f"upstream failed for {KEYS['GROQ_API_KEY']}"))
        s = Settings.from_env(
            {
                "NATS_URL": settings.nats_url,
                "DATABASE_URL": settings.database_url,
                "REDIS_URL": settings.redis_url,
                **wire.env(),
                **KEYS,
                "LLM_PROVIDERS": "openai,groq,anthropic",
                "LLM_RETRIES": "0",
                "LLM_CACHE_ENABLED": "0",
                "HTTP_PORT": str(free_port()),
            }
        )
        secrets = _secrets(s)
        bodies: list[str] = [repr(s)]
        async with running(s, [*TEXT_PIPELINE, "http"]) as resources:
            bodies.append(repr(resources))  # what a traceback showing the process's state says
            leaky = ConsumerRunner(resources.log, Leaky(s), concurrency=4)
            task = asyncio.create_task(leaky.run())
            try:
                async with httpx.AsyncClient(
                    base_url=f"http://127.0.0.1:{s.http_port}", timeout=20
                ) as http:
                    await eventually(lambda: _up(http), timeout=15)
                    ok = await http.post(
                        "/api/chat/completions",
                        json={"userId": "zoe", "message": "Hi!", "stream": False},
                        headers={"X-API-Key": KEYS["BFF_API_KEY"]},
                    )
                    assert ok.status_code == 200 and REPLY in ok.text
                    bodies.extend(a.text for a in await _failures(http, wire))
                    js = resources.log.js
                    await eventually(lambda: _has(js, "libra.dead.leaky.>", 1))
                    await eventually(lambda: _has(js, "libra.llm.failed.>", 1))
                    bodies.append((await http.get("/metrics")).text)
                    bodies.append(
                        (
                            await http.get(
                                "/api/chat/history/zoe", headers={"X-API-Key": KEYS["BFF_API_KEY"]}
                            )
                        ).text
                    )
            finally:
                await leaky.stop()
                await asyncio.wait_for(task, 10)
            bodies.extend(await _stream_text(js, LOG_STREAM))
            bodies.extend(await _stream_text(js, LIVE_STREAM))
    assert any("libra.dead.leaky" in b and "ConnectionError" in b for b in bodies)
    records = [_record_text(r) for r in caplog.records]
    leaks = sorted(
        {
            (name, where)
            for name, secret in secrets.items()
            for form in _forms(secret)
            for where, texts in (("a log record", records), ("an event or body", bodies))
            if any(form in t for t in texts)
        }
    )
    assert leaks == [], leaks


async def _up(http: httpx.AsyncClient) -> bool:
    try:
        return (await http.get("/api/health")).status_code in (200, 503)
    except httpx.HTTPError:
        return False


async def _has(js: JetStreamContext, subject: str, n: int) -> bool:
    return await stream_count(js, LOG_STREAM, subject) >= n
